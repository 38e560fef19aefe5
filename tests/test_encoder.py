"""Frozen encoders from a local file (`cbir train --encoder`): a small timm model exported here, inside the test, to
TorchScript, torch.export, ONNX and a safetensors file; nothing is downloaded. Each goes train → ingest → query →
evaluate, and its features in cbir equal the encoder's own output on the same preprocessed tensor."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from cbir.data.loading import model_view
from cbir.data.synth import synth_dataset
from cbir.errors import CbirError
from cbir.io import read_image
from cbir.models import load_checkpoint
from cbir.models.encoder import describe_encoder
from cbir.models.encoder_contract import NORMS, InputContract
from tests.conftest import run_cli

SIZE = 48
ARCH = "test_resnet"   # timm's tiny test network: exports in a second


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same random timm network in every format (3×48 input, ImageNet normalisation), and its data."""
    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=0, in_chans=3).eval()
    example = torch.rand(2, 3, SIZE, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, example).save(str(root / "enc.ts"))
        torch.onnx.export(model, (example,), str(root / "enc.onnx"), dynamo=False, input_names=["pixels"],
                          output_names=["features"], dynamic_axes={"pixels": {0: "batch"}})
    save_file(model.state_dict(), str(root / "enc.safetensors"))
    torch.save(model, root / "eager.pt")   # the reference, read back by the tests
    synth_dataset("rsna", 40, 64, root / "data", seed=3)
    return {"root": root, "ts": root / "enc.ts", "onnx": root / "enc.onnx", "st": root / "enc.safetensors",
            "eager": root / "eager.pt", "data": root / "data"}


def _eager(encoders: dict[str, Path]) -> torch.nn.Module:
    return torch.load(encoders["eager"], weights_only=False).eval()


def _first_image(data: Path) -> Path:
    return sorted(data.rglob("*.dcm"))[0]


def _pixels(file: Path, size: int) -> torch.Tensor:
    pixels, _ = model_view(read_image(file), size)   # cbir's one path from a file to model input
    return torch.from_numpy(pixels)[None, None]


ARGS = {"ts": ["--encoder-norm", "imagenet", "--encoder-input", f"3x{SIZE}"],
        "onnx": ["--encoder-norm", "imagenet"],                 # the ONNX graph states 3×48
        "st": ["--encoder-arch", ARCH, "--encoder-input", f"3x{SIZE}"]}   # timm's config states ImageNet


@pytest.mark.parametrize("kind", ["ts", "onnx", "st"])
def test_encoder_end_to_end_and_features_equal_its_own(encoders: dict[str, Path], tmp_path: Path, kind: str
                                                       ) -> None:
    run = tmp_path / "run"
    code, stdout, stderr = run_cli("train", "--data", encoders["data"], "--out", run, "--encoder", encoders[kind],
                                   *ARGS[kind], "--epochs", "1", "--batch-size", "8", "--workers", "0")
    assert code == 0, stderr
    config = json.loads((run / "config.json").read_text())
    assert config["intensity"] == "unit" and config["image_size"] == SIZE
    spec = config["encoder"]
    stated = timm.data.resolve_data_config({}, model=_eager(encoders))["mean"]   # what timm's config says
    assert spec["contract"]["channels"] == 3
    assert spec["contract"]["mean"] == list(stated if kind == "st" else NORMS["imagenet"][0])
    assert len(spec["sha256"]) == 64 and spec["num_features"] == _eager(encoders).num_features
    # the checkpoint holds the head only: the encoder's weights stay in its file
    assert all(not k.startswith("backbone.") for k in load_file(str(run / "model.safetensors")))

    loaded = load_checkpoint(run)
    file = _first_image(encoders["data"])
    pixels = _pixels(file, SIZE)
    prepared = InputContract.from_dict(spec["contract"]).prepare(pixels)
    with torch.no_grad():
        own = _eager(encoders)(prepared)
        features = loaded.model.forward_features(pixels)
    assert torch.allclose(features, own, atol=1e-5, rtol=0), (features - own).abs().max()
    if kind == "onnx":   # and what onnxruntime itself gives for that tensor
        import onnxruntime

        session = onnxruntime.InferenceSession(str(encoders["onnx"]), providers=["CPUExecutionProvider"])
        direct = torch.from_numpy(session.run(None, {"pixels": prepared.numpy()})[0])
        assert torch.allclose(features, direct, atol=1e-5, rtol=0)
    # the stored embedding is the head applied to those features
    from cbir.embed.embedder import embed_image

    embedded = embed_image(loaded, read_image(file))
    with torch.no_grad():
        expected = loaded.model.forward_head(own).embedding
        if loaded.model.appearance is not None:
            from cbir.models.appearance import join

            expected = join(expected, loaded.model.appearance(pixels), loaded.config.appearance_weight)
    assert np.allclose(embedded.embedding, expected[0].numpy(), atol=1e-5)

    index = tmp_path / "index"
    code, stdout, stderr = run_cli("ingest", "--data", encoders["data"], "--model", run, "--index", index,
                                   "--workers", "0")
    assert code == 0 and "40 ingested" in stdout, stderr
    code, stdout, stderr = run_cli("query", file, "--model", run, "--index", index, "--k", "5")
    assert code == 0 and "kNN vote" in stdout, stderr
    code, stdout, stderr = run_cli("evaluate", "--model", run, "--index", index, "--out", tmp_path / "report")
    assert code == 0 and "majority baseline" in stdout, stderr


