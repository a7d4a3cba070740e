"""One training loop for every model in the system.

What differs between the generalist and the experts' schedules is only the
*batch plan* (which sample indices each optimizer step sees) and the targets;
the optimiser (AdamW), warm-up + cosine schedule, label smoothing,
augmentation (`askexpert.training.augment`), bf16 autocast (on GPU, and on a CPU with native bfloat16
where `cpu_bfloat16` asks), progress bar and resume live
here once. A teacher's logits (DeiT-style distillation) are one more optional target.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from askexpert.config import DistillConfig, TrainConfig
from askexpert.models.predict import cpu_bfloat16_usable
from askexpert.models.registry import ImageClassifier
from askexpert.progress import progress
from askexpert.training.augment import Augmenter, stochastic_depth, token_dropout


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 over the remaining steps."""
    if step < warmup:
        return (step + 1) / warmup
    done = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))


def training_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float,
    teacher: torch.Tensor | None = None,
    distill: DistillConfig | None = None,
) -> torch.Tensor:
    """Cross-entropy on the labels, mixed with the teacher's targets when a teacher is given.

    `labels` are class indices, or (batch, classes) soft targets from mixup/cutmix, which
    already hold the label smoothing.

    soft: T²·KL(softmax(teacher/T) ‖ softmax(student/T)) (Hinton et al. 2015; T² keeps the
    gradient scale independent of T); hard: cross-entropy against the teacher's argmax
    (DeiT's hard-label distillation).
    """
    soft_labels = labels.ndim == 2
    logits = logits.float()  # under bf16 autocast the head's output is bfloat16: the loss is taken in float32
    ce = F.cross_entropy(logits, labels, label_smoothing=0.0 if soft_labels else label_smoothing)
    if teacher is None or distill is None or not distill.active:
        return ce
    if distill.mode == "hard":
        kd = F.cross_entropy(logits, teacher.argmax(1), label_smoothing=label_smoothing)
    else:
        t = distill.temperature
        kd = F.kl_div(
            F.log_softmax(logits / t, dim=1),
            F.log_softmax(teacher.float() / t, dim=1),
            reduction="batchmean",
            log_target=True,
        ) * (t * t)
    return (1.0 - distill.alpha) * ce + distill.alpha * kd


def train_model(
    model: ImageClassifier,
    images: np.ndarray,
    targets: np.ndarray,
    plan: np.ndarray,
    cfg: TrainConfig,
    device: torch.device,
    seed: int,
    resume_path: Path | None = None,
    desc: str = "train",
    teacher_logits: np.ndarray | None = None,
    distill: DistillConfig | None = None,
    show_progress: bool = True,
) -> dict[str, float]:
    """Run the optimizer steps in `plan` (steps × batch indices into `images`).

    `teacher_logits` (one row per image, computed once on the un-augmented images)
    and `distill` add a teacher's targets to the loss (`training_loss`).

    With `resume_path`, state is saved there every ~10% of the steps and a
    matching file found at start is resumed from; it is removed at the end.
    `show_progress=False` draws no bar (a caller with a bar of its own, as the forecast's timing).
    Returns the mean training loss of the last 10% of steps.
    """
    total = len(plan)
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or "pos_embed" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    warmup = int(cfg.warmup_fraction * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    augmenter = Augmenter(cfg, model.num_outputs, seed)
    if cfg.mixes and teacher_logits is not None:
        raise ValueError(f"{desc}: mixup/cutmix cannot be combined with a teacher's logits (taken on unmixed images)")
    start = 0
    if resume_path is not None and resume_path.is_file():
        state = torch.load(resume_path, map_location="cpu", weights_only=True)
        if int(state["total"]) == total:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            augmenter.restore({k[4:]: v for k, v in state.items() if k.startswith("rng.")} or state)
            start = int(state["step"])
    images_t = torch.from_numpy(images)
    targets_t = torch.from_numpy(targets.astype(np.int64))
    if teacher_logits is not None and len(teacher_logits) != len(images):
        raise ValueError(f"{desc}: {len(teacher_logits)} teacher rows for {len(images)} images")
    teacher_t = (
        torch.from_numpy(np.ascontiguousarray(teacher_logits, dtype=np.float32)) if teacher_logits is not None else None
    )
    use_amp = device.type == "cuda" or cpu_bfloat16_usable(cfg.cpu_bfloat16, device, f"{desc}: cpu_bfloat16")
    save_every = max(1, total // 10)
    tail: list[float] = []
    bar = progress(
        range(start, total),
        desc=desc,
        unit="step",
        initial=start,
        total=total,
        leave=False,
        disable=not show_progress,
    )
    with token_dropout(model, cfg.token_drop, desc), stochastic_depth(model, cfg.drop_path, desc):
        for step in bar:
            idx = torch.from_numpy(plan[step].astype(np.int64))
            batch, y = augmenter.mix(augmenter.images(images_t[idx]), targets_t[idx])
            batch, y = batch.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                soft = teacher_t[idx].to(device, non_blocking=True) if teacher_t is not None else None
                loss = training_loss(model(batch), y, cfg.label_smoothing, soft, distill)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"{desc}: loss became {value} at step {step}; lower the learning rate")
            if step >= total - max(1, total // 10):
                tail.append(value)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{value:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
            if resume_path is not None and (step + 1) % save_every == 0 and step + 1 < total:
                torch.save(
                    {
                        "total": total,
                        "step": step + 1,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        **{f"rng.{k}": v for k, v in augmenter.state().items()},
                    },
                    resume_path,
                )
    bar.close()
    if resume_path is not None:
        resume_path.unlink(missing_ok=True)
    model.eval()
    return {"train_loss": float(np.mean(tail)) if tail else float("nan")}
