"""Train one expert per partition subset under a named schedule (`askexpert train experts`).

Every expert outputs its subset's classes plus one "other" class. The budget
is `epochs` passes over the expert's *subset* (steps × batch), the same for
every schedule; a schedule only changes which samples fill those batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from askexpert.config import SystemConfig
from askexpert.data import LabeledImages, load_splits
from askexpert.errors import ConfigError
from askexpert.evaluate.metrics import subset_accuracy
from askexpert.fingerprint import fingerprint
from askexpert.models import (
    CheckpointMeta,
    ImageClassifier,
    create_model,
    predict_logits,
    read_meta,
    resolve_device,
    save_checkpoint,
)
from askexpert.partition import Partition
from askexpert.system import SystemDir
from askexpert.training.loop import train_model
from askexpert.training.plans import budget_steps, expert_targets, plan_schedule

OTHER = -1  # the global "class id" recorded for an expert's "other" output


def schedule_stages(cfg: SystemConfig, schedule: str) -> list[dict[str, float | None]]:
    stages = cfg.expert_training.schedules.get(schedule)
    if stages is None:
        known = ", ".join(sorted(cfg.expert_training.schedules))
        raise ConfigError(f"unknown schedule {schedule!r}; the config defines: {known}")
    return [s.model_dump() for s in stages]


def expert_plan(cfg: SystemConfig, labels: np.ndarray, subset: tuple[int, ...], schedule: str, seed: int) -> np.ndarray:
    """The batch plan of one expert under one schedule (its length is the schedule-free budget)."""
    schedule_stages(cfg, schedule)
    tc = cfg.expert_training
    in_subset = np.isin(labels, subset)
    inside, outside = np.flatnonzero(in_subset), np.flatnonzero(~in_subset)
    steps = budget_steps(tc.epochs, len(inside), tc.batch_size)
    return plan_schedule(inside, outside, tc.schedules[schedule], steps, tc.batch_size, seed)


@dataclass
class TrainedExpert:
    model: ImageClassifier
    plan: np.ndarray  # (steps, batch) sample indices it was trained on
    stats: dict[str, float]
    val_subset_accuracy: float
    seed: int


def train_expert(
    cfg: SystemConfig,
    train: LabeledImages,
    val: LabeledImages,
    subset: tuple[int, ...],
    index: int,
    schedule: str,
    device: torch.device,
    resume_path: Path | None = None,
    desc: str = "expert",
) -> TrainedExpert:
    """Train the `index`-th expert on `subset` under `schedule`, and score it on validation.

    The seed depends on the expert's index only, so every schedule of one expert starts
    from the same weights and draws the same augmentation: schedules compare paired.
    """
    seed = cfg.seed * 1000 + index
    plan = expert_plan(cfg, train.labels, subset, schedule, seed)
    torch.manual_seed(seed)  # the initial weights come from torch's global generator
    model = create_model(cfg.expert.preset, len(subset) + 1, cfg.expert.pretrained_file)
    targets = expert_targets(train.labels, subset)
    stats = train_model(
        model, train.images, targets, plan, cfg.expert_training, device, seed, resume_path=resume_path, desc=desc
    )
    val_logits = predict_logits(model, val.images, device)
    return TrainedExpert(model, plan, stats, subset_accuracy(val_logits, val.labels, subset), seed)


def train_experts(system: SystemDir, schedule: str, force: bool = False) -> list[CheckpointMeta]:
    """Train (or reuse up-to-date) experts for every subset of `partition.json`."""
    cfg = system.config()
    stages = schedule_stages(cfg, schedule)
    part = Partition.from_json(system.partition_path)
    splits = load_splits(cfg.data, system.root)
    train, val = splits.train, splits.val
    if part.num_classes != train.num_classes:
        raise ConfigError(
            f"{system.partition_path}: partition covers {part.num_classes} classes, "
            f"the data set has {train.num_classes}"
        )
    device = resolve_device(cfg.device)
    tc = cfg.expert_training
    metas = []
    for e, (eid, subset) in enumerate(zip(part.expert_ids, part.subsets, strict=True)):
        path = system.expert_path(schedule, eid)
        key = fingerprint(
            "expert", cfg.data.model_dump(), cfg.expert.model_dump(), tc.model_dump(), schedule, subset, cfg.seed
        )
        if not force and path.is_file() and path.with_suffix(".json").is_file():
            meta = read_meta(path)
            if meta.extra.get("fingerprint") == key:
                metas.append(meta)
                continue
        path.parent.mkdir(parents=True, exist_ok=True)
        resume = path.with_suffix(".resume.pt")
        trained = train_expert(cfg, train, val, subset, e, schedule, device, resume, desc=f"{schedule} {eid}")
        meta = CheckpointMeta(
            role="expert",
            preset=cfg.expert.preset,
            classes=[*subset, OTHER],
            expert_id=eid,
            schedule=schedule,
            seed=trained.seed,
            metrics={"val_subset_accuracy": trained.val_subset_accuracy, **trained.stats},
            extra={
                "fingerprint": key,
                "stages": stages,
                "steps": len(trained.plan),
                "batch_size": trained.plan.shape[1],
            },
        )
        metas.append(save_checkpoint(trained.model.cpu(), path, meta))
    return metas
