"""Model presets: one registry from names to timm constructors.

Paper scale uses timm's DeiT-Tiny (edge generalist) and DeiT-Small (near-edge
experts) at 224 px, as in the paper. CPU scale keeps timm's VisionTransformer
but at 32×32 with 4×4 patches and far fewer channels/blocks, so the whole
demo trains in minutes on 2 cores. `micro-*` presets exist for tests.

Every model is wrapped in `ImageClassifier`, which takes **uint8 NHWC images**
and does the resize/normalise itself: training, evaluation, serving and ONNX
export then share one input format and cannot disagree on preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from askexpert.errors import CheckpointError, ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ModelPreset:
    name: str
    timm_name: str
    img_size: int
    role: str  # "generalist" or "expert": documentation and a sanity check
    kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = HALF
    std: tuple[float, float, float] = HALF
    note: str = ""


_PRESETS: dict[str, ModelPreset] = {}


def register(preset: ModelPreset) -> ModelPreset:
    if preset.name in _PRESETS:
        raise ValueError(f"preset {preset.name!r} registered twice")
    _PRESETS[preset.name] = preset
    return preset


def _cifar_vit(name: str, role: str, dim: int, depth: int, heads: int, note: str) -> ModelPreset:
    return ModelPreset(
        name,
        "vit_tiny_patch16_224",
        32,
        role,
        dict(img_size=32, patch_size=4, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=2.0),
        note=note,
    )


register(
    _cifar_vit("cpu-generalist", "generalist", 64, 3, 2, "ViT 32px/p4, dim 64, 3 blocks: the CPU-scale edge model")
)
register(_cifar_vit("cpu-expert", "expert", 96, 3, 3, "ViT 32px/p4, dim 96, 3 blocks: the CPU-scale expert"))
register(_cifar_vit("micro-generalist", "generalist", 16, 1, 2, "for tests only"))
register(_cifar_vit("micro-expert", "expert", 24, 1, 2, "for tests only"))
register(
    ModelPreset(
        "deit-tiny",
        "deit_tiny_patch16_224",
        224,
        "generalist",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        note="paper scale: DeiT-Tiny/16 at 224 px (5.7M parameters)",
    )
)
register(
    ModelPreset(
        "deit-small",
        "deit_small_patch16_224",
        224,
        "expert",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        note="paper scale: DeiT-Small/16 at 224 px (22M parameters)",
    )
)


def presets() -> dict[str, ModelPreset]:
    return dict(_PRESETS)


def get_preset(name: str) -> ModelPreset:
    try:
        return _PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(sorted(_PRESETS))}") from None


class ImageClassifier(nn.Module):
    """A timm backbone behind a uint8 NHWC input: resize, scale, normalise, classify."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, preset: ModelPreset, backbone: nn.Module) -> None:
        super().__init__()
        self.preset_name = preset.name
        self.img_size = preset.img_size
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(preset.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(preset.std).view(1, 3, 1, 1) * 255, persistent=False)

    @property
    def num_outputs(self) -> int:
        return int(getattr(self.backbone, "num_classes"))  # noqa: B009  (timm sets it; nn.Module hides the type)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", antialias=True)
        x = (x - self.mean) / self.std
        return self.backbone(x.contiguous(memory_format=torch.channels_last))


def create_model(preset_name: str, num_outputs: int, pretrained_file: str | Path | None = None) -> ImageClassifier:
    """Build a preset with `num_outputs` logits; optionally start from a local timm/safetensors file.

    Never touches the network: pretrained weights come only from `pretrained_file`.
    """
    preset = get_preset(preset_name)
    kwargs: dict[str, Any] = dict(preset.kwargs, num_classes=num_outputs)
    if pretrained_file is not None:
        path = Path(pretrained_file).expanduser()
        if not path.is_file():
            raise CheckpointError(f"pretrained weights not found: {path}")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(path), hf_hub_id=None, url=None)
        try:
            backbone = timm.create_model(preset.timm_name, pretrained=True, **kwargs)
        except (RuntimeError, ValueError, OSError) as exc:
            raise CheckpointError(f"{path}: cannot load as {preset.timm_name} weights: {exc}") from None
    else:
        backbone = timm.create_model(preset.timm_name, pretrained=False, **kwargs)
    return ImageClassifier(preset, backbone)
