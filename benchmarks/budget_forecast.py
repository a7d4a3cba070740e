"""Benchmark: how long `benchmarks/cifar100_cpu.py` will take on this machine, measured in about 1.5 minutes.

    .venv/bin/python benchmarks/budget_forecast.py [--config configs/cifar100-cpu.yaml] [--seeds 2]

Why: the real-data benchmark's budget (90 min from nothing on 2 cores, issue 14) is a property of the
host as much as of the configuration: the same configuration took 85.5-92.7 min on 2-core hosts with
native bfloat16 and ~147-156 min on two without it (docs/cifar100-log.md). Before spending that, time
the work here: a few real optimizer steps of each training job (the real `train_model`: augmentation,
token dropout, teacher targets, optimizer; random images of the data's size) and a forward pass per image
in each runtime the pipeline uses (float32; the experts as served: mirror, bfloat16 where this CPU has
it natively), times the step and image counts the config gives for the data's size (the pipeline's own
`stratified_split` and `budget_steps`). The work is done by `askexpert.training.forecast`, which
`benchmarks/cifar100_cpu.py --fit-minutes` also uses to fit its epochs to a budget.

Not counted: extracting and reading the archives, checkpoint writes, the ONNX export, the partition and
the evaluation's choices on cached outputs, each expert's set-up (on the demo's config the projection fell
1.1 min short of the 19.5 measured, README "Benchmarks"). A 2-core VM's speed also moves 10-15 % from one
minute to the next (docs/cifar100-log.md): read the total to that precision. Prints a Markdown table;
`--out FILE.json` also writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from askexpert.config import SystemConfig
from askexpert.errors import ConfigError
from askexpert.models import resolve_device
from askexpert.models.predict import cpu_description
from askexpert.training.forecast import (
    TIMED_STEPS,
    TIMING_ROUNDS,
    WARMUP_STEPS,
    fit_factor,
    forecast,
    forecast_table,
    total_minutes,
)

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "cifar100-cpu.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--seeds", type=int, default=2, help="seeds of the expert stage (the benchmark's default: 2)")
    ap.add_argument("--train-images", type=int, default=50_000, help="train split before validation is held out")
    ap.add_argument("--test-images", type=int, default=10_000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--pretrain-images", type=int, default=50_000)
    ap.add_argument("--pretrain-classes", type=int, default=100)
    ap.add_argument("--steps", type=int, default=TIMED_STEPS, help="timed steps per round of a training job")
    ap.add_argument("--rounds", type=int, default=TIMING_ROUNDS, help="timing rounds, interleaved; the median kept")
    ap.add_argument("--warmup", type=int, default=WARMUP_STEPS, help="steps run first, not timed")
    ap.add_argument("--budget-min", type=float, default=90.0)
    ap.add_argument("--out", type=Path, default=None, help="also write the forecast as JSON")
    args = ap.parse_args()
    if min(args.seeds, args.steps, args.warmup, args.rounds, args.classes, args.pretrain_classes) < 1:
        ap.error("--seeds, --steps, --warmup, --rounds and the class counts must be at least 1")
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
        args.rounds,
    )
    total = total_minutes(jobs)
    print(forecast_table(jobs))
    verdict = "within" if total <= args.budget_min else "over"
    print(
        f"\n{args.config.name}, {args.seeds} seed{'s' * (args.seeds != 1)}, {resolve_device(cfg.device)} "
        f"({cpu_description()}, {torch.get_num_threads()} torch threads): "
        f"{total:.1f} min projected, {verdict} the {args.budget_min:.0f}-minute budget "
        "(not counted: extraction, reading, checkpoints, export, the evaluation's choices; the host's speed "
        "moves 10-15 %)"
    )
    if total > args.budget_min:
        try:
            factor = fit_factor(jobs, 60 * args.budget_min)
            print(
                f"epochs x {factor:.3f} would fit it (`benchmarks/cifar100_cpu.py --fit-minutes {args.budget_min:g}`)"
            )
        except ConfigError as exc:
            print(exc)
    if args.out is not None:
        payload = {
            "config": str(args.config),
            "seeds": args.seeds,
            "threads": torch.get_num_threads(),
            "cpu": cpu_description(),
            "jobs": [j.record() for j in jobs],
            "total_min": total,
            "budget_min": args.budget_min,
        }
        args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
