"""Train the edge generalist on all classes (`askexpert train generalist`)."""

from __future__ import annotations

import numpy as np
import torch

from askexpert.config import Stage
from askexpert.data import load_splits
from askexpert.fingerprint import fingerprint
from askexpert.models import CheckpointMeta, create_model, predict_logits, read_meta, resolve_device, save_checkpoint
from askexpert.system import SystemDir
from askexpert.training.loop import train_model
from askexpert.training.plans import budget_steps, plan_schedule


def generalist_fingerprint(system: SystemDir) -> str:
    cfg = system.config()
    return fingerprint(
        "generalist", cfg.data.model_dump(), cfg.generalist.model_dump(), cfg.generalist_training.model_dump(), cfg.seed
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
    train, val = splits.train, splits.val
    device = resolve_device(cfg.device)
    tc = cfg.generalist_training
    torch.manual_seed(cfg.seed)  # the initial weights come from torch's global generator
    model = create_model(cfg.generalist.preset, train.num_classes, cfg.generalist.pretrained_file)
    steps = budget_steps(tc.epochs, len(train), tc.batch_size)
    plan = plan_schedule(
        np.arange(len(train)), np.empty(0, np.int64), [Stage(fraction=1.0)], steps, tc.batch_size, cfg.seed
    )
    stats = train_model(
        model,
        train.images,
        train.labels,
        plan,
        tc,
        device,
        cfg.seed,
        resume_path=path.with_suffix(".resume.pt"),
        desc="generalist",
    )
    val_pred = predict_logits(model, val.images, device).argmax(1)
    meta = CheckpointMeta(
        role="generalist",
        preset=cfg.generalist.preset,
        classes=list(range(train.num_classes)),
        seed=cfg.seed,
        metrics={"val_accuracy": float((val_pred == val.labels).mean()), **stats},
        extra={"fingerprint": key, "steps": steps, "batch_size": plan.shape[1], "class_names": list(train.class_names)},
    )
    return save_checkpoint(model.cpu(), path, meta)
