"""Starting points shared by several models: pretrained backbones and the experts' stage 1.

* `train_backbones` (`askexpert train backbone`): pretrain the generalist's and
  the expert's presets on another data set (`backbone.data`; on our machines
  Tiny-ImageNet photos, at paper scale ImageNet weights replace this stage).
  The checkpoints work as `pretrained_file` for either role: the head is replaced.
* `train_shared_stage`: stage 1 of the progressive schedule, the expert preset
  trained on all classes with full labels, once for every expert (Hinton et
  al. 2015: specialists start from the generalist-style all-class model).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from askexpert.config import (
    STRONG_AUGMENTATION,
    DistillConfig,
    ExpertTrainConfig,
    Stage,
    StrongAugmentation,
    SystemConfig,
    TrainConfig,
)
from askexpert.data import LabeledImages, Splits
from askexpert.errors import CheckpointError, ConfigError
from askexpert.fingerprint import fingerprint
from askexpert.models import (
    CheckpointMeta,
    ImageClassifier,
    create_model,
    load_checkpoint,
    predict_logits,
    read_meta,
    resolve_device,
    save_checkpoint,
)
from askexpert.models.checkpoint import file_sha256
from askexpert.system import SystemDir
from askexpert.training.loop import train_model
from askexpert.training.plans import budget_steps, plan_schedule

log = logging.getLogger("askexpert")


def pretrained_for(system: SystemDir, role: str) -> Path | None:
    """The weights file a role starts from: its `pretrained_file`, else the system's backbone, else none.

    When `backbone.data` is configured, pretraining is part of the system and both
    roles start from `DIR/backbones/<preset>.safetensors` unless a file is named.
    """
    cfg = system.config()
    model_cfg = cfg.generalist if role == "generalist" else cfg.expert
    if model_cfg.pretrained_file:
        path = system.resolve(model_cfg.pretrained_file)
        if not path.is_file() and Path(model_cfg.pretrained_file).expanduser().is_file():
            path = Path(model_cfg.pretrained_file).expanduser()  # relative to the working directory
        return path
    if cfg.backbone.data is None:
        return None
    path = system.backbone_path(model_cfg.preset)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no pretrained backbone for {model_cfg.preset!r}; "
            f"run `askexpert train backbone --system {system.root}`"
        )
    return path


def init_fingerprint(path: Path | None) -> str | None:
    return file_sha256(path) if path is not None else None


def fit_all_classes(
    preset: str,
    data: LabeledImages,
    val: LabeledImages,
    tc: TrainConfig,
    seed: int,
    device: torch.device,
    init: Path | None,
    resume: Path | None,
    desc: str,
    teacher_logits: np.ndarray | None = None,
    distill: DistillConfig | None = None,
) -> tuple[ImageClassifier, dict[str, float], int]:
    """Train `preset` on every class of `data` (uniform sampling); returns model, metrics, steps."""
    torch.manual_seed(seed)
    model = create_model(preset, data.num_classes, init)
    steps = budget_steps(tc.epochs, len(data), tc.batch_size)
    plan = plan_schedule(np.arange(len(data)), np.empty(0, np.int64), [Stage(fraction=1.0)], steps, tc.batch_size, seed)
    stats = train_model(model, data.images, data.labels, plan, tc, device, seed, resume, desc, teacher_logits, distill)
    val_pred = predict_logits(model, val.images, device).argmax(1)
    return model, {"val_accuracy": float((val_pred == val.labels).mean()), **stats}, steps


def stored_if_current(path: Path, key: str, force: bool = False) -> CheckpointMeta | None:
    """The checkpoint's metadata when it was made from the same settings (fingerprint), else None."""
    if force or not path.is_file() or not path.with_suffix(".json").is_file():
        return None
    meta = read_meta(path)
    return meta if meta.extra.get("fingerprint") == key else None


