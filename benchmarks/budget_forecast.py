"""Benchmark: how long `benchmarks/cifar100_cpu.py` will take on this machine, measured in about a minute.

    .venv/bin/python benchmarks/budget_forecast.py [--config configs/cifar100-cpu.yaml] [--seeds 2]

Why: the real-data benchmark's budget (90 min from nothing on 2 cores, issue 14) is a property of the
host as much as of the configuration: the same configuration took 85.5-92.7 min on 2-core hosts with
native bfloat16 and ~147 min on one without AVX-512 (docs/cifar100-log.md). Before spending that, time
the work here: a few real optimizer steps of each training job (the real `train_model`: augmentation,
token dropout, teacher targets, optimizer; random images of the data's size) and a forward pass per image
in each runtime the pipeline uses (float32; the experts as served: mirror, bfloat16 where this CPU has
it natively), times the step and image counts the config gives for the data's size (the pipeline's own
`stratified_split` and `budget_steps`).

Not counted: extracting and reading the archives, checkpoint writes, the ONNX export, the partition and
the evaluation's choices on cached outputs, each expert's set-up (on the demo's config the projection fell
1.1 min short of the 19.5 measured, README "Benchmarks"). A 2-core VM's speed also moves 10-15 % from one
minute to the next (docs/cifar100-log.md): read the total to that precision. Prints a Markdown table;
`--out FILE.json` also writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from askexpert.config import DistillConfig, SystemConfig, TrainConfig
from askexpert.data.base import stratified_split
from askexpert.errors import ConfigError
from askexpert.evaluate.report import markdown_table
from askexpert.models import create_model, predict_logits, resolve_device
from askexpert.models.predict import cpu_bfloat16_usable, cpu_description
from askexpert.progress import progress
from askexpert.training.loop import train_model
from askexpert.training.plans import budget_steps
from askexpert.training.shared import stage1_training

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "cifar100-cpu.yaml"


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

    @property
    def seconds(self) -> float:
        return self.count * self.seconds_per_unit


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
    steps: int,
    warmup: int,
) -> list[Job]:
    """Every job of `planned_work`, each kind of work timed once here (see the module doc)."""
    size = cfg.data.synth.image_size
    flip = cfg.serving.test_time_flip
    device = resolve_device(cfg.device)
    bf16 = cpu_bfloat16_usable(cfg.serving.cpu_bfloat16, device)
    timed: dict[Work, float] = {}
    jobs = []
    for stage, what, count, work in progress(
        planned_work(cfg, seeds, train_images, test_images, classes, pretrain), desc="timing", unit="job"
    ):
        if work not in timed:
            timed[work] = (
                time_steps(work, size, steps, warmup, cfg.distill, device)
                if work.budget is not None
                else time_inference(work, size, 1024, flip, bf16, device)
            )
        jobs.append(Job(stage, what, count, timed[work]))
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--seeds", type=int, default=2, help="seeds of the expert stage (the benchmark's default: 2)")
    ap.add_argument("--train-images", type=int, default=50_000, help="train split before validation is held out")
    ap.add_argument("--test-images", type=int, default=10_000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--pretrain-images", type=int, default=50_000)
    ap.add_argument("--pretrain-classes", type=int, default=100)
    ap.add_argument("--steps", type=int, default=30, help="timed optimizer steps per training job")
    ap.add_argument("--warmup", type=int, default=5, help="steps run first, not timed")
    ap.add_argument("--budget-min", type=float, default=90.0)
    ap.add_argument("--out", type=Path, default=None, help="also write the forecast as JSON")
    args = ap.parse_args()
    if min(args.seeds, args.steps, args.warmup, args.classes, args.pretrain_classes) < 1:
        ap.error("--seeds, --steps, --warmup and the class counts must be at least 1")
    if args.train_images < 2 * args.classes or args.pretrain_images < 2 * args.pretrain_classes:
        ap.error("every class needs at least 2 training images (one is held out for validation)")
    try:
        cfg = SystemConfig.from_yaml(args.config)
    except ConfigError as exc:
        ap.error(str(exc))
    jobs = forecast(
        cfg,
        args.seeds,
        args.train_images,
        args.test_images,
        args.classes,
        (args.pretrain_images, args.pretrain_classes),
        args.steps,
        args.warmup,
    )
    rows = [
        {
            "stage": j.stage,
            "work": j.what,
            "ms per unit": f"{1e3 * j.seconds_per_unit:.2f}",
            "projected": f"{j.seconds / 60:.1f} min",
        }
        for j in jobs
    ]
    total = sum(j.seconds for j in jobs) / 60
    rows.append({"stage": "**total**", "work": "", "ms per unit": "", "projected": f"**{total:.1f} min**"})
    print(markdown_table(rows))
    verdict = "within" if total <= args.budget_min else "over"
    print(
        f"\n{args.config.name}, {args.seeds} seed{'s' * (args.seeds != 1)}, {resolve_device(cfg.device)} "
        f"({cpu_description()}, {torch.get_num_threads()} torch threads): "
        f"{total:.1f} min projected, {verdict} the {args.budget_min:.0f}-minute budget "
        "(not counted: extraction, reading, checkpoints, export, the evaluation's choices; the host's speed "
        "moves 10-15 %)"
    )
    if args.out is not None:
        payload = {
            "config": str(args.config),
            "seeds": args.seeds,
            "threads": torch.get_num_threads(),
            "cpu": cpu_description(),
            "jobs": [{**asdict(j), "seconds": j.seconds} for j in jobs],
            "total_min": total,
            "budget_min": args.budget_min,
        }
        args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
