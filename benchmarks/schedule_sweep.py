"""Benchmark: one expert trained under several schedules at the same budget, judged on validation.

    .venv/bin/python benchmarks/schedule_sweep.py --system askexpert-demo --experts e0,e4 [--schedules FILE]

Why: which schedule works at *your* budget, asked without touching the test split:
every schedule of an expert gets the same optimizer steps × batch and seed (schedules
with the same `init` start from the same weights; `init: shared` ones from the shared
stage 1, trained once), and is scored by its closed-set accuracy on the expert's
classes in the **validation** split.

Schedules: those of the system's config, plus a few built-in variants, plus any in
`--schedules FILE` (YAML: name → schedule, as in the config's
`expert_training.schedules`). Writes `report/schedule_sweep.{md,csv,json,png}`.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import yaml
from pydantic import ValidationError

from askexpert.config import LEGACY_PROGRESSIVE, ExpertTrainConfig
from askexpert.models import load_checkpoint, resolve_device
from askexpert.system import SystemDir
from askexpert.training.experts import routing_pools, train_expert
from askexpert.training.shared import pretrained_for, stage1_logits, train_shared_stage

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    # askexpert 0.1's progressive schedule: no shared stage, "other" dropped at the end
    "progressive-legacy": LEGACY_PROGRESSIVE.model_dump(),
    # stage 1, then the subset alone (no "other" kept): what the head swap alone buys
    "shared-then-subset": {"init": "shared", "stages": [{"fraction": 1.0, "subset_share": 1.0}]},
    # stage 1, then a constant "other" share from every out-of-subset sample, uncorrected
    "shared-mixed-0.8": {"init": "shared", "stages": [{"fraction": 1.0, "subset_share": 0.8}]},
}


def sweep_training(tc: ExpertTrainConfig, extra_file: Path | None, epochs: float | None) -> ExpertTrainConfig:
    """The config's expert training with the sweep's schedules (and budget, if overridden)."""
    raw: dict[str, Any] = {name: sched.model_dump() for name, sched in tc.schedules.items()}
    raw.update(VARIANTS)
    if extra_file is not None:
        loaded = yaml.safe_load(extra_file.read_text())
        if not isinstance(loaded, dict):
            raise SystemExit(f"{extra_file}: expected a mapping of schedule name → schedule")
        raw.update(loaded)
    # Validated exactly as the config validates schedules (fractions sum to 1, shares in (0, 1]).
    update: dict[str, Any] = {"schedules": raw} if epochs is None else {"schedules": raw, "epochs": epochs}
    try:
        return ExpertTrainConfig.model_validate({**tc.model_dump(), **update})
    except ValidationError as exc:
        raise SystemExit(f"bad schedule: {exc}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--system", default="askexpert-demo")
    ap.add_argument("--experts", default="e0", help="comma-separated expert ids")
    ap.add_argument("--schedules", type=Path, default=None, help="YAML file with more schedules")
    ap.add_argument("--epochs", type=float, default=None, help="override expert_training.epochs (the budget)")
    args = ap.parse_args()

    system = SystemDir.open(args.system)
    cfg = system.config()
    tc = sweep_training(cfg.expert_training, args.schedules, args.epochs)
    sweep_cfg = cfg.model_copy(update={"expert_training": tc})
    epochs = tc.epochs
    part = system.partition()
    splits = system.splits()
    train, val = splits.train, splits.val
    device = resolve_device(cfg.device)
    schedules = tc.schedules
    stage1 = None
    if any(s.init == "shared" or s.distills for s in schedules.values()):
        train_shared_stage(system)  # current before its weights or its logits are read
    if any(s.init == "shared" for s in schedules.values()):  # a distilling schedule needs only the logits below
        stage1, _ = load_checkpoint(system.stage1_path)
    # stage 1's logits on train, once for every schedule that distils from it
    teacher = stage1_logits(system, train.images, "sweep") if any(s.distills for s in schedules.values()) else None
    needs_routing = any(s.needs_routing for s in schedules.values())
    pools = routing_pools(sweep_cfg, system, part, train, val, device) if needs_routing else None
    pretrained = pretrained_for(system, "expert")
    rows: list[dict[str, Any]] = []
    for eid in [e.strip() for e in args.experts.split(",") if e.strip()]:
        if eid not in part.expert_ids:
            raise SystemExit(f"unknown expert {eid!r}; partition has {', '.join(part.expert_ids)}")
        e = part.expert_ids.index(eid)
        subset = part.subsets[e]
        for name, sched in schedules.items():
            start = time.perf_counter()
            # the same function, seed and plan builder as `askexpert train experts`
            trained = train_expert(
                sweep_cfg,
                train,
                val,
                subset,
                e,
                name,
                device,
                desc=f"{eid} {name}",
                stage1=stage1,
                pools=pools,
                pretrained_file=pretrained,
                teacher=teacher,
            )
            rows.append(
                {
                    "expert": eid,
                    "schedule": name,
                    "schedule_spec": json.dumps(sched.model_dump()),
                    "steps": len(trained.plan),
                    "batch_size": int(trained.plan.shape[1]),
                    "subset_samples_seen": int(np.isin(train.labels[trained.plan], subset).sum()),
                    "val_samples": int(np.isin(val.labels, subset).sum()),  # judge differences against this
                    "val_subset_accuracy": trained.val_subset_accuracy,
                    "train_s": time.perf_counter() - start,  # training plus one validation pass
                }
            )
            print(f"{eid} {name}: val subset accuracy {rows[-1]['val_subset_accuracy']:.4f}", flush=True)

    out = system.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    columns = ["expert", "schedule", "steps", "batch_size", "subset_samples_seen", "val_samples"]
    columns += ["val_subset_accuracy", "train_s"]
    lines = [
        f"# Schedule sweep ({epochs:g} epochs over each subset, validation split)",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for r in rows:
        cells = [f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "schedule_sweep.md").write_text("\n".join(lines) + "\n")
    with (out / "schedule_sweep.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "schedule_sweep.json").write_text(json.dumps({"epochs": epochs, "rows": rows}, indent=2))

    experts = sorted({r["expert"] for r in rows})
    names = list(schedules)
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(names) * len(experts) / 2, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        acc = [next(r["val_subset_accuracy"] for r in rows if r["expert"] == x and r["schedule"] == name)
               for x in experts]  # fmt: skip
        ax.bar(np.arange(len(experts)) + i * width, acc, width, label=name)
    ax.set_xticks(np.arange(len(experts)) + 0.4 - width / 2, experts)
    ax.set_xlabel("expert")
    ax.set_ylabel("validation accuracy on the expert's classes (fraction)")
    ax.set_title(f"Schedules at an equal budget ({epochs:g} epochs over the subset)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "schedule_sweep.png", dpi=120)
    print("\n".join(lines))
    print(f"written to {out}/schedule_sweep.*")


if __name__ == "__main__":
    main()
