"""Train the edge generalist on all classes (`askexpert train generalist`)."""

from __future__ import annotations

from askexpert.data import load_splits
from askexpert.fingerprint import fingerprint
from askexpert.models import CheckpointMeta, read_meta, resolve_device, save_checkpoint
from askexpert.system import SystemDir
from askexpert.training.shared import fit_all_classes, init_fingerprint, pretrained_for


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
    path = system.generalist_path
    if not force and path.is_file() and path.with_suffix(".json").is_file():
        meta = read_meta(path)
        if meta.extra.get("fingerprint") == key:
            return meta
    splits = load_splits(cfg.data, system.root)
    init = pretrained_for(system, "generalist")
    tc = cfg.generalist_training
    model, metrics, steps = fit_all_classes(
        cfg.generalist.preset,
        splits.train,
        splits.val,
        tc,
        cfg.seed,
        resolve_device(cfg.device),
        init,
        path.with_suffix(".resume.pt"),
        "generalist",
    )
    meta = CheckpointMeta(
        role="generalist",
        preset=cfg.generalist.preset,
        classes=list(range(splits.train.num_classes)),
        seed=cfg.seed,
        metrics=metrics,
        extra={
            "fingerprint": key,
            "steps": steps,
            "batch_size": tc.batch_size,
            "class_names": list(splits.train.class_names),
            "init": str(init) if init else None,
        },
    )
    return save_checkpoint(model.cpu(), path, meta)
