"""Model presets: one registry from names to timm constructors.

Paper scale uses timm's DeiT-Tiny (edge generalist) and DeiT-Small (near-edge
experts) at 224 px, as in the paper. CPU scale keeps timm's VisionTransformer
but at 32×32 with 4×4 patches and far fewer channels/blocks, so the whole
demo trains in minutes on 2 cores. The `cpu-cct-*` pair replaces the 4×4 patch
embedding with a small convolutional tokenizer and the class token with pooling over
the tokens (after Hassani et al. 2021, "Escaping the Big Data Paradigm with Compact
Transformers"): both are timm `VisionTransformer` hooks (`embed_layer`,
`global_pool`, `class_token=False`), so the registry still has one verb. Mean pooling,
not timm's attention pooling ('map'), because in our few-epoch budget it trained
faster (README "Models": +4.8 points on validation after 3 epochs).
`micro-*` presets exist for tests.

Every model is wrapped in `ImageClassifier`, which takes **uint8 NHWC images**
and does the resize/normalise itself: training, evaluation, serving and ONNX
export then share one input format and cannot disagree on preprocessing.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import timm.models.vision_transformer
import torch
import torch.nn.functional as F
from torch import nn

from askexpert.errors import CheckpointError, ConfigError

log = logging.getLogger("askexpert")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ModelPreset:
    name: str
    timm_name: str
    img_size: int
    role: str  # "generalist" or "expert": which side of the pair it is built for (listed by `presets`; not enforced)
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


class ConvTokenizer(nn.Module):
    """Conv3x3-MaxPool-ReLU layers → one token per cell of the last map (NLC), in place of PatchEmbed.

    Small images carry little per 4×4 patch; overlapping convolutions give every token a
    local, translation-equivariant summary first (CCT reports about +2 points at equal
    cost on CIFAR-100). Channels rise to `embed_dim` over the layers (half of it before).
    The convolutions start from He (Kaiming) normal weights, as CCT's tokenizer does: timm
    initialises only the linear layers, and PyTorch's default conv scale trained slower
    here (+2.1 points on validation after 3 epochs with He init).
    Takes VisionTransformer's `embed_layer` arguments; `patch_size` is implied by `layers`.
    """

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 64,
        bias: bool = True,
        dynamic_img_pad: bool = False,
        layers: int = 2,
        **_: Any,
    ) -> None:
        super().__init__()
        widths = [in_chans] + [embed_dim // 2 ** (layers - 1 - i) for i in range(layers)]
        stem: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
            # pooling before the ReLU: the same values and gradients (max and ReLU commute), but the
            # ReLU and its backward touch a quarter of the elements: a training step of the cpu-cct pair
            # 7-10 % faster on this project's CPU (README "Real CIFAR-100", step 7), the trained weights
            # identical to the bit. The layers with weights keep their indices (stem.0, stem.3).
            stem += [conv, nn.MaxPool2d(3, stride=2, padding=1), nn.ReLU(inplace=True)]
        self.stem = nn.Sequential(*stem)
        side = img_size // 2**layers
        self.img_size = (img_size, img_size)
        self.grid_size = (side, side)
        self.num_patches = side * side
        self.patch_size = (2**layers, 2**layers)
        self.dynamic_img_size = False

    def feat_ratio(self, as_scalar: bool = True) -> int:
        return self.patch_size[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x).flatten(2).transpose(1, 2)


POOLS = ("map", "avg", "token")


def conv_vit(
    name: str,
    role: str,
    dim: int,
    depth: int,
    heads: int,
    note: str,
    img_size: int = 32,
    tokenizer_layers: int = 2,
    pool: str = "avg",
    mlp_ratio: float = 2.0,
) -> ModelPreset:
    """A ViT with the convolutional tokenizer and pooled tokens; options checked here, one line each."""
    if pool not in POOLS:
        raise ConfigError(f"preset {name!r}: pool {pool!r} is not one of {', '.join(POOLS)}")
    if not 1 <= tokenizer_layers <= 4:
        raise ConfigError(f"preset {name!r}: tokenizer_layers={tokenizer_layers} is outside 1..4")
    if img_size % 2**tokenizer_layers:
        raise ConfigError(
            f"preset {name!r}: img_size={img_size} is not divisible by 2**tokenizer_layers={2**tokenizer_layers}"
        )
    if dim % heads or dim % 2 ** (tokenizer_layers - 1):
        raise ConfigError(f"preset {name!r}: dim={dim} must divide by heads={heads} and the tokenizer's halvings")
    kwargs: dict[str, Any] = dict(
        img_size=img_size,
        patch_size=2**tokenizer_layers,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp_ratio,
        embed_layer=functools.partial(ConvTokenizer, layers=tokenizer_layers),
        class_token=pool == "token",
        global_pool=pool,
    )
    return ModelPreset(name, "vit_tiny_patch16_224", img_size, role, kwargs, note=note)


# The CPU pair keeps the paper's proportions: DeiT-S costs 3.95x DeiT-T's FLOPs (torch's counter),
# and doubling the width at equal depth and tokens gives 3.95x here too (`askexpert presets` prints both).
register(
    _cifar_vit("cpu-generalist", "generalist", 64, 4, 2, "ViT 32px/p4, dim 64, 4 blocks: the CPU-scale edge model")
)
register(
    _cifar_vit("cpu-expert", "expert", 128, 4, 4, "ViT 32px/p4, dim 128, 4 blocks: the CPU-scale expert (3.95x FLOPs)")
)
register(
    conv_vit(
        "cpu-cct-generalist",
        "generalist",
        64,
        4,
        2,
        "conv tokenizer (2 layers → 8×8 tokens), mean pooling, dim 64, 4 blocks: the stronger edge model",
    )
)
register(
    conv_vit(
        "cpu-cct-expert",
        "expert",
        128,
        4,
        4,
        "conv tokenizer, mean pooling, dim 128, 4 blocks: the stronger expert (3.9x FLOPs)",
    )
)
# Paper widths (DeiT-T: 192/3 heads, DeiT-S: 384/6 heads, 12 blocks) on 32-px images with the tokenizer,
# for one GPU (configs/cifar100-gpu.yaml): 64 tokens instead of 196, no 224-px resize of a 32-px image.
register(conv_vit("gpu-cct-tiny", "generalist", 192, 12, 3, "DeiT-T widths, conv tokenizer, 32 px: one-GPU edge"))
register(conv_vit("gpu-cct-small", "expert", 384, 12, 6, "DeiT-S widths, conv tokenizer, 32 px: one-GPU expert"))
register(_cifar_vit("micro-generalist", "generalist", 16, 1, 2, "for tests only"))
register(_cifar_vit("micro-expert", "expert", 24, 1, 2, "for tests only"))
register(conv_vit("micro-cct-generalist", "generalist", 16, 1, 2, "for tests only"))
register(conv_vit("micro-cct-expert", "expert", 24, 1, 2, "for tests only"))
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
        self.init_report: WeightsReport | None = None

    @property
    def num_outputs(self) -> int:
        return int(getattr(self.backbone, "num_classes"))  # noqa: B009  (timm sets it; nn.Module hides the type)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", antialias=True)
        x = (x - self.mean) / self.std
        return self.backbone(x.contiguous(memory_format=torch.channels_last))


def model_cost(preset_name: str, num_outputs: int = 100) -> dict[str, float]:
    """Parameters and forward FLOPs for one image (torch's FLOP counter: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    preset = get_preset(preset_name)
    model = create_model(preset_name, num_outputs)
    images = torch.zeros(1, preset.img_size, preset.img_size, 3, dtype=torch.uint8)
    model.eval().requires_grad_(False)  # not no_grad(): timm's latent pooling trips the counter's module hooks there
    with FlopCounterMode(display=False) as counter:
        model(images)
    return {"params": float(sum(p.numel() for p in model.parameters())), "flops": float(counter.get_total_flops())}


@dataclass(frozen=True)
class WeightsReport:
    """What `load_backbone_weights` took from a file: the number says it really loaded something."""

    path: str
    loaded: int  # tensors copied into the model
    total: int  # tensors the model has
    head_left_out: tuple[str, ...]  # the classifier tensors kept at their fresh initialisation

    def describe(self) -> str:
        head = f"; head left at init ({', '.join(self.head_left_out)})" if self.head_left_out else ""
        return f"{self.path}: loaded {self.loaded} of {self.total} tensors{head}"


_PREFIXES = ("backbone.", "module.", "model.")


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file (tensors only, never arbitrary pickles)."""
    try:
        if path.suffix == ".safetensors":
            import safetensors.torch

            state: Any = safetensors.torch.load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip errors have no common base
        raise CheckpointError(f"{path}: not a readable weights file: {exc}") from None
    for key in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    out = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        out[key] = value
    return out


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> WeightsReport:
    """Copy a pretrained body into `backbone`; only the classifier head may be left out.

    An empty file, another architecture or a shape mismatch in the body is an
    error naming the file: a wrong weights file must never leave the model at
    its random initialisation without a word.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"pretrained weights not found: {path}")
    state = _read_state(path)
    if not state:
        raise CheckpointError(f"{path}: holds no tensors")
    filter_fn = getattr(timm.models.vision_transformer, "checkpoint_filter_fn", None)
    if filter_fn is not None and hasattr(backbone, "pos_embed"):
        try:  # timm's own conversion: resizes position embeddings, maps original-repo key names
            state = filter_fn(state, backbone)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot adapt to this model: {exc}") from None
    expected = backbone.state_dict()
    head_prefixes = tuple(
        f"{name}." for name in ([getattr(backbone, "pretrained_cfg", {}).get("classifier") or "head"])
    )
    is_head = [k for k in expected if k.startswith(head_prefixes)]
    body = [k for k in expected if k not in is_head]
    missing = [k for k in body if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not match the model's body: {len(missing)} of {len(body)} tensors missing "
            f"({', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}), {len(unexpected)} unexpected "
            f"({', '.join(unexpected[:3])}{'...' if len(unexpected) > 3 else ''})"
        )
    take = {}
    for key in expected:
        if key not in state:
            continue
        if tuple(state[key].shape) != tuple(expected[key].shape):
            if key in is_head:
                continue  # another class count: the head is replaced
            raise CheckpointError(
                f"{path}: tensor {key} has shape {tuple(state[key].shape)}, "
                f"the model needs {tuple(expected[key].shape)}"
            )
        take[key] = state[key]
    backbone.load_state_dict(take, strict=False)
    left = tuple(k for k in is_head if k not in take)
    return WeightsReport(str(path), len(take), len(expected), left)


def create_model(preset_name: str, num_outputs: int, pretrained_file: str | Path | None = None) -> ImageClassifier:
    """Build a preset with `num_outputs` logits; optionally start from a local weights file.

    Never touches the network: pretrained weights come only from `pretrained_file`
    (timm weights, or an askexpert checkpoint such as `train backbone` writes); the
    classifier head is replaced when the class count differs. What was loaded is
    logged and kept on the model as `init_report`.
    """
    preset = get_preset(preset_name)
    kwargs: dict[str, Any] = dict(preset.kwargs, num_classes=num_outputs)
    backbone = timm.create_model(preset.timm_name, pretrained=False, **kwargs)
    model = ImageClassifier(preset, backbone)
    if pretrained_file is not None:
        report = load_backbone_weights(backbone, pretrained_file)
        log.info("%s", report.describe())
        model.init_report = report
    return model
