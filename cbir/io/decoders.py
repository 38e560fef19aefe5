"""Which plugin decodes which transfer syntax: one fixed choice per syntax, so that the pixels (and the
embeddings) never depend on which optional packages happen to be installed. Every plugin is BSD or MIT.

| syntax | plugin |
|---|---|
| uncompressed, deflated | pydicom itself |
| RLE Lossless | pydicom's own RLE decoder |
| JPEG Baseline, JPEG Lossless, JPEG-LS | GDCM (python-gdcm, BSD) |
| JPEG Extended (8- and 12-bit) | imagecodecs' libjpeg-turbo (BSD), `cbir.io.jpeg_extended` |
| JPEG 2000, High-Throughput JPEG 2000 | OpenJPEG through pylibjpeg-openjpeg and pylibjpeg (MIT) |
"""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import uid
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import as_pixel_options
from pydicom.pixels.decoders.base import get_decoder

from cbir.io.header import Geometry

JPEG_EXTENDED_PLUGIN = "cbir-imagecodecs"

PLUGINS: dict[str, str] = {
    uid.RLELossless: "pydicom",
    uid.JPEGBaseline8Bit: "gdcm",
    uid.JPEGExtended12Bit: JPEG_EXTENDED_PLUGIN,
    uid.JPEGLossless: "gdcm",
    uid.JPEGLosslessSV1: "gdcm",
    uid.JPEGLSLossless: "gdcm",
    uid.JPEGLSNearLossless: "gdcm",
    uid.JPEG2000Lossless: "pylibjpeg",
    uid.JPEG2000: "pylibjpeg",
    uid.HTJ2KLossless: "pylibjpeg",
    uid.HTJ2KLosslessRPCL: "pylibjpeg",
    uid.HTJ2K: "pylibjpeg",
}

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _register() -> None:
    """Add cbir's JPEG Extended plugin to pydicom's decoder (unavailable there when imagecodecs is missing)."""
    with suppress(ValueError):   # already added (a module reload)
        get_decoder(uid.JPEGExtended12Bit).add_plugin(JPEG_EXTENDED_PLUGIN,
                                                      ("cbir.io.jpeg_extended", "_decode_frame"))


_register()


def plugin_for(syntax: uid.UID) -> str:
    """The plugin for a compressed syntax ('' for native data); KeyError when cbir has none for it."""
    return PLUGINS[syntax] if syntax.is_compressed else ""


def can_decode(syntax: uid.UID) -> bool:
    """Whether the syntax's plugin is installed here."""
    if not syntax.is_compressed:
        return True
    try:
        return PLUGINS[syntax] in get_decoder(syntax).available_plugins
    except (KeyError, NotImplementedError, ValueError):
        return False


def decode_first_frame(ds: Dataset, path: str | Path, syntax: uid.UID, shape: Geometry
                       ) -> tuple[np.ndarray, str]:
    """The first frame's stored values and its photometric interpretation after decoding (pydicom turns YBR
    into RGB, and a JPEG 2000 decoder ICT/RCT into RGB). Only that frame's bytes are read when the pixel
    data was left in the file (the header reader defers it), so a 1 GB multi-frame file costs one frame."""
    keyword = next(k for k in PIXEL_KEYWORDS if k in ds)
    options: dict[str, Any] = {"rows": shape.rows, "columns": shape.columns, "number_of_frames": shape.frames,
               "samples_per_pixel": shape.samples}
    decoder = get_decoder(syntax)
    plugin = plugin_for(syntax)
    element = ds.get_item(keyword, keep_deferred=True)
    in_file = isinstance(element, RawDataElement) and element.value is None and element.value_tell is not None
    if in_file and syntax != uid.DeflatedExplicitVRLittleEndian:   # deflated data is only read inflated
        assert isinstance(element, RawDataElement)  # `in_file`
        opts: dict[str, Any] = as_pixel_options(ds, transfer_syntax_uid=syntax, pixel_keyword=keyword, **options)
        if element.VR and not syntax.is_implicit_VR:
            opts["pixel_vr"] = str(element.VR)
        with open(path, "rb") as fh:
            fh.seek(element.value_tell)
            arr, changed = decoder.as_array(fh, index=0, decoding_plugin=plugin, **opts)
    else:
        arr, changed = decoder.as_array(ds, index=0, decoding_plugin=plugin, **options)
    photometric = str(changed.get("photometric_interpretation", ds.get("PhotometricInterpretation", "")) or "")
    return arr, photometric.strip().upper()
