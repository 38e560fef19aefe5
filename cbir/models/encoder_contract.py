"""An external encoder's input contract: how cbir's grey [0, 1] pixels become the tensor the encoder expects.

cbir reads every image the same way (`cbir.io.read_image`: DICOM VOI window or PNG/JPEG grey levels, scaled to
[0, 1], MONOCHROME1 inverted), letterboxes it to `size` × `size` (aspect kept, zero padding), then the contract
repeats the grey channel `channels` times and normalises each channel: `(x − mean) / std`. The presets name the
usual conventions; torchxrayvision's [−1024, 1024] range is `xrv`, and `standardize` is cbir's own per-image
zero mean and unit variance (a `cbir pretrain` backbone's).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch

from cbir.data.transforms import standardize
from cbir.errors import CbirError

#: What happens to a file's pixels before the contract's own steps (recorded in the checkpoint).
PIPELINE = "cbir.io.read_image grey [0,1] -> letterbox (aspect kept, zero padding) -> repeat grey -> (x-mean)/std"

class Norm(NamedTuple):
    """`(x − mean) / std` per channel (one value: all channels), after per-image standardisation if `per_image`."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    per_image: bool = False


#: --encoder-norm presets.
NORMS: dict[str, Norm] = {
    "unit": Norm((0.0,), (1.0,)),                                          # [0, 1] as read
    "symmetric": Norm((0.5,), (0.5,)),                                     # [−1, 1]
    "imagenet": Norm((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),        # timm/torchvision ImageNet weights
    "xrv": Norm((0.5,), (1.0 / 2048,)),                                    # torchxrayvision: [−1024, 1024]
    "standardize": Norm((0.0,), (1.0,), per_image=True),                   # cbir's own: per-image mean 0, sd 1
}


@dataclass(frozen=True)
class InputContract:
    """Channels (1 or 3), square input size, and per-channel mean and std applied to [0, 1] grey pixels."""

    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    per_image: bool = False   # standardise each image (zero mean, unit variance) before mean/std
    pipeline: str = PIPELINE

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise CbirError(f"encoder input: {self.channels} channels; cbir feeds 1 (grey) or 3 (grey repeated)")
        if self.size < 16:
            raise CbirError(f"encoder input: size {self.size} is below 16 px")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.channels):
                raise CbirError(f"encoder input: {len(values)} {name} values for {self.channels} channel(s)")
        if any(s <= 0 for s in self.std):
            raise CbirError(f"encoder input: std {list(self.std)} must be positive")

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) grey in [0, 1] → (B, channels, S, S), normalised: what the encoder itself is given."""
        if pixels.shape[1] != 1 or pixels.shape[-1] != self.size or pixels.shape[-2] != self.size:
            raise CbirError(f"encoder input: got {tuple(pixels.shape[1:])}, expected (1, {self.size}, {self.size})")
        x = (standardize(pixels.float()) if self.per_image else pixels.float()).expand(-1, self.channels, -1, -1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return ((x - mean) / std).contiguous()

    def describe(self) -> str:
        scaled = "per-image standardised, then " if self.per_image else ""
        return f"{self.channels}×{self.size}×{self.size}, {scaled}(x − {list(self.mean)}) / {list(self.std)}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputContract:
        return cls(int(data["channels"]), int(data["size"]), tuple(float(v) for v in data["mean"]),
                   tuple(float(v) for v in data["std"]), bool(data.get("per_image", False)),
                   str(data.get("pipeline", PIPELINE)))


def parse_norm(text: str) -> Norm:
    """A --encoder-norm value: a preset name (`NORMS`), or `MEAN/STD` with comma-separated values per channel,
    e.g. `0.5/0.25` or `0.485,0.456,0.406/0.229,0.224,0.225`."""
    if text in NORMS:
        return NORMS[text]
    try:
        mean, std = text.split("/")
        return Norm(tuple(float(v) for v in mean.split(",")), tuple(float(v) for v in std.split(",")))
    except ValueError:
        raise CbirError(f"--encoder-norm {text!r}: give one of {', '.join(NORMS)}, or MEAN/STD such as "
                        "0.5/0.25 or 0.485,0.456,0.406/0.229,0.224,0.225") from None


def parse_input(text: str) -> tuple[int, int]:
    """A --encoder-input value `CxS` (channels × square size), e.g. `3x224` → (3, 224)."""
    try:
        channels, size = (int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise CbirError(f"--encoder-input {text!r}: give CHANNELSxSIZE, e.g. 3x224 or 1x512") from None
    return channels, size
