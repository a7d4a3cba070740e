"""CIFAR-100 from a local root in the standard python format, through torchvision.

torchvision reads images and fine labels; the coarse (superclass) labels and
names, which torchvision drops, are read from the same pickle files. Nothing
is downloaded unless the caller passes `download=True` explicitly.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from askexpert.data.base import LabeledImages
from askexpert.errors import DataError

FOLDER = "cifar-100-python"
HOW_TO_GET = (
    "download cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it "
    "there, or rerun with --download"
)


def _unpickle(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as fh:
            return dict(pickle.load(fh, encoding="latin1"))
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataError(f"{path}: not a readable CIFAR-100 file: {exc}") from None


def _dataset_class(verify_checksums: bool) -> type:
    from torchvision.datasets import CIFAR100

    if verify_checksums:
        return CIFAR100

    class UncheckedCIFAR100(CIFAR100):
        """Same reader; files are required to exist but not to match the official MD5 sums."""

        train_list = [[name, None] for name, _ in CIFAR100.train_list]
        test_list = [[name, None] for name, _ in CIFAR100.test_list]
        meta = {**CIFAR100.meta, "md5": None}

    return UncheckedCIFAR100


def load(root: str | Path, split: str, download: bool = False, verify_checksums: bool = True) -> LabeledImages:
    """Load `split` ('train' or 'test') from `root/cifar-100-python/`.

    torchvision checks the official files' MD5 sums; `verify_checksums=False`
    accepts other files in the same format (re-packed or subsampled copies).
    """
    root = Path(root)
    folder = root / FOLDER
    if not download and not all((folder / name).is_file() for name in ("train", "test", "meta")):
        raise DataError(f"CIFAR-100 not found: looked for train, test and meta in {folder}; {HOW_TO_GET}")
    try:
        ds = _dataset_class(verify_checksums)(str(root), train=(split == "train"), download=download)
    except RuntimeError as exc:  # torchvision's integrity check
        raise DataError(
            f"{folder}: {exc} (the files' MD5 sums differ from the official release; "
            "set data.verify_checksums: false to accept them)"
        ) from None
    raw = _unpickle(folder / split)
    meta = _unpickle(folder / "meta")
    coarse = np.asarray(raw.get("coarse_labels", []), dtype=np.int64)
    fine = np.asarray(ds.targets, dtype=np.int64)
    if coarse.shape != fine.shape:
        raise DataError(f"{folder / split}: coarse_labels missing or of the wrong length")
    num_fine = len(ds.classes)
    groups = np.full(num_fine, -1, dtype=np.int64)
    groups[fine] = coarse
    # Classes absent from a (subsampled) split keep group -1; `askexpert.data` takes the train split's.
    coarse_names = meta.get("coarse_label_names")
    if not isinstance(coarse_names, list):
        raise DataError(f"{folder / 'meta'}: no coarse_label_names")
    return LabeledImages(np.ascontiguousarray(ds.data), fine, tuple(ds.classes), groups, tuple(coarse_names))


# CIFAR-100's published fine → coarse table (Krizhevsky 2009): 20 superclasses of 5 classes each.
COARSE_TABLE: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}


def coarse_groups(class_names: tuple[str, ...]) -> tuple[np.ndarray, tuple[str, ...]] | None:
    """Coarse group of each class when the names are exactly CIFAR-100's fine labels (else None)."""
    group_names = tuple(COARSE_TABLE)
    of = {fine: g for g, name in enumerate(group_names) for fine in COARSE_TABLE[name]}
    if set(class_names) != set(of):
        return None
    return np.asarray([of[c] for c in class_names], dtype=np.int64), group_names
