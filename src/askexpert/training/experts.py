"""Train one expert per partition subset under a named schedule (`askexpert train experts`).

Every expert outputs its subset's classes plus one "other" class. The per-expert
budget is `epochs` passes over the expert's *subset* (steps × batch), the same
for every schedule; a schedule changes where the expert starts (`init`) and
which samples fill those batches (its stages). Schedules that start from the
shared stage 1 (`init: shared`, see `training.shared`) add that stage's cost
once for all experts; the evaluation reports it both amortised and charged to each
(`evaluate.run.budgets`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from askexpert.config import Schedule, SystemConfig
from askexpert.data import LabeledImages
from askexpert.errors import CheckpointError, ConfigError
from askexpert.evaluate.metrics import subset_accuracy
from askexpert.fingerprint import fingerprint
from askexpert.models import (
    CheckpointMeta,
    ImageClassifier,
    create_model,
    load_checkpoint,
    predict_logits,
    resolve_device,
    save_checkpoint,
)
from askexpert.models.checkpoint import file_sha256
from askexpert.partition import Partition
from askexpert.protocol import OTHER, softmax
from askexpert.routing import choose_expert
from askexpert.system import SystemDir
from askexpert.training.loop import train_model
from askexpert.training.plans import budget_steps, expert_targets, plan_schedule
from askexpert.training.shared import pretrained_for, stage1_logits, stored_if_current, train_shared_stage


def schedule_of(cfg: SystemConfig, schedule: str) -> Schedule:
    found = cfg.expert_training.schedules.get(schedule)
    if found is None:
        known = ", ".join(sorted(cfg.expert_training.schedules))
        raise ConfigError(f"unknown schedule {schedule!r}; the config defines: {known}")
    return found


def expert_plan(
    cfg: SystemConfig,
    labels: np.ndarray,
    subset: tuple[int, ...],
    schedule: str,
    seed: int,
    routed: np.ndarray | None = None,
    edge_wrong: np.ndarray | None = None,
) -> np.ndarray:
    """The batch plan of one expert under one schedule (its length is the schedule-free budget).

    `edge_wrong` (bool per training image: the generalist's answer is wrong) is needed by a schedule with
    `edge_error_repeats`, whose subset pool then holds those images 1 + that many times.
    """
    sched = schedule_of(cfg, schedule)
    tc = cfg.expert_training
    in_subset = np.isin(labels, subset)
    inside, outside = np.flatnonzero(in_subset), np.flatnonzero(~in_subset)
    steps = budget_steps(tc.epochs, len(inside), tc.batch_size)  # from the distinct images: the same budget
    if sched.edge_error_repeats:
        if edge_wrong is None or len(edge_wrong) != len(labels):
            raise ConfigError(f"schedule {schedule!r} repeats the generalist's errors, which were not given")
        hard = inside[edge_wrong[inside]]
        inside = np.concatenate([inside, *[hard] * sched.edge_error_repeats])
    return plan_schedule(inside, outside, sched.stages, steps, tc.batch_size, seed, routed)


def head_swap(source: ImageClassifier, subset: tuple[int, ...], preset: str) -> ImageClassifier:
    """An expert that starts from the all-class model: its subset's rows kept, "other" made from the rest.

    The "other" row is the mean of the remaining classes' weights, and its bias
    their mean bias plus log(#rest): for similar logits this approximates the
    log of their summed probability, so the swapped head starts out giving
    "other" the mass the all-class model gave the classes it stands for.
    """
    head = _classifier(source)
    num_classes = head.out_features
    if max(subset) >= num_classes:
        raise CheckpointError(f"stage 1 model has {num_classes} outputs; subset reaches class {max(subset)}")
    rest = np.setdiff1d(np.arange(num_classes), np.asarray(subset))
    expert = create_model(preset, len(subset) + 1)
    state = {k: v for k, v in source.backbone.state_dict().items() if not k.startswith("head.")}
    with torch.no_grad():
        weight, bias = head.weight.detach().cpu(), head.bias.detach().cpu()
        keep = torch.as_tensor(subset)
        other_w = weight[rest].mean(dim=0, keepdim=True) if len(rest) else torch.zeros_like(weight[:1])
        other_b = bias[rest].mean().view(1) + (math.log(len(rest)) if len(rest) else -10.0)
        state["head.weight"] = torch.cat([weight[keep], other_w])
        state["head.bias"] = torch.cat([bias[keep], other_b])
    expert.backbone.load_state_dict(state)
    return expert


def _body_parameters(model: ImageClassifier) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """Every named parameter of the backbone but the classifier head's."""
    head = {id(p) for p in _classifier(model).parameters()}
    return ((n, p) for n, p in model.backbone.named_parameters() if id(p) not in head)


def body_weights(model: ImageClassifier) -> dict[str, torch.Tensor]:
    """A copy of every parameter but the classifier head's: what `average_with_start` averages."""
    return {n: p.detach().clone() for n, p in _body_parameters(model)}


def average_with_start(model: ImageClassifier, start: dict[str, torch.Tensor], share: float) -> None:
    """Weight-space ensembling (WiSE-FT, Wortsman et al. 2022): body ← (1 − share)·trained + share·start.

    Narrowing to a subset forgets some of what the all-class start knew about the subset's own
    classes; averaging the weights (one model, the same cost to serve) keeps part of it. The head is
    left as trained: it was fitted to the trained body, and averaging it too did worse on validation.
    """
    if not 0.0 <= share < 1.0:
        raise ConfigError(f"average_start must be in [0, 1), got {share}")
    with torch.no_grad():
        for name, param in _body_parameters(model):
            if name not in start or start[name].shape != param.shape:
                raise CheckpointError(f"cannot average with the start: its weights have no {name!r} of this shape")
            param.mul_(1.0 - share).add_(start[name].to(param.device), alpha=share)


def _classifier(model: ImageClassifier) -> torch.nn.Linear:
    get = getattr(model.backbone, "get_classifier", None)
    head = get() if get is not None else None
    if not isinstance(head, torch.nn.Linear):
        raise CheckpointError(f"preset {model.preset_name!r} has no linear classifier head; cannot swap it")
    return head


def fold_teacher(logits: np.ndarray, subset: tuple[int, ...]) -> np.ndarray:
    """An all-class teacher's logits on an expert's outputs: the subset's columns, then "other".

    "other" is the log of the summed exp of the remaining classes' logits, so the softmax of
    a folded row is the teacher's own distribution with the classes outside the subset
    merged: the expert learns the teacher's ranking inside its subset and the mass it puts
    outside (the head swap's rule, applied to targets instead of weights).
    """
    if logits.ndim != 2 or max(subset) >= logits.shape[1]:
        raise CheckpointError(f"teacher logits of shape {logits.shape} do not cover subset class {max(subset)}")
    rest = np.setdiff1d(np.arange(logits.shape[1]), np.asarray(subset))
    t = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    other = (
        torch.logsumexp(t[:, torch.from_numpy(rest)], dim=1, keepdim=True)
        if len(rest)
        else torch.full((len(t), 1), -1e4)  # nothing outside the subset: "other" gets no mass (finite, for the KL)
    )
    return torch.cat([t[:, list(subset)], other], dim=1).numpy()


def other_logit_correction(trained_share: float, deployed_share: float) -> float:
    """Log-odds shift for the "other" logit (Hinton et al. 2015 correct specialists for oversampling).

    The last stage showed "other" in `trained_share` of samples; the expert meets
    it in `deployed_share` of what it is asked. Adding log(d/(1-d)) − log(t/(1-t))
    to the "other" logit turns the trained prior into the deployed one.
    """
    t = min(max(trained_share, 1e-3), 1 - 1e-3)
    d = min(max(deployed_share, 1e-3), 1 - 1e-3)
    return math.log(d / (1 - d)) - math.log(t / (1 - t))


def _last_other_share(sched: Schedule, natural: float) -> float:
    share = sched.stages[-1].subset_share
    return 1.0 - (natural if share is None else share)


@dataclass
class RoutingPools:
    """What the generalist's router does with each split, for `others: routed` and the "other" correction."""

    routed_train: list[np.ndarray]  # per expert: out-of-subset train indices routed to it
    deployed_other: list[float]  # per expert: share of the validation samples routed to it that are not its classes
    generalist_sha: str
    wrong_train: np.ndarray  # (N_train,) bool: the generalist's top-1 on the (un-augmented) image is wrong


def routing_pools(
    cfg: SystemConfig,
    system: SystemDir,
    part: Partition,
    train: LabeledImages,
    val: LabeledImages,
    device: torch.device,
) -> RoutingPools:
    """Route the training and validation splits with the generalist (no gate: what each expert could be asked)."""
    if not system.generalist_path.is_file():
        raise CheckpointError(
            f"{system.generalist_path}: this schedule routes with the generalist; run `askexpert train generalist`"
        )
    model, meta = load_checkpoint(system.generalist_path, device)
    membership = part.membership()
    k = min(cfg.routing.top_k, part.num_classes)
    routed, deployed = [], []
    probs = {
        name: softmax(predict_logits(model, split.images, device, desc=f"routing {name}"))
        for name, split in (("train", train), ("val", val))
    }
    chosen = {name: choose_expert(p, membership, k, cfg.routing.scoring) for name, p in probs.items()}
    wrong_train = probs["train"].argmax(axis=1) != train.labels
    for e, subset in enumerate(part.subsets):
        outside_train = ~np.isin(train.labels, subset)
        routed.append(np.flatnonzero((chosen["train"] == e) & outside_train))
        to_e = chosen["val"] == e
        deployed.append(float((~np.isin(val.labels[to_e], subset)).mean()) if to_e.any() else 0.5)
    return RoutingPools(routed, deployed, meta.sha256, wrong_train)


@dataclass
class TrainedExpert:
    model: ImageClassifier
    plan: np.ndarray  # (steps, batch) sample indices it was trained on
    stats: dict[str, float]
    val_subset_accuracy: float
    seed: int
    other_correction: float = 0.0


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
    stage1: ImageClassifier | None = None,
    pools: RoutingPools | None = None,
    pretrained_file: Path | None = None,
    teacher: np.ndarray | None = None,
) -> TrainedExpert:
    """Train the `index`-th expert on `subset` under `schedule`, and score it on validation.

    The seed depends on the expert's index and `expert_training.seed` only, so every
    schedule of one expert draws the same augmentation and, from the same `init`, the
    same weights: schedules compare paired. `teacher`: the schedule's teacher's logits
    on every training image over all classes (`distill`), folded here onto the subset.
    """
    sched = schedule_of(cfg, schedule)
    seed = cfg.expert_training.seed * 1000 + index
    routed = pools.routed_train[index] if pools is not None else None
    plan = expert_plan(cfg, train.labels, subset, schedule, seed, routed, pools.wrong_train if pools else None)
    torch.manual_seed(seed)  # a fresh head's weights come from torch's global generator
    if sched.init == "shared":
        if stage1 is None:
            raise ConfigError(f"schedule {schedule!r} starts from the shared stage 1, which was not given")
        model = head_swap(stage1, subset, cfg.expert.preset)
    else:
        model = create_model(cfg.expert.preset, len(subset) + 1, pretrained_file)
    start = body_weights(model) if sched.average_start > 0 else None
    targets = expert_targets(train.labels, subset)
    folded = None
    if sched.distills:
        if teacher is None:
            raise ConfigError(f"schedule {schedule!r} distils from stage 1, whose logits were not given")
        folded = fold_teacher(teacher, subset)
    stats = train_model(
        model,
        train.images,
        targets,
        plan,
        cfg.expert_training,
        device,
        seed,
        resume_path=resume_path,
        desc=desc,
        teacher_logits=folded,
        distill=sched.distill if sched.distills else None,
    )
    if start is not None:
        average_with_start(model, start, sched.average_start)
    correction = 0.0
    if sched.correct_other:
        if pools is None:
            raise ConfigError(f"schedule {schedule!r} corrects the 'other' logit, which needs the generalist's routing")
        natural = float(np.isin(train.labels, subset).mean())
        correction = other_logit_correction(_last_other_share(sched, natural), pools.deployed_other[index])
        with torch.no_grad():
            _classifier(model).bias[-1] += correction
    val_logits = predict_logits(model, val.images, device)
    return TrainedExpert(model, plan, stats, subset_accuracy(val_logits, val.labels, subset), seed, correction)


def train_experts(system: SystemDir, schedule: str, force: bool = False) -> list[CheckpointMeta]:
    """Train (or reuse up-to-date) experts for every subset of `partition.json`."""
    cfg = system.config()
    sched = schedule_of(cfg, schedule)
    part = system.partition()
    splits = system.splits()
    train, val = splits.train, splits.val
    if part.num_classes != train.num_classes:
        raise ConfigError(
            f"{system.partition_path}: partition covers {part.num_classes} classes, "
            f"the data set has {train.num_classes}"
        )
    device = resolve_device(cfg.device)
    tc = cfg.expert_training
    needs_routing = sched.needs_routing
    pretrained = pretrained_for(system, "expert")
    depends: dict[str, Any] = {"init_file": file_sha256(pretrained) if pretrained else None}
    stage1: tuple[ImageClassifier, CheckpointMeta] | None = None  # read once: the experts' start and their teacher
    if sched.init == "shared" or sched.distills:
        stage1_meta = train_shared_stage(system, force=False)
        depends["stage1"] = stage1_meta.sha256
    teacher: np.ndarray | None = None  # stage 1's logits on train, once for all experts (`distill`)
    pools: RoutingPools | None = None
    if needs_routing:
        depends["generalist"] = system.generalist_meta().sha256 if system.generalist_path.is_file() else None
    metas = []
    for e, (eid, subset) in enumerate(zip(part.expert_ids, part.subsets, strict=True)):
        path = system.expert_path(schedule, eid)
        key = fingerprint(
            "expert/2",
            cfg.data.model_dump(),
            cfg.expert.model_dump(),
            tc.model_dump(
                exclude={"schedules"}
                if sched.init == "shared"
                else {"schedules", "shared_epochs", "shared_seed", "shared_lr"},
                exclude_none=True,  # an unset shared_seed keeps earlier checkpoints current
            ),
            sched.model_dump(),
            subset,
            cfg.routing.top_k if needs_routing else None,
            depends,
        )
        stored = stored_if_current(path, key, force)
        if stored is not None:
            metas.append(stored)
            continue
        if sched.init == "shared" and stage1 is None:
            stage1 = load_checkpoint(system.stage1_path)
        if needs_routing and pools is None:
            pools = routing_pools(cfg, system, part, train, val, device)
        if sched.distills and teacher is None:
            teacher = stage1_logits(system, train.images, f"{schedule} experts", stage1)
        path.parent.mkdir(parents=True, exist_ok=True)
        resume = path.with_suffix(".resume.pt")
        trained = train_expert(
            cfg,
            train,
            val,
            subset,
            e,
            schedule,
            device,
            resume,
            desc=f"{schedule} {eid}",
            stage1=stage1[0] if stage1 is not None else None,
            pools=pools,
            pretrained_file=pretrained,
            teacher=teacher,
        )
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
                "schedule": sched.model_dump(),
                "steps": len(trained.plan),
                "batch_size": trained.plan.shape[1],
                "other_logit_correction": trained.other_correction,
                "routed_pool": int(len(pools.routed_train[e])) if pools is not None else None,
                "init": str(system.stage1_path)
                if sched.init == "shared"
                else (str(pretrained) if pretrained else None),
            },
        )
        metas.append(save_checkpoint(trained.model.cpu(), path, meta))
    return metas
