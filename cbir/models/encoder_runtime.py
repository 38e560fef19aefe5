"""Running an encoder file: one `Runtime` per format, each a callable (B, C, S, S) tensor → the encoder's output.

`reduce_output` turns that output into (B, features): a (B, F) output as it is, a (B, F, H, W) map averaged over
H and W, and a (B, T, D) token sequence by its first (class) token or its mean, as the contract's `output` says.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cbir.errors import CbirError

#: How an encoder's output becomes one vector per image.
OUTPUTS = ("auto", "cls", "mean")

Stated = tuple[int | None, int | None, tuple[float, ...] | None, tuple[float, ...] | None]


class Runtime(ABC):
    """A loaded encoder file. Subclasses run it; `stated_input` is what the file itself says of its input, a
    requirement where `binding` (an ONNX graph's static shape), else a default (timm's pretrained config)."""

    binding = False

    @abstractmethod
    def __call__(self, x: torch.Tensor) -> Any:
        """The encoder's raw output for a contract-prepared (B, C, S, S) batch."""

    def apply(self, fn: Any) -> None:
        """Apply a `nn.Module._apply` function (a device move) to the encoder's tensors, if it has any (an ONNX
        session has none: it stays on the CPU)."""
        return None

    def stated_input(self) -> Stated:
        return None, None, None, None


class TorchRuntime(Runtime):
    """A torch module: TorchScript, the module of a `torch.export` program, or a timm model."""

    def __init__(self, module: nn.Module, stated: Stated = (None, None, None, None), exported: bool = False
                 ) -> None:
        if not exported:   # a torch.export program keeps the mode it was exported in (and refuses eval())
            module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        self.module = module
        self.stated = stated

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> Any:
        return self.module(x)

    def apply(self, fn: Any) -> None:
        self.module._apply(fn)

    def stated_input(self) -> Stated:
        return self.stated


class OnnxRuntime(Runtime):
    """An ONNX model in onnxruntime on the CPU, with as many threads as torch uses."""

    binding = True

    def __init__(self, file: Path) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3
        try:
            self.session = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise CbirError(f"{file}: not a readable ONNX model ({_brief(exc)})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise CbirError(f"{file}: the ONNX model has {len(inputs)} inputs; cbir feeds one image tensor")
        self.input = inputs[0].name
        shape = list(inputs[0].shape)
        if len(shape) != 4:
            raise CbirError(f"{file}: the ONNX model's input has shape {shape}; cbir feeds (batch, C, H, W)")
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        channels, height, width = (v if isinstance(v, int) else None for v in shape[1:])
        if height is not None and width is not None and height != width:
            raise CbirError(f"{file}: the ONNX model expects {height}×{width} input; cbir feeds square images")
        self.stated: Stated = (channels, height, None, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().cpu().float().numpy()
        if self.fixed_batch == 1 and len(array) != 1:
            outputs = [self.session.run(None, {self.input: array[i:i + 1]})[0] for i in range(len(array))]
            return torch.cat([torch.from_numpy(o) for o in outputs]).to(x.device)
        return torch.from_numpy(self.session.run(None, {self.input: array})[0]).to(x.device)

    def stated_input(self) -> Stated:
        return self.stated


def load_runtime(fmt: str, file: Path, arch: str | None, channels: int | None) -> Runtime:
    """Load `file` as `fmt` (`cbir.models.encoder.FORMATS`); a one-line error for a file that is not one."""
    if fmt == "onnx":
        return OnnxRuntime(file)
    if fmt == "timm":
        return _timm_runtime(file, str(arch), channels)
    try:
        if fmt == "exported":
            return TorchRuntime(torch.export.load(str(file)).module(), exported=True)
        with warnings.catch_warnings():   # torch.jit.load's FutureWarning: TorchScript files still load
            warnings.simplefilter("ignore", FutureWarning)
            return TorchRuntime(torch.jit.load(str(file), map_location="cpu"))
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, ValueError, zipfile errors…
        what = "a torch.export program (.pt2)" if fmt == "exported" else "a TorchScript module"
        hint = "" if fmt == "exported" else "; for a weights file give --encoder-arch (a timm model name)"
        raise CbirError(f"{file}: not {what} ({_brief(exc)}){hint}") from None


def _timm_runtime(file: Path, arch: str, channels: int | None) -> Runtime:
    import timm
    from timm.data import resolve_data_config

    if not timm.is_model(arch):
        raise CbirError(f"--encoder-arch {arch!r}: unknown timm model (see `timm.list_models()`)")
    kwargs: dict[str, Any] = {"num_classes": 0, "pretrained_cfg_overlay": {"file": str(file)}}
    if channels is not None:
        kwargs["in_chans"] = channels
    try:
        model = timm.create_model(arch, pretrained=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a state dict that does not fit, an unreadable file…
        raise CbirError(f"{file}: cannot load its weights into timm's {arch} ({_brief(exc)})") from None
    config = resolve_data_config({}, model=model)
    _, height, width = config["input_size"]
    stated: Stated = (int(config["input_size"][0]), int(height) if height == width else None,
                      tuple(float(v) for v in config["mean"]), tuple(float(v) for v in config["std"]))
    return TorchRuntime(model, stated)


def reduce_output(output: Any, mode: str, file: str) -> torch.Tensor:
    """(B, features) from an encoder's output (a tensor, or a tuple/list whose first item is the tensor)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if isinstance(output, dict):
        raise CbirError(f"{file}: the encoder returns a dict; export a module that returns one tensor")
    if not isinstance(output, torch.Tensor):
        raise CbirError(f"{file}: the encoder returns {type(output).__name__}, not a tensor")
    if output.ndim == 2:
        return output
    if output.ndim == 4 and mode in ("auto", "mean"):
        return output.mean(dim=(2, 3))
    if output.ndim == 3 and mode in ("cls", "mean"):
        return output[:, 0] if mode == "cls" else output.mean(dim=1)
    if output.ndim == 3:
        raise CbirError(f"{file}: the encoder returns tokens {tuple(output.shape)}: choose --encoder-output cls "
                        "(the first token) or mean")
    raise CbirError(f"{file}: the encoder returns shape {tuple(output.shape)}; cbir needs (B, F), (B, F, H, W) or "
                    "(B, T, D)")


def _brief(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:160]
