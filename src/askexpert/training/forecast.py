"""The real-data benchmark's wall time, projected from a few timed steps, and the epoch factor that fits a budget.

Why: the benchmark's budget (90 min from nothing on 2 cores, issue 14) is a property of the host as much as
of the configuration: the same configuration took 85.5-92.7 min on 2-core hosts with native bfloat16 and
~147-156 min on hosts without it (docs/cifar100-log.md). `forecast` times the real work here (a few optimizer
steps of the real `train_model` per training job, a forward pass per image in each runtime the pipeline uses)
and multiplies by the pipeline's own counts (`stratified_split`, `budget_steps`); `fit_factor` turns that into
the one factor on every epoch count that makes the training fit what the budget leaves, so the benchmark
holds its budget on a slower host by training less, and says so (`benchmarks/cifar100_cpu.py --fit-minutes`);
`refit_factor` corrects that factor for the stages still to run once the first ones have run at the host's
real pace.

Not counted: extracting and reading the archives, checkpoint writes, the ONNX export, the partition and the
evaluation's choices on cached outputs, each expert's set-up (`fit_factor` keeps a reserve for them).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from askexpert.config import DistillConfig, SystemConfig, TrainConfig
from askexpert.data.base import stratified_split
from askexpert.data.folder import image_listing
from askexpert.errors import ConfigError
from askexpert.models import create_model, predict_logits, resolve_device
from askexpert.models.predict import cpu_bfloat16_usable
from askexpert.progress import progress
from askexpert.training.loop import train_model
from askexpert.training.plans import budget_steps
from askexpert.training.shared import stage1_training

# Optimizer steps timed per round of each kind of training work, after warm-up steps run first and not timed, and
# the rounds, interleaved over the kinds, whose median is kept: one value for the forecast script and the budget fit.
# Why rounds: a 2-core VM's step time moves 10-40 % between one ten-second window and the next (timed here: the
# experts' step 319-412 ms, the generalist's 87-145 ms over four back-to-back 30-step windows), and one window per
# kind had put the experts' step at 350 ms where they ran at ~440 (docs/cifar100-log.md, Tiny-ImageNet run). A slow
# or fast spell hits one round of every kind, and the median sets it aside.
TIMED_STEPS, WARMUP_STEPS, TIMING_ROUNDS = 20, 5, 3

K = TypeVar("K")


@dataclass(frozen=True)
class Work:
    """What one unit costs: an optimizer step under one training budget, or one image through a model."""

    preset: str
    outputs: int
    budget: str | None = None  # the TrainConfig as JSON (hashable); None: inference
    teacher: bool = False  # the step also fits a teacher's logits (distillation)
    served: bool = False  # inference as the experts are served (mirror, bfloat16 where native)


@dataclass(frozen=True)
class Job:
    """One line of the forecast: `count` units of one kind of work."""

    stage: str
    what: str
    count: int
    seconds_per_unit: float
    trains: bool  # optimizer steps, whose count follows the epochs; else inference, which does not

    @property
    def seconds(self) -> float:
        return self.count * self.seconds_per_unit

    def record(self) -> dict[str, object]:
        """The job as JSON-ready numbers, one shape for every file that keeps a forecast."""
        return {**asdict(self), "seconds": self.seconds}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Job:
        """The job a `record()` holds (its derived `seconds` is not read back)."""
        return cls(**{f.name: record[f.name] for f in fields(cls)})


def time_steps(work: Work, size: int, steps: int, warmup: int, distill: DistillConfig, device: torch.device) -> float:
    """Seconds per optimizer step of the real training loop: the mean interval between optimizer steps
    (timed by a global step hook) after `warmup` steps, which run first to warm the allocator and caches."""
    assert work.budget is not None
    tc = TrainConfig.model_validate_json(work.budget)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4 * tc.batch_size, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, work.outputs, len(images))
    soft = rng.standard_normal((len(images), work.outputs)).astype(np.float32) if work.teacher else None
    plan = np.stack([rng.permutation(len(images))[: tc.batch_size] for _ in range(warmup + steps + 1)])
    stamps: list[float] = []
    hook = register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
    try:
        train_model(
            create_model(work.preset, work.outputs),
            images,
            labels,
            plan,
            tc,
            device,
            0,
            desc=work.preset,
            teacher_logits=soft,
            distill=distill if work.teacher else None,
            show_progress=False,  # the forecast's own bar counts the jobs
        )
    finally:
        hook.remove()
    return float(np.mean(np.diff(stamps[warmup:])))


def time_inference(work: Work, size: int, images: int, flip: bool, bf16: bool, device: torch.device) -> float:
    """Seconds per image of `predict_logits` (the pipeline's own inference path), after a warm-up batch."""
    model = create_model(work.preset, work.outputs)
    batch = np.random.default_rng(0).integers(0, 256, (images, size, size, 3), dtype=np.uint8)
    flip, bf16 = flip and work.served, bf16 and work.served
    predict_logits(model, batch[:64], device, flip=flip, cpu_bfloat16=bf16)
    start = time.perf_counter()
    predict_logits(model, batch, device, flip=flip, cpu_bfloat16=bf16)
    return (time.perf_counter() - start) / images


def planned_work(
    cfg: SystemConfig, seeds: int, train_images: int, test_images: int, classes: int, pretrain: tuple[int, int]
) -> list[tuple[str, str, int, Work]]:
    """(stage, description, units, work) for every training job and inference pass of `run_pipeline`,
    counted as the pipeline counts them (`budget_steps`; validation held out of train by `val_fraction`)."""
    train, val = (len(i) for i in stratified_split(np.arange(train_images) % classes, cfg.data.val_fraction, 0))
    tc = cfg.expert_training
    gen, exp = cfg.generalist.preset, cfg.expert.preset
    schedules = list(tc.schedules.values())
    experts = cfg.partition.num_experts
    subset = math.ceil(classes / experts) + cfg.partition.overlap
    stage1_needed = cfg.distill.active or any(s.init == "shared" or s.distills for s in schedules)
    plan: list[tuple[str, str, int, Work]] = []
    if cfg.backbone.data is not None:
        bt = cfg.backbone.training
        pre_images, pre_classes = pretrain
        pre_labels = np.arange(pre_images) % pre_classes
        pre_train = len(stratified_split(pre_labels, cfg.backbone.data.val_fraction, 0)[0])
        for preset in dict.fromkeys([gen, exp]):
            n = budget_steps(bt.epochs, pre_train, bt.batch_size)
            plan.append(
                ("pretrain backbones", f"{preset}: {n} steps", n, Work(preset, pre_classes, bt.model_dump_json()))
            )
    if stage1_needed:
        n = budget_steps(tc.shared_epochs, train, tc.batch_size)
        plan.append(("stage 1", f"{exp}: {n} steps", n, Work(exp, classes, stage1_training(tc).model_dump_json())))
    gt = cfg.generalist_training
    if cfg.distill.active:
        plan.append(("train generalist", f"stage 1 teaching: {train} images", train, Work(exp, classes)))
    n = budget_steps(gt.epochs, train, gt.batch_size)
    plan.append(
        ("train generalist", f"{gen}: {n} steps", n, Work(gen, classes, gt.model_dump_json(), cfg.distill.active))
    )
    per_expert = budget_steps(tc.epochs, subset * train // classes, tc.batch_size)
    runs = seeds * len(schedules) * experts
    expert_steps = TrainConfig(**tc.model_dump(include=set(TrainConfig.model_fields))).model_dump_json()
    plan.append(
        (
            "train experts",
            f"{seeds} seed(s) x {len(schedules)} schedules x {experts} experts x {per_expert} steps",
            runs * per_expert,
            Work(exp, subset + 1, expert_steps),
        )
    )
    plan.append(("train experts", f"validation: {runs} x {val} images", runs * val, Work(exp, subset + 1)))
    routed = seeds * sum(s.needs_routing for s in schedules)
    if routed:
        plan.append(
            ("train experts", f"routing: {routed} x {train + val} images", routed * (train + val), Work(gen, classes))
        )
    evaluated = val + test_images
    plan.append(("evaluate", f"generalist: {seeds} x {evaluated} images", seeds * evaluated, Work(gen, classes)))
    plan.append(
        (
            "evaluate",
            f"experts as served: {runs} x {evaluated} images",
            runs * evaluated,
            Work(exp, subset + 1, served=True),
        )
    )
    if stage1_needed:
        plan.append(
            (
                "evaluate",
                f"stage 1 as served: {seeds} x {test_images} images",
                seeds * test_images,
                Work(exp, classes, served=True),
            )
        )
    return plan


def forecast(
    cfg: SystemConfig,
    seeds: int,
    train_images: int,
    test_images: int,
    classes: int,
    pretrain: tuple[int, int],
    steps: int = TIMED_STEPS,
    warmup: int = WARMUP_STEPS,
    rounds: int = TIMING_ROUNDS,
) -> list[Job]:
    """Every job of `planned_work`: each kind of training work timed in `rounds` rounds of `steps` steps,
    interleaved (`interleaved_median`), each kind of inference once (see the module doc)."""
    size = cfg.data.synth.image_size
    flip = cfg.serving.test_time_flip
    device = resolve_device(cfg.device)
    bf16 = cpu_bfloat16_usable(cfg.serving.cpu_bfloat16, device)
    plan = planned_work(cfg, seeds, train_images, test_images, classes, pretrain)
    kinds = list(dict.fromkeys(work for *_, work in plan))
    bar = progress(
        total=rounds * sum(w.budget is not None for w in kinds) + sum(w.budget is None for w in kinds),
        desc="timing",
        unit="run",
    )

    def measure(work: Work) -> float:
        seconds = (
            time_steps(work, size, steps, warmup, cfg.distill, device)
            if work.budget is not None
            else time_inference(work, size, 1024, flip, bf16, device)
        )
        bar.update()
        return seconds

    with bar:
        timed = interleaved_median([w for w in kinds if w.budget is not None], rounds, measure)
        timed.update({w: measure(w) for w in kinds if w.budget is None})
    return [Job(stage, what, count, timed[work], work.budget is not None) for stage, what, count, work in plan]


def interleaved_median(kinds: list[K], rounds: int, measure: Callable[[K], float]) -> dict[K, float]:
    """Each kind's median over `rounds` measurements taken round-robin (every kind once per round), so that a
    spell of a faster or slower host lands in one round of every kind instead of in every round of one."""
    if rounds < 1:
        raise ConfigError(f"timing needs at least one round, got {rounds}")
    samples: dict[K, list[float]] = {w: [] for w in kinds}
    for _ in range(rounds):
        for w in kinds:
            samples[w].append(measure(w))
    return {w: float(np.median(s)) for w, s in samples.items()}


# Work the forecast does not time (reading the images, checkpoint writes, the ONNX export, the evaluation's
# choices, each expert's set-up), as a share of the budget. 6 % (the demo: 1.1 of 19.5 min) left two of the three
# CIFAR-100-sized runs from nothing on one host over 90 min: the time they took beyond the forecast at their
# factors was 11 % (Tiny-ImageNet, 96.0 min) and 10 % (CIFAR-100, 92.3 min; the evaluation ran at 1.33x its
# timed passes, the experts at 1.32x), against ~0 % for a run whose forecast had timed a slow spell. Replayed at
# their measured paces, 12 % ends those two at ~88.6 and ~89.7 min and the third at ~79.3 instead of 84.9
# (docs/cifar100-log.md, "A second run from nothing on the fourth host"). The first run with 12 % took 81.2 min,
# 2.3 % beyond its forecast (the log's "A third run from nothing on the fourth host").
UNTIMED_SHARE = 0.12


def fit_factor(jobs: list[Job], budget_s: float, spent_s: float = 0.0, untimed_share: float = UNTIMED_SHARE) -> float:
    """The factor on every epoch count that makes the forecast fit `budget_s` (at most 1: a fast host trains
    the config as written). Training jobs scale with their epochs; inference, what is already spent
    (`spent_s`: extraction, the forecast itself) and the untimed share do not. ConfigError when they alone
    leave no room for training."""
    if budget_s <= 0:
        raise ConfigError(f"the budget must be positive, got {budget_s / 60:.1f} min")
    training = sum(j.seconds for j in jobs if j.trains)
    inference, untimed = sum(j.seconds for j in jobs if not j.trains), untimed_share * budget_s
    room = budget_s - inference - spent_s - untimed
    if room <= 0:
        raise ConfigError(
            f"the {budget_s / 60:.1f}-minute budget leaves no time to train on this machine: inference "
            f"{inference / 60:.1f} min, already spent {spent_s / 60:.1f} min, untimed work {untimed / 60:.1f} min"
        )
    return 1.0 if training <= 0 else min(1.0, room / training)


@dataclass(frozen=True)
class Refit:
    """The fit corrected once the first stages have run: `pace` is their measured time over their projection at
    the fitted factor; `factor` the epoch factor for the stages still to run (at most the fitted one)."""

    done: tuple[str, ...]
    measured_s: float
    pace: float
    factor: float


def refit_factor(
    jobs: list[Job],
    factor: float,
    done: tuple[str, ...],
    measured_s: float,
    budget_s: float,
    elapsed_s: float,
    untimed_share: float = UNTIMED_SHARE,
) -> Refit:
    """The fitted `factor` corrected for the pace the stages in `done` (forecast stage names) really ran at.

    Why: the fit times a few steps per job, but a host's speed drifts by 5-15 % over a run (docs/cifar100-log.md),
    and pretraining and stage 1 are about two thirds of the benchmark; measuring them and shrinking the stages
    still to run absorbs their drift. `elapsed_s` counts from the budget's start; the untimed work keeps its
    share of the time left, so a run at the forecast's pace whose untimed work so far stayed within its share
    keeps its factor. Never above `factor` (a fast run keeps the fitted epochs); ConfigError when the budget
    left cannot cover the remaining inference at this pace."""
    projected = sum(j.seconds * (factor if j.trains else 1.0) for j in jobs if j.stage in done)
    pace = measured_s / projected if projected > 0 and measured_s > 0 else 1.0
    rest_training = sum(j.seconds for j in jobs if j.trains and j.stage not in done)
    rest_inference = sum(j.seconds for j in jobs if not j.trains and j.stage not in done)
    left = (budget_s - elapsed_s) * (1.0 - untimed_share)
    if rest_training <= 0:
        return Refit(done, measured_s, pace, factor)
    wanted = (left / pace - rest_inference) / rest_training
    if wanted <= 0:
        raise ConfigError(
            f"at {pace:.2f}x the forecast's time, the {left / 60:.1f} min the budget leaves cannot cover the "
            f"remaining inference ({rest_inference * pace / 60:.1f} min)"
        )
    return Refit(done, measured_s, pace, min(factor, wanted))


def folder_counts(root: str | Path) -> tuple[int, int, int]:
    """(train images, test images, classes) of an image-folder tree `root/{train,test}/<class>/<files>`,
    counted in the loader's own listing (`data.folder.image_listing`: the files it reads, none decoded)."""
    root = Path(root)
    train = root / "train"
    if not (train.is_dir() and any(d.is_dir() for d in train.iterdir())):
        raise ConfigError(f"{root}: no class folders under train/ (expected {root}/train/<class>/<images>)")
    listing = image_listing(train)  # the classes come from the same listing as the images
    test = len(image_listing(root / "test").samples) if (root / "test").is_dir() else 0
    return len(listing.samples), test, len(listing.classes)


def total_minutes(jobs: list[Job]) -> float:
    """The forecast's total, in minutes."""
    return sum(j.seconds for j in jobs) / 60


def forecast_table(jobs: list[Job]) -> str:
    """The forecast as a Markdown table, one row per job and the total."""
    from askexpert.evaluate.report import markdown_table

    rows = [
        {
            "stage": j.stage,
            "work": j.what,
            "ms per unit": f"{1e3 * j.seconds_per_unit:.2f}",
            "projected": f"{j.seconds / 60:.1f} min",
        }
        for j in jobs
    ]
    rows.append(
        {"stage": "**total**", "work": "", "ms per unit": "", "projected": f"**{total_minutes(jobs):.1f} min**"}
    )
    return markdown_table(rows)
