"""Data sources behind one interface: `load_splits(config, system_dir)`.

Importing this package costs no torch (the edge reads images through `folder`).
Sources: `synth` (generated, the default), `cifar100` (local root, explicit
download only) and `folder` (an image-folder tree). Every source yields
`LabeledImages`; the validation split is carved from train by a seeded,
stratified split and the test split is never used for any choice.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from askexpert.config import DataConfig
from askexpert.data import cifar100, folder
from askexpert.data.base import LabeledImages, stratified_split
from askexpert.errors import DataError

__all__ = ["LabeledImages", "Splits", "data_root", "input_size", "load_splits", "stratified_split"]


@dataclass(frozen=True)
class Splits:
    train: LabeledImages
    val: LabeledImages
    test: LabeledImages


def input_size(cfg: DataConfig) -> int:
    """Side of the images a source yields, which the edge sends (the models resize themselves)."""
    return 32 if cfg.source == "cifar100" else cfg.synth.image_size


def data_root(cfg: DataConfig, system_dir: str | Path) -> Path:
    root = Path(cfg.root).expanduser()
    return root if root.is_absolute() else Path(system_dir) / root


def _load_raw(cfg: DataConfig, root: Path) -> tuple[LabeledImages, LabeledImages]:
    if cfg.source == "synth":
        from askexpert.data import synth  # generates with torch: the edge never loads a split

        stored = synth.stored_config(root)
        if stored is None:
            synth.write(cfg.synth, root)
        elif stored != cfg.synth:
            raise DataError(
                f"{root}: the generated data set there was made with different settings "
                f"({stored.model_dump()}) than the config asks for ({cfg.synth.model_dump()}); "
                "delete the folder or point data.root elsewhere"
            )
        return synth.read(root, "train"), synth.read(root, "test")
    if cfg.source == "cifar100":
        train = cifar100.load(root, "train", cfg.download, cfg.verify_checksums)
        if train.groups is not None and (train.groups < 0).any():
            raise DataError(f"{root}: some CIFAR-100 classes have no training samples")
        test = cifar100.load(root, "test", cfg.download, cfg.verify_checksums)
        return train, replace(test, groups=train.groups)
    train = folder.load(root, "train", cfg.synth.image_size)
    return train, folder.load(root, "test", cfg.synth.image_size, train.class_names)


def load_splits(cfg: DataConfig, system_dir: str | Path) -> Splits:
    """Train / validation / test splits for a system (generating the synth set on first use)."""
    train_full, test = _load_raw(cfg, data_root(cfg, system_dir))
    train_idx, val_idx = stratified_split(train_full.labels, cfg.val_fraction, cfg.split_seed)
    return Splits(train_full.subset(train_idx), train_full.subset(val_idx), test)
