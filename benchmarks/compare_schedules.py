"""Compare expert schedules of one system on the validation split only (no test image is read).

    .venv/bin/python benchmarks/compare_schedules.py --system runs/x/seed0 --schedules progressive,progressive_hard

For a schedule tried beside the served one (a new option, before it may become a config's
default): per schedule, the best served point of each combination rule (τ, k, w and the
second expert chosen as `askexpert evaluate` chooses them), what collaboration lives on
(fixes, breaks, the oracle gate), the experts on their own classes (beside the generalist
and stage 1 there), and every gate's parity offload and accuracy at 10/20/30 % offload, the
learned gate out-of-fold. All of it
is validation: a choice between schedules is a choice, and the test split stays unread.
Writes OUT/schedules-val.{md,json} (OUT defaults to the system's report/ folder).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from askexpert.evaluate.cache import build_cache, build_stage1_logits
from askexpert.evaluate.gates import learned_stats
from askexpert.evaluate.metrics import expert_table, fixes_and_breaks, gate_comparison
from askexpert.evaluate.report import markdown_table
from askexpert.evaluate.run import choose_on_validation, evaluated_ks
from askexpert.system import SystemDir


def compare(system: SystemDir, schedules: list[str]) -> dict[str, Any]:
    cfg = system.config()
    val = build_cache(system, schedules, split="val")
    ks = evaluated_ks(system, val)
    # the validation split stands in for "test" in every call below: each figure is a validation figure, the
    # learned gate's the out-of-fold scores (the full fit is never scored on the samples it saw)
    _, stats, _ = learned_stats(system, val, val, ks, cfg.routing.scoring)
    chosen, rule_rows = choose_on_validation(system, val, val, stats, stats)
    gen_acc = float((val.gen_pred == val.labels).mean())
    experts = expert_table(val, build_stage1_logits(system, split="val"))
    rows = []
    for schedule in schedules:
        point = chosen[schedule]
        every = fixes_and_breaks(val, val.schedules[schedule], point, "val", schedule)[-1]
        closed = float(np.mean([r[schedule] for r in experts]))
        gates = {
            g: gate_comparison(
                val,
                val,
                stats(g, schedule, point.top_k),
                stats(g, schedule, point.top_k),
                g,
                schedule,
                point.top_k,
                cfg.routing.scoring,
            )
            for g in stats.gates
        }
        best_rule = max((r for r in rule_rows if r["schedule"] == schedule), key=lambda r: r["val_accuracy"])
        row: dict[str, Any] = {
            "schedule": schedule,
            "served_point": point.describe(),
            "system_%": 100 * best_rule["val_accuracy"],
            "requests_%": 100 * best_rule["test_offload_rate"],
            "fixes_%": 100 * every["fixes"] / len(val.labels),
            "breaks_%": 100 * every["breaks"] / len(val.labels),
            "oracle_gain_points": 100 * (every["oracle_gate_accuracy"] - gen_acc),
            "closed_set_%": 100 * closed,
            "generalist_closed_set_%": 100 * float(np.mean([r["generalist closed-set"] for r in experts])),
        }
        if "stage 1 closed-set" in experts[0]:  # where `init: shared` experts start: what their stages added
            row["stage1_closed_set_%"] = 100 * float(np.mean([r["stage 1 closed-set"] for r in experts]))
        for g, r in gates.items():
            row[f"{g}_parity_%"] = 100 * r["parity_val_offload"]
            row[f"{g}_at_10/20/30_%"] = " / ".join(f"{100 * r[f'test_accuracy_at_{p}']:.2f}" for p in (10, 20, 30))
            row[f"{g}_oracle_share_30"] = r["oracle_share_at_30"]
        rows.append(row)
    return {"generalist_%": 100 * gen_acc, "val_samples": int(len(val.labels)), "rows": rows, "rules": rule_rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--system", type=Path, required=True)
    ap.add_argument("--schedules", required=True, help="comma-separated schedule names of the system's config")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    system = SystemDir.open(args.system)
    result = compare(system, [s for s in args.schedules.split(",") if s])
    out = args.out or system.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    (out / "schedules-val.json").write_text(json.dumps(result, indent=1, default=float))
    fmt = [{k: f"{v:.2f}" if isinstance(v, float) else v for k, v in r.items()} for r in result["rows"]]
    lines = [
        f"# Schedules compared on validation ({result['val_samples']} images; generalist "
        f"{result['generalist_%']:.2f} %)\n",
        markdown_table([{"metric": k, **{r["schedule"]: r[k] for r in fmt}} for k in fmt[0] if k != "schedule"]),
    ]
    text = "\n".join(lines)
    (out / "schedules-val.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
