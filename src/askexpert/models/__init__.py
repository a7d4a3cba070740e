"""Model presets (a registry of timm constructors), checkpoints and batched prediction.

Importing this package costs no torch: the edge reads checkpoint metadata
(`models.meta`) and runs the exported generalist (`models.onnx_runtime`) without
the training stack. The names below that need torch load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from askexpert.models.meta import CheckpointMeta, read_meta

if TYPE_CHECKING:
    from askexpert.models.checkpoint import load_checkpoint, save_checkpoint
    from askexpert.models.predict import TorchGeneralist, predict_logits, resolve_device
    from askexpert.models.registry import ImageClassifier, ModelPreset, create_model, get_preset, presets

_NEEDS_TORCH = {
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "TorchGeneralist": "predict",
    "predict_logits": "predict",
    "resolve_device": "predict",
    "ImageClassifier": "registry",
    "ModelPreset": "registry",
    "create_model": "registry",
    "get_preset": "registry",
    "presets": "registry",
}

__all__ = [
    "CheckpointMeta",
    "ImageClassifier",
    "ModelPreset",
    "TorchGeneralist",
    "create_model",
    "get_preset",
    "load_checkpoint",
    "predict_logits",
    "presets",
    "read_meta",
    "resolve_device",
    "save_checkpoint",
]


def __getattr__(name: str) -> Any:
    module = _NEEDS_TORCH.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