def fit_and_save(
    role: str,
    preset: str,
    splits: Splits,
    tc: TrainConfig,
    seed: int,
    device: torch.device,
    init: Path | None,
    path: Path,
    extra: dict[str, Any],
    desc: str | None = None,
    teacher_logits: np.ndarray | None = None,
    distill: DistillConfig | None = None,
) -> CheckpointMeta:
    """`fit_all_classes` on the train split (scored on validation), saved with its metadata and `extra`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    resume = path.with_suffix(".resume.pt")
    model, metrics, steps = fit_all_classes(
        preset, splits.train, splits.val, tc, seed, device, init, resume, desc or role, teacher_logits, distill
    )
    meta = CheckpointMeta(
        role=role,
        preset=preset,
        classes=list(range(splits.train.num_classes)),
        seed=seed,
        metrics=metrics,
        extra={"steps": steps, "batch_size": tc.batch_size, "init": str(init) if init else None, **extra},
    )
    return save_checkpoint(model.cpu(), path, meta)


def train_backbones(system: SystemDir, presets: list[str] | None = None, force: bool = False) -> list[CheckpointMeta]:
    """Pretrain each preset (default: the generalist's and the expert's) on `backbone.data`."""
    cfg = system.config()
    if cfg.backbone.data is None:
        raise ConfigError(
            f"{system.config_path}: backbone.data is not set; give the pretraining data "
            "(e.g. `askexpert train backbone --data DIR`, an image-folder tree with train/ and test/)"
        )
    presets = presets or list(dict.fromkeys([cfg.generalist.preset, cfg.expert.preset]))
    bc = cfg.backbone
    assert bc.data is not None
    metas = []
    for preset in presets:
        path = system.backbone_path(preset)
        key = fingerprint("backbone/1", bc.model_dump(), preset, cfg.seed)
        meta = stored_if_current(path, key, force)
        if meta is None:
            splits = system.splits(bc.data)
            extra = {"fingerprint": key, "data": bc.data.model_dump(), "class_names": list(splits.train.class_names)}
            device = resolve_device(cfg.device)
            meta = fit_and_save(
                "backbone", preset, splits, bc.training, cfg.seed, device, None, path, extra, f"backbone {preset}"
            )
        metas.append(meta)
    return metas


def stage1_training(tc: ExpertTrainConfig) -> TrainConfig:
    """Stage 1's own optimiser and budget: the expert settings with its epochs, learning rate and
    augmentation (`shared_augment`: crop/flip only, the experts' own, or settings of its own)."""
    settings = tc.model_dump(include=set(TrainConfig.model_fields))
    if tc.shared_augment is not True:
        settings.update({k: TrainConfig.model_fields[k].default for k in STRONG_AUGMENTATION})
    if isinstance(tc.shared_augment, StrongAugmentation):
        settings.update(tc.shared_augment.model_dump())
    return TrainConfig(**{**settings, "epochs": tc.shared_epochs, "lr": tc.shared_lr or tc.lr})


def shared_stage_fingerprint(system: SystemDir, cfg: SystemConfig) -> str:
    """Stage 1's key: exactly what it trains with (`stage1_training`: its epochs, learning rate and
    augmentation; its seed), so an expert-only setting never retrains it, nor the generalist it teaches."""
    tc = cfg.expert_training
    return fingerprint(
        "stage1/2",  # /1 keyed on the expert settings minus exclusions, the experts' own `lr` among them
        cfg.data.model_dump(),
        cfg.expert.model_dump(),
        stage1_training(tc).model_dump(),
        tc.stage1_seed,
        init_fingerprint(pretrained_for(system, "expert")),
    )


def train_shared_stage(system: SystemDir, force: bool = False) -> CheckpointMeta:
    """Stage 1 (all classes, full labels, from the expert's pretrained start); trained once, reused."""
    cfg = system.config()
    tc = cfg.expert_training
    key = shared_stage_fingerprint(system, cfg)
    meta = stored_if_current(system.stage1_path, key, force)
    if meta is not None:
        return meta
    stage_tc = stage1_training(tc)
    splits = system.splits()
    init = pretrained_for(system, "expert")
    device = resolve_device(cfg.device)
    extra = {"fingerprint": key}
    path = system.stage1_path
    return fit_and_save(
        "stage1", cfg.expert.preset, splits, stage_tc, tc.stage1_seed, device, init, path, extra, "stage 1"
    )


def stage1_logits(
    system: SystemDir, images: np.ndarray, student: str, loaded: tuple[ImageClassifier, CheckpointMeta] | None = None
) -> np.ndarray:
    """Stage 1's logits on `images` (un-augmented): a teacher's targets, computed once per training run.
    `loaded`: stage 1 already read by the caller (`load_checkpoint`), so that it is not read twice."""
    device = resolve_device(system.config().device)
    model, meta = loaded if loaded is not None else load_checkpoint(system.stage1_path, device)
    accuracy = meta.metrics.get("val_accuracy", float("nan"))
    log.info("%s: distilling from stage 1 (val accuracy %.4f)", student, accuracy)
    return predict_logits(model, images, device, desc=f"stage 1 teaching {student}")
