"""A pydicom decoding plugin for JPEG Extended (Process 2 and 4: 8- and 12-bit) through imagecodecs.

GDCM and Pillow refuse 12-bit JPEG Extended, and pylibjpeg-libjpeg is GPLv3; imagecodecs (BSD) wraps
libjpeg-turbo 3, which decodes 8- and 12-bit lossy JPEG. The module follows pydicom's plugin contract
(`is_available`, `DECODER_DEPENDENCIES`, `_decode_frame`); `cbir.io.decoders` registers it.
"""

from __future__ import annotations

from pydicom import uid
from pydicom.pixels.decoders.base import DecodeRunner

DECODER_DEPENDENCIES = {uid.JPEGExtended12Bit: ("imagecodecs==2025.3.30",)}


def is_available(syntax: str) -> bool:
    """Whether imagecodecs with its libjpeg-turbo codec is importable (for JPEG Extended only)."""
    if syntax != uid.JPEGExtended12Bit:
        return False
    try:
        import imagecodecs
    except ImportError:
        return False
    return bool(imagecodecs.JPEG8.available)


def _decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """The decoded frame as bytes: samples as stored (no colour transform; pydicom converts YBR to RGB)."""
    import imagecodecs

    if runner.samples_per_pixel == 3:
        arr = imagecodecs.jpeg8_decode(src, colorspace="YCbCr", outcolorspace="YCbCr")
    else:
        arr = imagecodecs.jpeg8_decode(src)
    runner.set_option("bits_allocated", 8 * arr.dtype.itemsize)
    if runner.samples_per_pixel > 1:
        runner.set_option("planar_configuration", 0)   # libjpeg returns interleaved samples
    return bytes(arr.tobytes())
