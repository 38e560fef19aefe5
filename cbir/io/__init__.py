"""Image IO: DICOM, PNG and JPEG in; float32 grey pixels in [0, 1] and safe metadata out.

Nothing identifying leaves this package: patient IDs become keyed pseudonyms and UIDs become
one-way instance keys.
"""

from cbir.io.image import XrayImage, read_image
from cbir.io.phi import Pseudonymizer, SafeMeta, load_pseudonymizer

__all__ = ["XrayImage", "read_image", "Pseudonymizer", "SafeMeta", "load_pseudonymizer"]
