"""Models: any timm backbone with an L2-normalised embedding head, a classifier and a binary code."""

from cbir.models.checkpoint import LoadedModel, load_checkpoint, save_checkpoint
from cbir.models.factory import CbirNet, ModelConfig, ModelOutput, create_model, decode_size
from cbir.models.tasks import TASKS, Task, get_task, register_task  # registers the four tasks

__all__ = ["CbirNet", "ModelConfig", "ModelOutput", "create_model", "decode_size", "LoadedModel", "load_checkpoint",
           "save_checkpoint", "TASKS", "Task", "get_task", "register_task"]
