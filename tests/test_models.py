"""Real timm backbones: shapes, normalisation, checkpoint round trips and clear weight errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cbir.data.transforms import letterbox, standardize
from cbir.errors import CbirError
from cbir.models import ModelConfig, create_model, load_checkpoint, save_checkpoint

TINY = ModelConfig(backbone="test_resnet", image_size=32, embed_dim=16, bits=24)


def test_outputs_have_declared_sizes() -> None:
    model = create_model(TINY).eval()
    out = model(torch.randn(3, 1, 32, 32))
    assert out.embedding.shape == (3, 16 + 16 * 16) and out.logits.shape == (3, 1) and out.code.shape == (3, 24)
    assert out.semantic is not None and out.semantic.shape == (3, 16)
    assert torch.allclose(out.embedding.norm(dim=1), torch.ones(3), atol=1e-5)
    assert set(out.code.unique().tolist()) <= {0, 1}
    features = model.forward_features(torch.randn(1, 1, 32, 32))
    assert features.ndim == 4 and model.forward_head(features).embedding.shape == (1, 16)


def test_checkpoint_reloads_bit_identical(tmp_path: Path) -> None:
    from cbir.models.device import place
    model = place(create_model(TINY), "cpu").eval()   # in the memory order that loading gives it
    fingerprint = save_checkpoint(model, tmp_path / "run")
    loaded = load_checkpoint(tmp_path / "run")
    x = torch.randn(4, 1, 32, 32)
    a, b = model(x), loaded.model(x)
    assert loaded.fingerprint == fingerprint
    assert torch.equal(a.embedding, b.embedding) and torch.equal(a.code, b.code)


@pytest.mark.parametrize(("backbone", "task", "skips_init"), [
    ("test_resnet", "binary", True), ("test_vit", "hash", True), ("test_efficientnet", "multilabel", True),
    ("test_vit_relpos", "binary", False),   # non-persistent relative-position buffers: built the ordinary way
    ("test_coatnet", "binary", False),
])
def test_loading_skips_the_random_init_only_where_it_is_safe(tmp_path: Path, backbone: str, task: str,
                                                             skips_init: bool) -> None:
    """`load_checkpoint` builds a CbirNet on the meta device and assigns the weights (no random init to throw
    away) unless the backbone keeps tensors outside its state dict; either way the outputs are bit-identical."""
    from cbir.models.checkpoint import _assigned_without_init
    from cbir.models.device import place

    config = ModelConfig(backbone=backbone, task=task, image_size=32, embed_dim=16, bits=24,
                         label_names=["Effusion", "Pneumonia"] if task == "multilabel" else ["Pneumonia"])
    model = place(create_model(config), "cpu").eval()   # in the memory order that loading gives it
    save_checkpoint(model, tmp_path / "run")
    state = model.state_dict()
    assert (_assigned_without_init(config, {k: v.clone() for k, v in state.items()}) is not None) == skips_init
    loaded = load_checkpoint(tmp_path / "run")
    assert all(isinstance(p, torch.nn.Parameter) and not p.is_meta for p in loaded.model.parameters())
    assert not any(b.is_meta for b in loaded.model.buffers())
    size = model.backbone.pretrained_cfg["input_size"][-1]  # the ViTs want their own input size
    x = torch.randn(2, 1, size, size)
    with torch.inference_mode():
        a, b = model(x), loaded.model(x)
    assert torch.equal(a.embedding, b.embedding) and torch.equal(a.code, b.code) and torch.equal(a.logits, b.logits)


def test_weights_that_do_not_fit_are_one_line(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    save_checkpoint(create_model(TINY), tmp_path / "run")
    state = create_model(TINY).state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("embed.")}
    save_file(partial, str(tmp_path / "run" / "model.safetensors"))
    (tmp_path / "run" / "fingerprint").unlink()
    with pytest.raises(CbirError, match=r"model.safetensors: cannot load weights \(Error\(s\) in loading"):
        load_checkpoint(tmp_path / "run")


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    save_checkpoint(create_model(TINY), tmp_path / "run")
    (tmp_path / "run" / "fingerprint").write_text("0000000000000000\n")
    with pytest.raises(CbirError, match="fingerprint"):
        load_checkpoint(tmp_path / "run")


def test_not_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(CbirError, match="not a cbir model"):
        load_checkpoint(tmp_path)


def test_unknown_backbone_is_one_line() -> None:
    with pytest.raises(CbirError, match="unknown timm backbone"):
        create_model(ModelConfig(backbone="no_such_net"))


def test_pretrained_download_fails_clearly_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine with no network
    with pytest.raises(CbirError, match="could not .*packaged ImageNet weights.*--weights FILE") as info:
        create_model(ModelConfig(backbone="resnet10t"), pretrained=True)
    assert len(str(info.value).splitlines()) == 1


def test_local_weights_file_is_loaded(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file
    source = timm.create_model("test_resnet", in_chans=1, num_classes=0)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    model = create_model(TINY, weights=tmp_path / "w.safetensors")
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], tensor), name


def test_letterbox_keeps_boxes_in_original_coordinates() -> None:
    pixels = np.zeros((100, 200), dtype=np.float32)
    pixels[40:60, 120:160] = 1.0
    square, geo = letterbox(pixels, 64)
    assert square.shape == (64, 64)
    box = np.array([[120, 40, 40, 20]], dtype=np.float32)
    np.testing.assert_allclose(geo.to_original(geo.to_input(box)), box, atol=1e-4)
    x, y, w, h = geo.to_input(box)[0].round().astype(int)
    assert square[y + 2:y + h - 2, x + 2:x + w - 2].mean() > 0.9


def test_standardize_is_per_image() -> None:
    batch = torch.rand(2, 1, 8, 8) * torch.tensor([1.0, 10.0]).view(2, 1, 1, 1)
    out = standardize(batch)
    assert torch.allclose(out.flatten(1).mean(1), torch.zeros(2), atol=1e-5)
    assert torch.allclose(out.flatten(1).std(1), torch.ones(2), atol=1e-4)


@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet"])
def test_memory_order_changes_neither_outputs_nor_files(tmp_path: Path, backbone: str) -> None:
    """`place` (channels-last, for speed) gives the contiguous model's outputs and writes the same checkpoint."""
    from cbir.models.device import place
    config = ModelConfig(backbone=backbone, image_size=32, embed_dim=16, bits=24)
    torch.manual_seed(0)
    model = create_model(config).eval()
    x = torch.randn(4, 1, 32, 32)
    before = model(x)
    plain = save_checkpoint(model, tmp_path / "plain")
    placed = place(model, "cpu")
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in placed.parameters())
    after = placed(x)
    assert torch.allclose(before.logits, after.logits, atol=1e-5)
    assert torch.allclose(before.embedding, after.embedding, atol=1e-5)
    assert save_checkpoint(placed, tmp_path / "placed") == plain
