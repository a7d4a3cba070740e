"""Training-time augmentation of uint8 NHWC batches.

Crop/flip is always cheap and on by default. The stronger options suit short
schedules differently (RandAugment regularises a fine-tuning that overfits;
mixup and cutmix trade clean accuracy for smoother decision boundaries), so
each is a config switch chosen on validation (README). They come from the
field's libraries: torchvision's RandAugment, timm's Mixup (which also
switches between mixup and cutmix per batch).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from askexpert.config import TrainConfig
from askexpert.errors import ConfigError


def crop_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding of 1/8 of the side) and horizontal flip of a uint8 NHWC batch."""
    b, h, w, _ = images.shape
    pad = max(1, h // 8)
    padded = F.pad(images.permute(0, 3, 1, 2), (pad, pad, pad, pad)).permute(0, 2, 3, 1)
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = oy[:, None] + torch.arange(h)
    cols = ox[:, None] + torch.arange(w)
    flip = torch.rand(b, generator=generator) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    return padded[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


@contextmanager
def token_dropout(model: nn.Module, rate: float, desc: str = "train") -> Iterator[None]:
    """While training, each image keeps a random (1 − `rate`) of its tokens after the tokenizer (timm's
    PatchDropout, Liu et al. 2023): its blocks see fewer tokens, so a step costs less and a whole model
    is regularised as by erasing. Nothing changes at inference (PatchDropout passes everything in eval
    mode, and the module is put back after training): checkpoints and exports are as without it."""
    if rate <= 0.0:
        yield
        return
    from timm.layers import PatchDropout

    backbone = getattr(model, "backbone", model)
    if not hasattr(backbone, "patch_drop"):
        raise ConfigError(f"{desc}: token_drop needs a timm VisionTransformer; {type(backbone).__name__} has no tokens")
    before = backbone.patch_drop
    backbone.patch_drop = PatchDropout(rate, num_prefix_tokens=int(getattr(backbone, "num_prefix_tokens", 0)))
    try:
        yield
    finally:
        backbone.patch_drop = before


@contextmanager
def stochastic_depth(model: nn.Module, rate: float, desc: str = "train") -> Iterator[None]:
    """While training, each block's attention and MLP branches are skipped per image with a probability
    rising linearly over depth from 0 to `rate` (stochastic depth, Huang et al. 2016; timm's DropPath and
    its `drop_path_rate` rule, as DeiT and CCT train): a regulariser for a model that overfits its many
    epochs, at no cost per step. At inference every branch runs, and the modules are put back after
    training, so checkpoints and exports are as without it."""
    if rate <= 0.0:
        yield
        return
    from timm.layers import DropPath

    blocks = list(getattr(getattr(model, "backbone", model), "blocks", []))
    if not blocks or not all(hasattr(b, "drop_path1") and hasattr(b, "drop_path2") for b in blocks):
        raise ConfigError(f"{desc}: drop_path needs a timm VisionTransformer's blocks; {type(model).__name__} has none")
    before = [(b.drop_path1, b.drop_path2) for b in blocks]
    rates = torch.linspace(0.0, rate, len(blocks)).tolist()
    for block, r in zip(blocks, rates, strict=True):
        block.drop_path1, block.drop_path2 = DropPath(r), DropPath(r)
    try:
        yield
    finally:
        for block, (first, second) in zip(blocks, before, strict=True):
            block.drop_path1, block.drop_path2 = first, second


# RandAugment draws its ops once per call: per group of 8 images rather than per image, 16 draws a
# batch of 128 for a tenth of the cost (3 against 34 ms at 32 px on our 2 cores, ~1 % of an expert step)
RANDAUGMENT_GROUP = 8


class _Transform(Protocol):
    def __call__(self, image: torch.Tensor) -> torch.Tensor: ...


class Augmenter:
    """The configured augmentation for one training job.

    `images(batch)` applies crop/flip and RandAugment (per group of 8 images) to a uint8 NHWC
    batch; `mix(batch, labels)` then applies mixup/cutmix when configured and returns
    float images with soft targets (label smoothing folded in), else the batch with
    its integer labels. RandAugment and timm's Mixup draw from torch's and numpy's
    global generators, which `seed` sets, so a job's augmentation repeats.
    """

    def __init__(self, cfg: TrainConfig, num_classes: int, seed: int) -> None:
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(seed)
        self._randaugment: _Transform | None = None
        self._mixup = None
        if cfg.randaugment_ops:
            from torchvision.transforms import v2

            torch.manual_seed(seed)
            self._randaugment = v2.RandAugment(num_ops=cfg.randaugment_ops, magnitude=cfg.randaugment_magnitude)
        if cfg.mixes:
            from timm.data import Mixup

            np.random.seed(seed % 2**32)
            self._mixup = Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                label_smoothing=cfg.label_smoothing,
                num_classes=num_classes,
            )
        self.num_classes = num_classes

    def images(self, batch: torch.Tensor) -> torch.Tensor:
        if self.cfg.augment:
            batch = crop_flip(batch, self.generator)
        if self._randaugment is not None:
            ra = self._randaugment
            nchw = batch.permute(0, 3, 1, 2).contiguous()
            batch = torch.cat([ra(group) for group in nchw.split(RANDAUGMENT_GROUP)]).permute(0, 2, 3, 1)
        return batch

    def mix(self, batch: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed float NHWC images and (batch, classes) soft targets; an odd batch's last image is left unmixed."""
        if self._mixup is None:
            return batch, labels
        even = len(batch) - len(batch) % 2
        x = batch.permute(0, 3, 1, 2).float()  # timm mixes NCHW
        soft = F.one_hot(labels, self.num_classes).float()
        soft = soft * (1.0 - self.cfg.label_smoothing) + self.cfg.label_smoothing / self.num_classes
        if even:
            mixed, mixed_targets = self._mixup(x[:even], labels[:even])
            x = torch.cat([mixed, x[even:]])
            soft = torch.cat([mixed_targets.to(soft.dtype), soft[even:]])
        return x.permute(0, 2, 3, 1), soft

    def state(self) -> dict[str, torch.Tensor]:
        """What a resumed job needs to draw the same augmentation from here on (tensors only:
        resume files load with `weights_only=True`)."""
        _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        return {
            "generator": self.generator.get_state(),
            "torch": torch.get_rng_state(),
            "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "numpy_rest": torch.tensor([float(pos), float(has_gauss), float(cached)], dtype=torch.float64),
        }

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        if "torch" in state:
            torch.set_rng_state(state["torch"])
        if "numpy_keys" in state:
            pos, has_gauss, cached = state["numpy_rest"].tolist()
            keys = state["numpy_keys"].numpy().astype(np.uint32)
            np.random.set_state(("MT19937", keys, int(pos), int(has_gauss), float(cached)))
