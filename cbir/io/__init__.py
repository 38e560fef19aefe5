"""Image IO: DICOM, PNG and JPEG in; float32 grey pixels in [0, 1] and safe metadata out.

Nothing identifying leaves this package: patient IDs become keyed pseudonyms and UIDs become
one-way instance keys. The names below load their module on first use, so that importing a light module of the
package (`cbir.io.policy`) does not load pydicom and NumPy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cbir.io.image import XrayImage, read_image
    from cbir.io.phi import Pseudonymizer, SafeMeta, load_pseudonymizer
    from cbir.io.policy import DEFAULT_READER, ReaderPolicy

_WHERE = {"DEFAULT_READER": "cbir.io.policy", "ReaderPolicy": "cbir.io.policy", "XrayImage": "cbir.io.image",
          "read_image": "cbir.io.image", "Pseudonymizer": "cbir.io.phi", "SafeMeta": "cbir.io.phi",
          "load_pseudonymizer": "cbir.io.phi"}
__all__ = ["DEFAULT_READER", "ReaderPolicy", "XrayImage", "read_image", "Pseudonymizer", "SafeMeta",
           "load_pseudonymizer"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'cbir.io' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
