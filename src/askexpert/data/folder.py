"""Users' own images: an image-folder tree (`root/<split>/<class>/*.png|jpg`).

Listing follows torchvision's ImageFolder (sorted class folders); every image is
decoded, converted to RGB and resized to `image_size` once, into memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from askexpert.data.base import LabeledImages
from askexpert.errors import DataError


def load(root: str | Path, split: str, image_size: int, class_names: tuple[str, ...] | None = None) -> LabeledImages:
    """Load `root/split`. Pass `class_names` (e.g. from the train split) to keep ids aligned."""
    from torchvision.datasets import ImageFolder

    path = Path(root) / split
    if not path.is_dir():
        raise DataError(f"image folder not found: {path} (expected {path}/<class>/<image files>)")
    try:
        listing = ImageFolder(str(path))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{path}: {exc}") from None
    names = tuple(listing.classes)
    if class_names is not None and names != class_names:
        raise DataError(f"{path}: class folders {names} differ from the training split's {class_names}")
    images = np.empty((len(listing.samples), image_size, image_size, 3), dtype=np.uint8)
    labels = np.empty(len(listing.samples), dtype=np.int64)
    for i, (file, label) in enumerate(tqdm(listing.samples, desc=f"reading {path}", unit="img", leave=False)):
        try:
            with Image.open(file) as img:
                rgb = img.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"{file}: not a readable image: {exc}") from None
        if rgb.size != (image_size, image_size):
            rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
        images[i] = np.asarray(rgb)
        labels[i] = label
    return LabeledImages(images, labels, names)
