"""Models: any timm backbone with an L2-normalised embedding head, a classifier and a binary code."""

from cbir.models.checkpoint import LoadedModel, load_checkpoint, save_checkpoint
from cbir.models.factory import CbirNet, ModelConfig, ModelOutput, create_model

__all__ = ["CbirNet", "ModelConfig", "ModelOutput", "create_model", "LoadedModel", "load_checkpoint",
           "save_checkpoint"]
