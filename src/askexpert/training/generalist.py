"""Train the edge generalist on all classes (`askexpert train generalist`).

With `distill.teacher: stage1`, the expert preset's all-class stage 1 is trained
first (it is the progressive experts' starting point anyway) and teaches the
generalist: its logits on the training images are computed once and mixed into
the loss (DeiT, Touvron et al. 2021). The teacher's cost is stage 1's, already
paid by the progressive schedule, plus one forward pass over train.
"""

from __future__ import annotations

from askexpert.fingerprint import fingerprint
from askexpert.models import CheckpointMeta, resolve_device
from askexpert.system import SystemDir
from askexpert.training.shared import (
    fit_and_save,
    init_fingerprint,
    pretrained_for,
    stage1_logits,
    stored_if_current,
    train_shared_stage,
)


def generalist_fingerprint(system: SystemDir) -> str:
    cfg = system.config()
    parts: list[object] = [
        "generalist",
        cfg.data.model_dump(),
        cfg.generalist.model_dump(),
        cfg.generalist_training.model_dump(),
        cfg.seed,
        init_fingerprint(pretrained_for(system, "generalist")),
    ]
    if cfg.distill.active:  # no teacher (or alpha 0): the key stays what it was before distillation existed
        teacher = system.stage1_path
        parts += [cfg.distill.model_dump(), init_fingerprint(teacher) if teacher.is_file() else None]
    return fingerprint(*parts)


def train_generalist(system: SystemDir, force: bool = False) -> CheckpointMeta:
    """Train (or reuse, when the stored one was made from the same settings) the generalist."""
    cfg = system.config()
    # a current teacher first (reused when its settings did not change): its hash is part of the generalist's key,
    # so a stale stage 1 must be retrained before the key is computed, not after
    teacher = train_shared_stage(system) if cfg.distill.active else None
    key = generalist_fingerprint(system)
    meta = stored_if_current(system.generalist_path, key, force)
    if meta is not None:
        return meta
    splits = system.splits()
    soft = stage1_logits(system, splits.train.images, "generalist") if teacher is not None else None
    extra = {
        "fingerprint": key,
        "class_names": list(splits.train.class_names),
        "distill": cfg.distill.model_dump() if soft is not None else None,
    }
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
        teacher_logits=soft,
        distill=cfg.distill,
    )