def test_torch_export_program(encoders: dict[str, Path], tmp_path: Path) -> None:
    model = _eager(encoders)
    program = torch.export.export(model, (torch.rand(2, 3, SIZE, SIZE),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    file = tmp_path / "enc.pt2"
    torch.export.save(program, str(file))
    spec = describe_encoder(file, input_shape=f"3x{SIZE}", norm="imagenet")
    assert spec.format == "exported"
    from cbir.models.encoder import FrozenEncoder

    encoder = FrozenEncoder(spec)
    pixels = _pixels(_first_image(encoders["data"]), SIZE)
    with torch.no_grad():
        assert torch.allclose(encoder.forward_features(pixels), model(spec.contract.prepare(pixels)), atol=1e-5)


def test_a_changed_or_missing_encoder_file_is_refused(encoders: dict[str, Path], tmp_path: Path) -> None:
    file = tmp_path / "enc.ts"
    file.write_bytes(encoders["ts"].read_bytes())
    run = tmp_path / "run"
    code, _, stderr = run_cli("train", "--data", encoders["data"], "--out", run, "--encoder", file, *ARGS["ts"],
                              "--epochs", "0", "--workers", "0")
    assert code == 0, stderr
    load_checkpoint(run)
    with file.open("ab") as fh:   # one byte more: a different file
        fh.write(b"\0")
    with pytest.raises(CbirError, match="changed since the model was trained"):
        load_checkpoint(run)
    code, _, stderr = run_cli("ingest", "--data", encoders["data"], "--model", run, "--index", tmp_path / "i")
    assert code == 2 and "changed since the model was trained" in stderr and len(stderr.strip().splitlines()) == 1
    file.unlink()
    with pytest.raises(CbirError, match="encoder file not found"):
        load_checkpoint(run)


@pytest.mark.parametrize(("args", "message"), [
    (["--encoder-input", f"1x{SIZE}", "--encoder-norm", "unit"], "rejects 1×48×48 input"),   # a 3-channel network
    (["--encoder-input", f"3x{SIZE}"], "normalisation is not stated"),
    (["--encoder-norm", "imagenet"], "input shape is not stated"),
    (["--encoder-norm", "bogus"], "--encoder-norm 'bogus'"),
    (["--encoder-input", "3by48", "--encoder-norm", "unit"], "--encoder-input '3by48'"),
    (["--encoder-input", f"3x{SIZE}", "--encoder-norm", "unit", "--image-size", "64"], "takes 48 px"),
    (["--encoder-input", f"3x{SIZE}", "--encoder-norm", "unit", "--task", "detection"], "detector"),
    (["--encoder-input", f"3x{SIZE}", "--encoder-norm", "unit", "--backbone", "resnet34"], "replaces --backbone"),
    (["--encoder-input", f"3x{SIZE}", "--encoder-norm", "unit", "--ema"], "--ema: a frozen --encoder"),
])
def test_contract_errors_are_one_line(encoders: dict[str, Path], tmp_path: Path, args: list[str], message: str
                                      ) -> None:
    code, _, stderr = run_cli("train", "--data", encoders["data"], "--out", tmp_path / "run",
                              "--encoder", encoders["ts"], *args, "--epochs", "0")
    assert code == 2, stderr
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "run").exists()


def test_onnx_shape_contradicting_the_contract(encoders: dict[str, Path]) -> None:
    with pytest.raises(CbirError, match="expects 3×48×48 input, the contract says 1×48×48"):
        describe_encoder(encoders["onnx"], input_shape=f"1x{SIZE}", norm="unit")
    with pytest.raises(CbirError, match="expects 3×48×48 input, the contract says 3×64×64"):
        describe_encoder(encoders["onnx"], input_shape="3x64", norm="unit")


def test_sidecar_contract_and_token_outputs(encoders: dict[str, Path], tmp_path: Path) -> None:
    file = tmp_path / "vit.ts"
    vit = timm.create_model("test_vit", num_classes=0, in_chans=1, img_size=32).eval()
    class Tokens(torch.nn.Module):   # (B, T, D): every token, the class token first
        def __init__(self) -> None:
            super().__init__()
            self.vit = vit

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.vit.forward_features(x)

    with warnings.catch_warnings():   # timm's position-embedding check, traced as a constant
        warnings.simplefilter("ignore")
        torch.jit.trace(Tokens().eval(), torch.rand(2, 1, 32, 32)).save(str(file))
    with pytest.raises(CbirError, match="returns tokens"):
        describe_encoder(file, input_shape="1x32", norm="symmetric")
    file.with_name("vit.ts.json").write_text(json.dumps({"channels": 1, "size": 32, "norm": "symmetric",
                                                         "output": "cls"}))
    spec = describe_encoder(file)
    assert spec.contract == InputContract(1, 32, (0.5,), (0.5,)) and spec.output == "cls"
    assert spec.num_features == vit.num_features
    pixels = torch.rand(3, 1, 32, 32)
    from cbir.models.encoder import FrozenEncoder

    with torch.no_grad():
        expected = vit.forward_features((pixels - 0.5) / 0.5)[:, 0]
        assert torch.allclose(FrozenEncoder(spec).forward_features(pixels), expected, atol=1e-5)


def test_not_an_encoder_file(tmp_path: Path) -> None:
    bogus = tmp_path / "weights.pth"
    bogus.write_bytes(b"not a model")
    with pytest.raises(CbirError, match="not a TorchScript module.*--encoder-arch"):
        describe_encoder(bogus, input_shape="3x32", norm="unit")
    with pytest.raises(CbirError, match="encoder file not found"):
        describe_encoder(tmp_path / "missing.onnx")
    with pytest.raises(CbirError, match="unknown timm model"):
        describe_encoder(bogus, arch="no_such_net")


def test_onnx_without_the_extra_names_it(encoders: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)   # as if `cbir[onnx]` were not installed
    code, _, stderr = run_cli("train", "--data", encoders["data"], "--out", "unused", "--encoder", encoders["onnx"],
                              "--encoder-norm", "unit")
    assert code == 2 and "pip install 'cbir[onnx]'" in stderr and len(stderr.strip().splitlines()) == 1


def test_retrieval_by_the_encoders_own_features(encoders: dict[str, Path], tmp_path: Path) -> None:
    """`--retrieval encoder`: the stored embedding is the encoder's own output, L2-normalised."""
    run = tmp_path / "run"
    code, _, stderr = run_cli("train", "--data", encoders["data"], "--out", run, "--encoder", encoders["onnx"],
                              "--encoder-norm", "imagenet", "--retrieval", "encoder", "--appearance-size", "0",
                              "--epochs", "1", "--batch-size", "8", "--workers", "0")
    assert code == 0, stderr
    loaded = load_checkpoint(run)
    assert loaded.config.vector_dim == _eager(encoders).num_features
    file = _first_image(encoders["data"])
    pixels = _pixels(file, SIZE)
    with torch.no_grad():
        own = torch.nn.functional.normalize(_eager(encoders)(loaded.model.backbone.contract.prepare(pixels)))
    from cbir.embed.embedder import embed_image

    assert np.allclose(embed_image(loaded, read_image(file)).embedding, own[0].numpy(), atol=1e-5)
    index = tmp_path / "index"
    assert run_cli("ingest", "--data", encoders["data"], "--model", run, "--index", index, "--workers", "0")[0] == 0
    code, stdout, stderr = run_cli("query", file, "--model", run, "--index", index, "--k", "3")
    assert code == 0 and "1.0000" in stdout, stderr   # the image finds itself first
    code, _, stderr = run_cli("train", "--data", encoders["data"], "--out", tmp_path / "x", "--retrieval", "encoder")
    assert code == 2 and "--encoder FILE" in stderr


def test_features_are_encoded_once_per_input(encoders: dict[str, Path]) -> None:
    """A frozen encoder's features are cached by input: `--augment none` encodes each training image once."""
    from cbir.models.encoder import FrozenEncoder

    encoder = FrozenEncoder(describe_encoder(encoders["ts"], input_shape=f"3x{SIZE}", norm="imagenet"))
    encoded: list[int] = []
    plain = encoder.encode
    encoder.encode = lambda prepared: (encoded.append(len(prepared)), plain(prepared))[1]  # type: ignore[method-assign]
    x = torch.rand(4, 1, SIZE, SIZE)
    new = torch.rand(1, 1, SIZE, SIZE)
    encoder.eval()
    encoder.forward_features(x)   # eval mode (ingest, queries): encoded, nothing kept
    assert encoded == [4] and not encoder._cache.store
    encoded.clear()
    encoder.train()   # what the training loop sets: the runtime itself stays in eval mode
    first = encoder.forward_features(x)
    again = encoder.forward_features(x)
    mixed = encoder.forward_features(torch.cat([x[2:], new]))
    assert encoded == [4, 1]   # the second batch came from the cache; of the third, only the new image
    assert torch.equal(first, again) and torch.equal(mixed[:2], first[2:])
    assert torch.allclose(mixed[2:], plain(encoder.contract.prepare(new)), atol=1e-6)


def test_a_pth_state_dict_with_its_timm_architecture(encoders: dict[str, Path], tmp_path: Path) -> None:
    model = _eager(encoders)
    file = tmp_path / "enc.pth"
    torch.save(model.state_dict(), file)
    spec = describe_encoder(file, arch=ARCH, input_shape=f"3x{SIZE}", norm="imagenet")
    assert spec.format == "timm" and spec.name == f"timm:{ARCH}"
    from cbir.models.encoder import FrozenEncoder

    pixels = _pixels(_first_image(encoders["data"]), SIZE)
    with torch.no_grad():
        assert torch.allclose(FrozenEncoder(spec).forward_features(pixels), model(spec.contract.prepare(pixels)),
                              atol=1e-5)
    with pytest.raises(CbirError, match="cannot load its weights into timm's resnet18"):
        describe_encoder(file, arch="resnet18", input_shape=f"3x{SIZE}", norm="imagenet")


def test_norm_presets_and_values() -> None:
    from cbir.data.transforms import standardize
    from cbir.models.encoder_contract import parse_norm

    pixels = torch.rand(2, 1, 32, 32)
    per_image = InputContract(3, 32, *parse_norm("standardize"))
    assert torch.allclose(per_image.prepare(pixels), standardize(pixels).expand(-1, 3, -1, -1))
    xrv = InputContract(1, 32, *parse_norm("xrv"))
    assert torch.allclose(xrv.prepare(pixels), pixels * 2048 - 1024, atol=1e-3)   # torchxrayvision's range
    given = InputContract(3, 32, *parse_norm("0.485,0.456,0.406/0.229,0.224,0.225"))
    assert given == InputContract(3, 32, *NORMS["imagenet"])
    assert InputContract.from_dict(per_image.to_dict()) == per_image
    with pytest.raises(CbirError, match="2 mean values for 3 channel"):
        InputContract(3, 32, (0.1, 0.2), (1.0,))
