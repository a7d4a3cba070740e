"""A generated data set with CIFAR-100's shape and, on purpose, its group structure.

How an image is made (all deterministic from the seed):

* each **group** g has a template: a smooth colour field, the sum of a few
  low-frequency (1-2.5 cycles per image) cosine waves with random direction,
  phase and RGB mix. Templates of different groups are unrelated, so groups
  are easy to tell apart;
* each **fine class** c of group g adds a *detail* pattern: mid-frequency
  (3-6 cycles) waves scaled by ``class_strength`` (< 1). Classes of one group
  share the template and differ only in this detail, so they are confusable;
  a small model learns the groups first and mixes up classes inside them;
* every **sample** gets nuisance: random scale (0.8-1.2), shift (±12% of the
  side), rotation (±12°), per-channel gain and offset jitter, and Gaussian
  pixel noise of std ``noise``.

It is the embedded default and the test data. It exercises the mechanism the
paper relies on (errors concentrate inside groups of related classes) but it
is **not** a stand-in for CIFAR-100 accuracies.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from askexpert.config import SynthConfig
from askexpert.data.base import LabeledImages
from askexpert.errors import DataError

FORMAT = "askexpert.synth/1"


def _wave_field(rng: np.random.Generator, size: int, n_waves: int, freq: tuple[float, float]) -> np.ndarray:
    """A (size, size, 3) sum of random cosine waves, each with its own colour mix."""
    coords = np.linspace(0.0, 1.0, size, endpoint=False)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    field = np.zeros((size, size, 3))
    for _ in range(n_waves):
        f = rng.uniform(*freq)
        theta = rng.uniform(0, np.pi)
        phase = rng.uniform(0, 2 * np.pi)
        colour = rng.normal(size=3)
        wave = np.cos(2 * np.pi * f * (np.cos(theta) * xx + np.sin(theta) * yy) + phase)
        field += wave[..., None] * colour
    return field / np.sqrt(n_waves)


def _class_prototypes(cfg: SynthConfig) -> np.ndarray:
    """(C, 3, S, S) float32 prototypes in roughly [-1.5, 1.5]."""
    rng = np.random.default_rng([cfg.seed, 1])
    size = cfg.image_size
    protos = []
    for _ in range(cfg.num_groups):
        base = _wave_field(rng, size, 3, (1.0, 2.5)) + rng.normal(scale=0.5, size=3)
        for _ in range(cfg.classes_per_group):
            detail = _wave_field(rng, size, 3, (3.0, 6.0))
            protos.append(base + cfg.class_strength * detail)
    return np.stack(protos).transpose(0, 3, 1, 2).astype(np.float32)


def _render(protos: torch.Tensor, labels: np.ndarray, cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Warp, jitter and noise prototypes into uint8 NHWC samples, in batches."""
    out = np.empty((len(labels), cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    for start in range(0, len(labels), 2048):
        lab = labels[start : start + 2048]
        n = len(lab)
        scale = rng.uniform(0.8, 1.2, n)
        angle = np.deg2rad(rng.uniform(-12, 12, n))
        shift = rng.uniform(-0.24, 0.24, (n, 2))
        theta = np.zeros((n, 2, 3), dtype=np.float32)
        theta[:, 0, 0] = np.cos(angle) / scale
        theta[:, 0, 1] = -np.sin(angle) / scale
        theta[:, 1, 0] = np.sin(angle) / scale
        theta[:, 1, 1] = np.cos(angle) / scale
        theta[:, :, 2] = shift
        src = protos[torch.from_numpy(lab)]
        grid = F.affine_grid(torch.from_numpy(theta), list(src.shape), align_corners=False)
        x = F.grid_sample(src, grid, mode="bilinear", padding_mode="reflection", align_corners=False).numpy()
        gain = rng.uniform(0.8, 1.2, (n, 3, 1, 1))
        offset = rng.normal(scale=0.15, size=(n, 3, 1, 1))
        x = 0.5 + 0.25 * (x * gain + offset)
        x = x + rng.normal(scale=cfg.noise, size=x.shape)
        out[start : start + n] = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return out


def class_names(cfg: SynthConfig) -> tuple[tuple[str, ...], tuple[str, ...], np.ndarray]:
    groups = tuple(f"group{g:02d}" for g in range(cfg.num_groups))
    names = tuple(f"g{g:02d}_c{c}" for g in range(cfg.num_groups) for c in range(cfg.classes_per_group))
    group_of = np.repeat(np.arange(cfg.num_groups), cfg.classes_per_group).astype(np.int64)
    return names, groups, group_of


def generate(cfg: SynthConfig) -> dict[str, LabeledImages]:
    """Make the train and test splits in memory (deterministic by `cfg.seed`)."""
    protos = torch.from_numpy(_class_prototypes(cfg))
    names, groups, group_of = class_names(cfg)
    num_classes = len(names)
    splits = {}
    for i, (split, per_class) in enumerate((("train", cfg.train_per_class), ("test", cfg.test_per_class))):
        rng = np.random.default_rng([cfg.seed, 2, i])
        labels = np.repeat(np.arange(num_classes), per_class).astype(np.int64)
        rng.shuffle(labels)
        images = _render(protos, labels, cfg, rng)
        splits[split] = LabeledImages(images, labels, names, group_of, groups)
    return splits


def write(cfg: SynthConfig, out: str | Path) -> Path:
    """Generate and store as `train.npz`, `test.npz` and `meta.json` under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = generate(cfg)
    for split, data in splits.items():
        np.savez_compressed(out / f"{split}.npz", images=data.images, labels=data.labels)
    train = splits["train"]
    assert train.groups is not None and train.group_names is not None
    meta = {
        "format": FORMAT,
        "config": cfg.model_dump(),
        "class_names": list(train.class_names),
        "group_names": list(train.group_names),
        "groups": train.groups.tolist(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return out


def read(root: str | Path, split: str) -> LabeledImages:
    """Load one split written by `write`, with clear errors for a missing or foreign folder."""
    root = Path(root)
    meta_path, arr_path = root / "meta.json", root / f"{split}.npz"
    if not meta_path.is_file() or not arr_path.is_file():
        raise DataError(
            f"{root}: no generated data set here (need meta.json and {split}.npz); "
            f"create one with `askexpert data synth --out {root}`"
        )
    try:
        meta = json.loads(meta_path.read_text())
        with np.load(arr_path) as arrays:
            images, labels = arrays["images"], arrays["labels"].astype(np.int64)
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{arr_path}: unreadable generated data set: {exc}") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return LabeledImages(
        images,
        labels,
        tuple(meta["class_names"]),
        np.asarray(meta["groups"], dtype=np.int64),
        tuple(meta["group_names"]),
    )


def stored_config(root: str | Path) -> SynthConfig | None:
    """The generator settings a stored set was made with (None if absent)."""
    path = Path(root) / "meta.json"
    if not path.is_file():
        return None
    try:
        return SynthConfig.model_validate(json.loads(path.read_text())["config"])
    except (ValueError, KeyError) as exc:
        raise DataError(f"{path}: unreadable metadata: {exc}") from None
