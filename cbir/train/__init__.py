"""Training: class-weighted losses, validation AUC model selection, per-epoch logs."""

from cbir.train.loop import TrainResult, TrainSettings, train_model

__all__ = ["TrainResult", "TrainSettings", "train_model"]
