"""A frozen encoder from a local file, as a CbirNet backbone: a TorchScript module, a `torch.export` program
(.pt2), an ONNX model (onnxruntime: the `onnx` extra), or a timm architecture with a safetensors/.pth file.

    spec = describe_encoder(Path("rad-dino.onnx"), norm="imagenet")   # reads, probes and hashes the file
    ModelConfig(..., image_size=spec.contract.size, intensity="unit", encoder=spec.to_dict())

The encoder's weights stay in its file; the checkpoint records the file's path and sha256 (`EncoderSpec`), and a
changed file is refused. cbir trains only the head on the encoder's features.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cbir.errors import CbirError
from cbir.extras import require
from cbir.io.digest import sha256_of
from cbir.models.encoder_contract import InputContract, Norm, parse_input, parse_norm
from cbir.models.encoder_runtime import OUTPUTS, Runtime, load_runtime, reduce_output

#: Encoder file formats: how `describe_encoder` reads a file.
FORMATS = ("torchscript", "exported", "onnx", "timm")


@dataclass(frozen=True)
class EncoderSpec:
    """What a checkpoint records of its encoder: the file, its sha256, the format and the input contract."""

    format: str
    file: str
    sha256: str
    contract: InputContract
    num_features: int
    output: str = "auto"
    arch: str | None = None   # the timm architecture (format "timm")

    @property
    def name(self) -> str:
        """A short name for reports: `onnx:rad-dino.onnx`, `timm:resnet50`."""
        return f"{self.format}:{self.arch or Path(self.file).name}"

    def to_dict(self) -> dict[str, Any]:
        data = {"format": self.format, "file": self.file, "sha256": self.sha256,
                "contract": self.contract.to_dict(), "num_features": self.num_features, "output": self.output}
        return data | ({"arch": self.arch} if self.arch else {})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderSpec:
        try:
            return cls(str(data["format"]), str(data["file"]), str(data["sha256"]),
                       InputContract.from_dict(data["contract"]), int(data["num_features"]),
                       str(data.get("output", "auto")), data.get("arch"))
        except (KeyError, TypeError, ValueError) as exc:
            raise CbirError(f"unreadable encoder record in the model config ({exc})") from None


class FrozenEncoder(nn.Module):
    """The backbone interface of a timm model (`num_features`, `forward_features`, `forward_head`) over a frozen
    external encoder. Its input is cbir's (B, 1, S, S) grey pixels in [0, 1]; `forward_features` applies the
    contract and returns the encoder's (B, num_features) output. The encoder is outside the state dict (the
    checkpoint holds the head only) and always in eval mode."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        check_file(spec)
        self.spec = spec
        self.contract = spec.contract
        self.num_features = spec.num_features
        self._runtime: Runtime = load_runtime(spec.format, Path(spec.file), spec.arch, spec.contract.channels)
        self._cache = FeatureCache(spec.num_features)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("_runtime", "_cache"):   # not registered: the encoder's weights stay out of the state dict
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _apply(self, fn: Any, recurse: bool = True) -> FrozenEncoder:
        super()._apply(fn, recurse)
        self._runtime.apply(fn)   # .to(device) moves a torch encoder too
        return self

    @torch.no_grad()
    def encode(self, prepared: torch.Tensor) -> torch.Tensor:
        """The encoder's own (B, num_features) output for a contract-prepared batch."""
        return reduce_output(self._runtime(prepared), self.spec.output, self.spec.file).float()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_features) for (B, 1, S, S) pixels in [0, 1]. In training mode an input seen before is not
        encoded again (`--augment none` encodes each training image once); in eval mode (validation, ingest,
        queries) nothing is cached, so serving and ingesting hold no features."""
        if not self.training:
            return self.encode(self.contract.prepare(x))
        return self._cache.features(x, lambda rows: self.encode(self.contract.prepare(rows)))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        return features


class FeatureCache:
    """Features of inputs already encoded, by a digest of the input's bytes, up to `limit_bytes` in all (oldest
    dropped first). A frozen encoder gives the same features for the same input, so nothing is approximated."""

    def __init__(self, num_features: int, limit_bytes: int = 256 << 20) -> None:
        self.store: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.capacity = max(1, limit_bytes // (4 * num_features))

    def features(self, x: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        rows = x.detach().to("cpu", torch.float32).contiguous()
        keys = [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in rows]
        missing = [i for i, key in enumerate(keys) if key not in self.store]
        if missing:
            fresh = encode(x[missing]).detach()
            for i, row in zip(missing, fresh.cpu(), strict=True):
                self.store[keys[i]] = row
            while len(self.store) > self.capacity:
                self.store.popitem(last=False)
        if not missing or len(missing) < len(keys):
            found = [self.store.get(key) for key in keys]
            if any(f is None for f in found):   # evicted within this batch (a tiny cache): encode all
                return encode(x).detach()
            return torch.stack([f for f in found if f is not None]).to(x.device)
        return fresh.to(x.device)


def describe_encoder(file: Path, arch: str | None = None, input_shape: str | None = None, norm: str | None = None,
                     output: str | None = None) -> EncoderSpec:
    """Read `file` (format from `arch` or the suffix), settle its input contract and probe it.

    The contract comes from, in order: the arguments (`input_shape` "3x224", `norm` a preset or MEAN/STD), a
    sidecar `FILE.json` ({"channels", "size", "norm" or "mean"/"std", "output"}), and what the file itself states
    (an ONNX model's static input shape; a timm architecture's pretrained config). A value that nothing states
    is an error, and so is one that contradicts the file: no encoder gets silently wrong inputs.
    """
    file = Path(file).expanduser().resolve()
    if not file.is_file():
        raise CbirError(f"{file}: encoder file not found")
    fmt = encoder_format(file, arch)
    sidecar = _sidecar(file)
    channels, size = parse_input(input_shape) if input_shape else (sidecar.get("channels"), sidecar.get("size"))
    scaling = parse_norm(norm) if norm else _sidecar_norm(sidecar, file)
    output = output or sidecar.get("output", "auto")
    if output not in OUTPUTS:
        raise CbirError(f"--encoder-output {output!r}: choose from {', '.join(OUTPUTS)}")
    runtime = load_runtime(fmt, file, arch, channels)
    stated = runtime.stated_input()   # (channels, size, mean, std), each None where the file says nothing
    channels = channels or stated[0]
    size = size or stated[1]
    if scaling is None and stated[2] is not None and stated[3] is not None:
        scaling = Norm(stated[2], stated[3])
    if channels is None or size is None:
        raise CbirError(f"{file}: the input shape is not stated: pass --encoder-input CHANNELSxSIZE (e.g. 3x224) "
                        f"or write {file.name}.json")
    if scaling is None:
        raise CbirError(f"{file}: the input normalisation is not stated: pass --encoder-norm (unit, symmetric, "
                        f"imagenet, xrv, standardize or MEAN/STD) or write {file.name}.json")
    contract = InputContract(int(channels), int(size), scaling.mean, scaling.std, scaling.per_image)
    if runtime.binding and (stated[0] not in (None, contract.channels) or stated[1] not in (None, size)):
        raise CbirError(f"{file}: the encoder expects {stated[0]}×{stated[1]}×{stated[1]} input, the contract says "
                        f"{contract.channels}×{size}×{size}")
    num_features = _probe(runtime, contract, output, file)
    return EncoderSpec(fmt, str(file), sha256_of(file), contract, num_features, output, arch)


def encoder_format(file: Path, arch: str | None) -> str:
    """"timm" with an architecture; otherwise by suffix: .onnx, .pt2 (torch.export), anything else TorchScript."""
    if arch:
        return "timm"
    if file.suffix.lower() == ".onnx":
        require("onnx", "--encoder with an ONNX model")
        return "onnx"
    return "exported" if file.suffix.lower() == ".pt2" else "torchscript"


def check_file(spec: EncoderSpec) -> None:
    """Refuse, in one line, an encoder file that is gone or no longer the one the model was trained with."""
    file = Path(spec.file)
    if not file.is_file():
        raise CbirError(f"{file}: encoder file not found (the model was trained with it; put it back, or train "
                        "again)")
    digest = sha256_of(file)
    if digest != spec.sha256:
        raise CbirError(f"{file}: the encoder file changed since the model was trained (sha256 {digest[:12]}… ≠ "
                        f"recorded {spec.sha256[:12]}…); restore it, or train again")


def _sidecar(file: Path) -> dict[str, Any]:
    path = file.with_name(file.name + ".json")
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CbirError(f"{path}: unreadable encoder contract ({exc})") from None
    if not isinstance(data, dict):
        raise CbirError(f"{path}: the encoder contract must be a JSON object")
    return data


def _sidecar_norm(sidecar: dict[str, Any], file: Path) -> Norm | None:
    if "norm" in sidecar:
        return parse_norm(str(sidecar["norm"]))
    if "mean" in sidecar and "std" in sidecar:
        try:
            return Norm(tuple(float(v) for v in sidecar["mean"]), tuple(float(v) for v in sidecar["std"]))
        except (TypeError, ValueError):
            raise CbirError(f"{file}.json: mean and std must be lists of numbers") from None
    return None


def _probe(runtime: Runtime, contract: InputContract, output: str, file: Path) -> int:
    """Run two blank images through the encoder; its feature count, or a one-line error if it rejects them."""
    blank = contract.prepare(torch.zeros(2, 1, contract.size, contract.size))
    try:
        features = reduce_output(runtime(blank), output, str(file))
    except CbirError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the encoder raises, the user gets one line
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        brief = (lines[-1] if lines else type(exc).__name__)[:160]   # TorchScript puts the cause last
        raise CbirError(f"{file}: the encoder rejects {contract.channels}×{contract.size}×{contract.size} input "
                        f"({brief}); check --encoder-input") from None
    if features.shape[0] != 2:
        raise CbirError(f"{file}: the encoder gave {features.shape[0]} outputs for 2 images")
    return int(features.shape[1])
