import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from askexpert.config import DataConfig
from askexpert.data import cifar100, folder, load_splits, stratified_split
from askexpert.errors import DataError


def _write_cifar100(root: Path, n_train: int = 30, n_test: int = 10) -> dict[str, np.ndarray]:
    """A small CIFAR-100 in the real python format (pickled dicts, rows of 3072 CHW bytes)."""
    rng = np.random.default_rng(0)
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    fine_names = [f"fine{i}" for i in range(100)]
    coarse_of = np.arange(100) // 5
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        fine = (
            np.concatenate([np.arange(100), rng.integers(0, 100, n)]) if split == "train" else rng.integers(0, 100, n)
        )
        chw = rng.integers(0, 256, (len(fine), 3, 32, 32), dtype=np.uint8)
        entry = {
            "filenames": [f"{i}.png" for i in range(len(fine))],
            "batch_label": split,
            "fine_labels": fine.tolist(),
            "coarse_labels": coarse_of[fine].tolist(),
            "data": chw.reshape(len(fine), -1),
        }
        with (base / split).open("wb") as fh:
            pickle.dump(entry, fh)
        arrays[split] = chw
        arrays[split + "_fine"] = fine
    with (base / "meta").open("wb") as fh:
        pickle.dump({"fine_label_names": fine_names, "coarse_label_names": [f"coarse{i}" for i in range(20)]}, fh)
    return arrays


def test_cifar100_reads_the_real_format(tmp_path: Path) -> None:
    ref = _write_cifar100(tmp_path)
    data = cifar100.load(tmp_path, "train", verify_checksums=False)
    assert data.images.shape == (130, 32, 32, 3)
    assert np.array_equal(data.images, ref["train"].transpose(0, 2, 3, 1))
    assert np.array_equal(data.labels, ref["train_fine"])
    assert data.class_names[7] == "fine7" and data.group_names is not None and data.group_names[3] == "coarse3"
    assert data.groups is not None and data.groups.tolist() == (np.arange(100) // 5).tolist()


def test_cifar100_checksum_and_missing_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="looked for train, test and meta.*--download"):
        cifar100.load(tmp_path, "train")
    _write_cifar100(tmp_path)
    with pytest.raises(DataError, match="verify_checksums: false"):
        cifar100.load(tmp_path, "train")


def test_cifar100_through_the_data_config(tmp_path: Path) -> None:
    _write_cifar100(tmp_path / "c100")
    cfg = DataConfig(source="cifar100", root=str(tmp_path / "c100"), verify_checksums=False)
    splits = load_splits(cfg, tmp_path)
    assert len(splits.train) + len(splits.val) == 130 and len(splits.test) == 10


def test_image_folder_source(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for c, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 40), colour).save(tmp_path / split / c / f"{i}.png")
    train = folder.load(tmp_path, "train", 32)
    assert train.class_names == ("cat", "dog") and train.images.shape == (6, 32, 32, 3)
    assert train.images[train.labels == 0][..., 0].min() == 255
    (tmp_path / "test" / "dog" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.png: not a readable image"):
        folder.load(tmp_path, "test", 32, train.class_names)
    with pytest.raises(DataError, match="image folder not found"):
        folder.load(tmp_path, "val", 32)


def test_stratified_split_holds_out_every_class() -> None:
    labels = np.repeat(np.arange(5), 10)
    train, held = stratified_split(labels, 0.2, seed=1)
    assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == 50
    assert np.bincount(labels[held]).tolist() == [2] * 5
    assert np.array_equal(stratified_split(labels, 0.2, seed=1)[1], held)


def test_image_folder_with_cifar100_names_gets_the_coarse_groups(tmp_path: Path) -> None:
    from askexpert.data.cifar100 import COARSE_TABLE
    from askexpert.partition import superclass_partition

    names = sorted(fine for group in COARSE_TABLE.values() for fine in group)
    assert len(names) == 100
    for name in names:
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (len(name), 0, 0)).save(tmp_path / "train" / name / "0.png")
    train = folder.load(tmp_path, "train", 32)
    assert train.groups is not None and train.group_names is not None
    assert train.group_names[train.groups[train.class_names.index("whale")]] == "aquatic_mammals"
    assert train.group_names[train.groups[train.class_names.index("tractor")]] == "vehicles_2"
    assert np.bincount(train.groups).tolist() == [5] * 20
    part = superclass_partition(train.groups, 5)
    assert all(len(s) == 20 for s in part.subsets)
    # Other names: no groups, and `superclass` says why.
    assert folder.load(tmp_path.parent / tmp_path.name, "train", 16).groups is not None  # same tree, other size
    other = tmp_path / "other"
    (other / "train" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(other / "train" / "cat" / "0.png")
    assert folder.load(other, "train", 32).groups is None
