"""Model presets (a registry of timm constructors), checkpoints and batched prediction."""

from askexpert.models.checkpoint import CheckpointMeta, load_checkpoint, read_meta, save_checkpoint
from askexpert.models.predict import predict_logits, resolve_device
from askexpert.models.registry import ImageClassifier, ModelPreset, create_model, get_preset, presets

__all__ = [
    "CheckpointMeta",
    "ImageClassifier",
    "ModelPreset",
    "create_model",
    "get_preset",
    "load_checkpoint",
    "predict_logits",
    "presets",
    "read_meta",
    "resolve_device",
    "save_checkpoint",
]
