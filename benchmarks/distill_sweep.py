"""Benchmark: the generalist trained with each distillation (and starting-point) setting, judged on validation.

    .venv/bin/python benchmarks/distill_sweep.py --system runs/cifar100-cpu/seed0 [--variants none,soft,hard]

Why: `distill` (teacher, soft or hard targets, alpha, temperature) is a choice, and
choices are made on the validation split. Each variant trains the system's generalist
preset with the system's budget, seed and starting point, in a scratch copy of the
system directory (`OUT/<variant>/`, sharing the backbones and the stage-1 teacher),
and is scored by its accuracy on the validation split; the system itself is not
changed. Writes `OUT/distill_sweep.{md,csv,json}` (default OUT: SYSTEM/report/).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from askexpert.config import SystemConfig
from askexpert.evaluate.report import markdown_table, write_csv
from askexpert.system import SystemDir
from askexpert.training.generalist import train_generalist

VARIANTS: dict[str, dict[str, Any]] = {  # name → config sections merged over the system's
    "none": {"distill": {"teacher": "none"}},
    "soft": {"distill": {"teacher": "stage1", "mode": "soft"}},
    "hard": {"distill": {"teacher": "stage1", "mode": "hard"}},
    "soft-a0.2": {"distill": {"teacher": "stage1", "mode": "soft", "alpha": 0.2}},
    "soft-t1": {"distill": {"teacher": "stage1", "mode": "soft", "temperature": 1.0}},
    "none-scratch": {"distill": {"teacher": "none"}, "backbone": {"data": None}},  # no pretraining either
    # the config's soft targets with a light RandAugment for the student (the teacher's logits stay unaugmented)
    "soft-ra5": {"distill": {"teacher": "stage1", "mode": "soft"}, "generalist_training": {"randaugment_ops": 2}},
    # soft targets at 18 epochs: the probe that moved configs/cifar100-cpu.yaml from 15 to 18 (README)
    "soft-e18": {"distill": {"teacher": "stage1", "mode": "soft"}, "generalist_training": {"epochs": 18}},
    # soft targets, half of each image's tokens dropped in training (a step ~0.6x the cost), 28 epochs in the time of 18
    "soft-td-e28": {
        "distill": {"teacher": "stage1", "mode": "soft"},
        "generalist_training": {"epochs": 28, "token_drop": 0.5},
    },
    # the same with softer targets (58 epochs of stage 1 taught a weaker student than 42, README): temperature 4,
    # or less weight on the teacher
    "soft-td-e28-t4": {
        "distill": {"teacher": "stage1", "mode": "soft", "temperature": 4.0},
        "generalist_training": {"epochs": 28, "token_drop": 0.5},
    },
    "soft-td-e28-a0.2": {
        "distill": {"teacher": "stage1", "mode": "soft", "alpha": 0.2},
        "generalist_training": {"epochs": 28, "token_drop": 0.5},
    },
}


def scratch_system(source: SystemDir, root: Path, patch: dict[str, Any]) -> SystemDir:
    """A copy of `source`'s config with `patch` merged in, sharing its data, backbones and stage 1."""
    cfg = source.config()
    raw = cfg.model_dump(mode="json")
    raw["data"]["root"] = str(source.resolve(cfg.data.root))
    if cfg.backbone.data is not None:
        raw["backbone"]["data"]["root"] = str(source.resolve(cfg.backbone.data.root))
    system = SystemDir.create(root, SystemConfig.from_dict(raw, origin=str(root)), overwrite=True)
    system.update_config(f"distill_sweep {root.name}", **patch)
    # the generalist too: where the variant is the system's own setting, its fingerprint matches and it is reused
    for name in ("stage1.safetensors", "stage1.json", "generalist.safetensors", "generalist.json"):
        if (source.root / name).is_file():
            shutil.copy2(source.root / name, root / name)
    if (source.root / "backbones").is_dir():
        shutil.copytree(source.root / "backbones", root / "backbones", dirs_exist_ok=True)
    return system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--system", type=Path, required=True)
    ap.add_argument("--variants", default="none,soft,hard", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    source = SystemDir.open(args.system)
    out = (args.out or source.report_dir).resolve()
    rows = []
    for name in names:
        start = time.perf_counter()
        system = scratch_system(source, out / "distill_sweep" / name, VARIANTS[name])
        meta = train_generalist(system)
        rows.append(
            {
                "variant": name,
                **{f"distill_{k}": v for k, v in system.config().distill.model_dump().items()},
                "pretrained": system.config().backbone.data is not None,
                "val_accuracy": meta.metrics["val_accuracy"],
                "train_loss": meta.metrics.get("train_loss"),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        print(rows[-1], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    text = "# Generalist distillation variants (validation split)\n\n" + markdown_table(rows)
    (out / "distill_sweep.md").write_text(text)
    write_csv(out / "distill_sweep.csv", rows)
    (out / "distill_sweep.json").write_text(json.dumps(rows, indent=1))
    print(text)


if __name__ == "__main__":
    main()
