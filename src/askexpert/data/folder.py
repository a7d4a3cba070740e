"""Users' own images: an image-folder tree (`root/<split>/<class>/*.png|jpg`).

Listing follows torchvision's ImageFolder (sorted class folders); every image is
decoded, converted to RGB and resized to `image_size` once, into memory, and kept
for the process (the stages of one run read the same tree many times). When the
class names are CIFAR-100's, the coarse groups come from its published table, so
`superclass` partitioning works on an image-folder copy of CIFAR-100.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from askexpert.data.base import LabeledImages
from askexpert.data.cifar100 import coarse_groups
from askexpert.errors import DataError
from askexpert.progress import progress

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder


def load(root: str | Path, split: str, image_size: int, class_names: tuple[str, ...] | None = None) -> LabeledImages:
    """Load `root/split`. Pass `class_names` (e.g. from the train split) to keep ids aligned."""
    path = (Path(root) / split).resolve()
    key = (str(path), image_size, path.stat().st_mtime_ns if path.is_dir() else 0)
    if key not in _MEMO:
        while len(_MEMO) >= 4:  # train + test of the data set and of the pretraining set
            del _MEMO[next(iter(_MEMO))]
        _MEMO[key] = _read(path, image_size)
    data = _MEMO[key]
    if class_names is not None and data.class_names != class_names:
        raise DataError(f"{path}: class folders {data.class_names} differ from the training split's {class_names}")
    return data


_MEMO: dict[tuple[str, int, int], LabeledImages] = {}


def load_image(path: str | Path, size: int) -> np.ndarray:
    """One image file as uint8 (size, size, 3), any format Pillow reads; OSError naming the file otherwise."""
    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise OSError(f"{path}: not a readable image: {exc}") from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def image_listing(path: str | Path) -> ImageFolder:
    """The images of `path/<class>/` as torchvision's ImageFolder lists them (nothing decoded): what `load`
    reads, and what the budget forecast counts. DataError naming the folder where there is none."""
    from torchvision.datasets import ImageFolder

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"image folder not found: {path} (expected {path}/<class>/<image files>)")
    try:
        return ImageFolder(str(path))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{path}: {exc}") from None


def _read(path: Path, image_size: int) -> LabeledImages:
    listing = image_listing(path)
    names = tuple(listing.classes)
    images = np.empty((len(listing.samples), image_size, image_size, 3), dtype=np.uint8)
    labels = np.empty(len(listing.samples), dtype=np.int64)
    for i, (file, label) in enumerate(progress(listing.samples, desc=f"reading {path}", unit="img", leave=False)):
        try:
            images[i] = load_image(file, image_size)
        except OSError as exc:
            raise DataError(str(exc)) from None
        labels[i] = label
    coarse = coarse_groups(names)
    if coarse is None:
        return LabeledImages(images, labels, names)
    return LabeledImages(images, labels, names, coarse[0], coarse[1])
