"""Is a finished training run already in a checkpoint folder? (`cbir reproduce --reuse`, `cbir study shift`)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def finished_run(model_dir: Path, config: dict[str, Any], settings: dict[str, Any], split: dict[str, Any]
                 ) -> float | None:
    """Training seconds of the run in `model_dir` when its config.json and train.json settings hold every given
    key's value and split.json has `split`'s spec and dataset digest; None otherwise (or when unfinished).
    A `ModelConfig` field that config.json leaves out counts as its default (as `load_checkpoint` reads it)."""
    try:
        held_config = json.loads((model_dir / "config.json").read_text())
        summary = json.loads((model_dir / "train.json").read_text())
        held_split = json.loads((model_dir / "split.json").read_text())
    except (OSError, ValueError):
        return None
    from cbir.models import ModelConfig
    held_config = {name: f.default for name, f in ModelConfig.__dataclass_fields__.items()
                   if isinstance(f.default, str | int | float)} | held_config
    held_settings = summary.get("settings") or {}
    split = _plain(split)
    same = (all(held_config.get(k) == v for k, v in _plain(config).items())
            and all(held_settings.get(k) == v for k, v in _plain(settings).items())
            and all(held_split.get(k) == split.get(k) for k in ("spec", "dataset_digest")))
    return float(summary.get("seconds") or 0.0) if same and (model_dir / "model.safetensors").exists() else None
