"""Train the edge generalist on all classes (`askexpert train generalist`)."""

from __future__ import annotations

from askexpert.data import load_splits
from askexpert.fingerprint import fingerprint
from askexpert.models import CheckpointMeta, resolve_device
from askexpert.system import SystemDir
from askexpert.training.shared import fit_and_save, init_fingerprint, pretrained_for, stored_if_current


def generalist_fingerprint(system: SystemDir) -> str:
    cfg = system.config()
    return fingerprint(
        "generalist",
        cfg.data.model_dump(),
        cfg.generalist.model_dump(),
        cfg.generalist_training.model_dump(),
        cfg.seed,
        init_fingerprint(pretrained_for(system, "generalist")),
    )


def train_generalist(system: SystemDir, force: bool = False) -> CheckpointMeta:
    """Train (or reuse, when the stored one was made from the same settings) the generalist."""
    cfg = system.config()
    key = generalist_fingerprint(system)
    meta = stored_if_current(system.generalist_path, key, force)
    if meta is not None:
        return meta
    splits = load_splits(cfg.data, system.root)
    extra = {"fingerprint": key, "class_names": list(splits.train.class_names)}
    return fit_and_save(
        "generalist",
        cfg.generalist.preset,
        splits,
        cfg.generalist_training,
        cfg.seed,
        resolve_device(cfg.device),
        pretrained_for(system, "generalist"),
        system.generalist_path,
        extra,
    )
