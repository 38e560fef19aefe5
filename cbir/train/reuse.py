"""Is a finished training run already in a checkpoint folder? (`cbir reproduce --reuse`, `cbir study shift`)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: What a run trained before a `TrainSettings` field existed did, where that is not the field's default now.
BEFORE_FIELD = {"average_runs": 1}


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def finished_run(model_dir: Path, config: dict[str, Any], settings: dict[str, Any], split: dict[str, Any]
                 ) -> float | None:
    """Training seconds of the run in `model_dir` when its config.json and train.json settings hold every given
    key's value and split.json has `split`'s spec, patient rule and images (`cbir.data.splits.same_data`); None
    otherwise (or when unfinished).
    A `ModelConfig` field that config.json leaves out counts as its default (as `load_checkpoint` reads it), and so
    does a `TrainSettings` field that train.json leaves out (a run trained before the field existed; `BEFORE_FIELD`
    says what such a run did where today's default differs)."""
    try:
        held_config = json.loads((model_dir / "config.json").read_text())
        summary = json.loads((model_dir / "train.json").read_text())
        held_split = json.loads((model_dir / "split.json").read_text())
    except (OSError, ValueError):
        return None
    from dataclasses import asdict

    from cbir.data.splits import same_data
    from cbir.models import ModelConfig
    as_read = {k: v for k, v in asdict(ModelConfig.from_dict({})).items() if isinstance(v, str | int | float)}
    held_config = as_read | held_config
    from cbir.train.settings import TrainSettings
    held_settings = _plain(asdict(TrainSettings())) | BEFORE_FIELD | (summary.get("settings") or {})
    split = _plain(split)
    same = (all(held_config.get(k) == v for k, v in _plain(config).items())
            and all(held_settings.get(k) == v for k, v in _plain(settings).items())
            and all(held_split.get(k) == split.get(k) for k in ("spec", "patient_rule"))
            and same_data(held_split, split))
    return float(summary.get("seconds") or 0.0) if same and (model_dir / "model.safetensors").exists() else None


def refit_appearance(model_dir: Path, records: Any, fields: dict[str, Any], workers: int = 2) -> float:
    """Give the finished run in `model_dir` the appearance part (`cbir.models.appearance`) that the config
    `fields` (appearance_size, _weight, _window) describe, fitted on the train split of `records`, and save it in
    place; returns the seconds it took.

    The appearance part depends on the training images only, never on the trained weights, so a run trained
    without it gets exactly the model that training with it would have given (same seed, same weights).
    """
    import time

    from cbir.console import QUIET
    from cbir.data.transforms import model_input
    from cbir.models import CbirNet, ModelConfig, decode_size, load_checkpoint
    from cbir.models.checkpoint import save_checkpoint
    from cbir.train.loop import TrainSettings, preload

    started = time.perf_counter()
    old = load_checkpoint(model_dir)
    config = ModelConfig.from_dict(old.config.to_dict() | fields)
    model = CbirNet(config)
    state = {k: v for k, v in old.model.state_dict().items() if k != "code_projection"}
    model.load_state_dict(state, strict=False)
    x_train, _, _ = preload(records.split("train"), config.image_size, TrainSettings(workers=workers), QUIET,
                            "train", decode_size(config))
    if model.appearance is not None:
        model.appearance.fit(x_train, lambda batch: model_input(batch, config.intensity))
    save_checkpoint(model.eval(), model_dir)
    return time.perf_counter() - started


def refit_calibration(model_dir: Path, records: Any, workers: int = 2) -> float:
    """Give the finished CbirNet run in `model_dir` that has no valid calibration.json (trained before `cbir train`
    fitted the probability calibration, `cbir.train.calibration_fit`, or given a new appearance part since, which
    changed its fingerprint) one, fitted on the val split of `records` as training would have; returns the seconds
    it took (0 when the val split is too small to fit one, as training leaves it). A run that has one, or of
    another task (a detector), is left as it is."""
    import time

    from cbir.console import QUIET
    from cbir.models import decode_size, load_checkpoint
    from cbir.models.detector_config import DetectorConfig
    from cbir.train.calibration_fit import fit_on
    from cbir.train.loop import TrainSettings, preload

    started = time.perf_counter()
    loaded = load_checkpoint(model_dir)
    if isinstance(loaded.config, DetectorConfig) or loaded.calibration is not None:
        return 0.0
    val = records.split("val")
    x_val, keep, _ = preload(val, loaded.config.image_size, TrainSettings(workers=workers), QUIET, "val",
                             decode_size(loaded.config))
    fitted = fit_on(model_dir, x_val, loaded.task.targets(val)[keep]) if len(keep) else None
    return time.perf_counter() - started if fitted is not None else 0.0   # nothing to fit: the run is as trained


def reusable_run(model_dir: Path, config: dict[str, Any], settings: dict[str, Any], records: Any) -> float | None:
    """`finished_run` for a CbirNet config, also accepting a run that lacks only the asked-for appearance part
    (`config`'s appearance_* fields), which is then fitted in place (`refit_appearance`). A run that has no
    valid calibration.json gets it (`refit_calibration`)."""
    previous = _reusable(model_dir, config, settings, records)
    return None if previous is None else previous + refit_calibration(model_dir, records)


def _reusable(model_dir: Path, config: dict[str, Any], settings: dict[str, Any], records: Any) -> float | None:
    split = records.split_record()
    previous = finished_run(model_dir, config, settings, split)
    fields = {k: v for k, v in config.items() if k.startswith("appearance_")}
    size, weight = fields.get("appearance_size", 0), fields.get("appearance_weight", 0.0)
    if previous is not None or not (size and weight):
        return previous
    rest = {k: v for k, v in config.items() if k not in fields}
    try:
        held = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if "appearance_size" in held:  # it has another appearance part: train afresh
        return None
    previous = finished_run(model_dir, rest, settings, split)
    if previous is None:
        return None
    return previous + refit_appearance(model_dir, records, fields)
