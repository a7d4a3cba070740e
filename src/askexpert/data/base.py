"""One in-memory shape for every data source: uint8 NHWC images plus labels.

Keeping images as uint8 arrays (and resizing on the fly in the model's input
transform) means CIFAR-100, an image folder and the generated set all look the
same to training, evaluation and serving, and a 50k×32×32 split costs 150 MB.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from askexpert.errors import DataError


@dataclass(frozen=True)
class LabeledImages:
    """A labelled image split.

    images: uint8 array (N, H, W, 3); labels: int64 (N,) fine class ids;
    class_names: one per fine class; groups: int64 (C,) coarse group of each
    fine class, or None when the source has no grouping; group_names likewise.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    groups: np.ndarray | None = None
    group_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise DataError(f"images must be uint8 (N, H, W, 3); got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"labels shape {self.labels.shape} does not match {self.images.shape[0]} images")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise DataError(f"labels fall outside 0..{len(self.class_names) - 1}")
        if self.groups is not None and self.groups.shape != (len(self.class_names),):
            raise DataError(f"groups must give one group per class ({len(self.class_names)})")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def subset(self, index: np.ndarray) -> LabeledImages:
        return LabeledImages(self.images[index], self.labels[index], self.class_names, self.groups, self.group_names)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, held_out) with `fraction` of every class held out.

    Deterministic by seed; each class keeps at least one training sample.
    """
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        held.append(idx[:n])
    held_idx = np.sort(np.concatenate(held)) if held else np.empty(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx
