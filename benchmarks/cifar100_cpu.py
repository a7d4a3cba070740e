"""Benchmark: the paper's experiment on real CIFAR-100, from nothing, on CPU.

    .venv/bin/python benchmarks/cifar100_cpu.py \\
        --data ../shared/data/cifar100-png.tar.gz --pretrain-data ../shared/data/tinyimagenet-other100-32px.tar.gz \\
        --out runs/cifar100-cpu --seeds 0,1

`--data`/`--pretrain-data` take an image-folder tree or a .tar.gz of one (extracted
under OUT/data/). Per seed of the expert stage, one system directory
`OUT/seed<N>/` runs every stage of `configs/cifar100-cpu.yaml` (backbones,
generalist and partition are trained once, in seed 0, and shared; so is stage 1
when `expert_training.shared_seed` pins it, as the config does, since it teaches the
generalist; the experts are retrained per seed). Every choice is made on the validation split;
the test split is read once per seed for the final table. Writes
`OUT/benchmark.{md,json,csv}` and `OUT/benchmark.png`: mean and spread over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from askexpert.config import EPOCH_STAGES, SystemConfig  # noqa: E402
from askexpert.errors import ConfigError  # noqa: E402
from askexpert.evaluate.metrics import GATE_METRICS  # noqa: E402
from askexpert.evaluate.report import markdown_table, write_csv  # noqa: E402
from askexpert.pipeline import STAGE1, run_first_stages, run_pipeline  # noqa: E402
from askexpert.system import SystemDir  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "cifar100-cpu.yaml"
SHARED_FILES = ("generalist.safetensors", "generalist.json", "partition.json")
# stage 1 is shared too when its seed is pinned (`shared_seed`: it teaches the generalist)
STAGE1_FILES = ("stage1.safetensors", "stage1.json")
# what --report-only keeps of the timed run's record: how it ran, which re-evaluating cannot know
RUN_RECORD = (
    "data",
    "wall_s",
    "wall_from_budget_start_s",
    "machine",
    "scale",
    "fit",
    "timings",
    "trained_before",
    "resumed",
)


def image_tree(source: Path, out: Path, marker: str) -> Path:
    """An extracted image-folder tree: `source` itself, or its archive extracted under `out`."""
    if source.is_dir():
        return source.resolve()
    if not source.is_file():
        raise SystemExit(f"{source}: neither a folder nor an archive")
    out.mkdir(parents=True, exist_ok=True)
    found = sorted(p.parent for p in out.glob(f"*/{marker}"))
    if not found:
        print(f"extracting {source} into {out} ...", flush=True)
        with tarfile.open(source) as tar:
            tar.extractall(out, filter="data")
        found = sorted(p.parent for p in out.glob(f"*/{marker}"))
    if not found:
        raise SystemExit(f"{source}: no folder with {marker} inside")
    return found[0].resolve()


def seed_system(out: Path, cfg: SystemConfig, seed: int, first: SystemDir | None) -> SystemDir:
    """`OUT/seed<N>`: the config with the expert stage's seed; shared stages copied from the first seed."""
    root = out / f"seed{seed}"
    tc = cfg.expert_training.model_copy(update={"seed": seed})
    seeded = cfg.model_copy(update={"expert_training": tc, "name": f"{cfg.name}-seed{seed}"})
    if (root / "config.yaml").is_file():
        system = SystemDir.open(root)
        seeded.to_yaml(system.config_path)
    else:
        system = SystemDir.create(root, seeded)
    if first is not None and first.root != root:
        shared = SHARED_FILES + (STAGE1_FILES if cfg.expert_training.shared_seed is not None else ())
        for name in shared:
            shutil.copy2(first.root / name, root / name)
        if (first.root / "backbones").is_dir():
            shutil.copytree(first.root / "backbones", root / "backbones", dirs_exist_ok=True)
    return system


def fit_to_budget(cfg: SystemConfig, out: Path, seeds: int, minutes: float, spent_s: float) -> dict[str, Any]:
    """The epoch factor that fits `minutes` here (`askexpert.training.forecast`), with the forecast behind
    it; kept in OUT/fit.json and reused while the config, data, seeds and budget are the same, so that a
    stopped run resumes with the epochs it started with (its checkpoints' fingerprints depend on them)."""
    from askexpert.models.predict import cpu_description
    from askexpert.training.forecast import fit_factor, folder_counts, forecast, forecast_table, total_minutes

    key = {"config": cfg.model_dump(mode="json"), "seeds": seeds, "budget_min": minutes}
    record = out / "fit.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("key") == key:
            print(f"epochs x {saved['factor']:.3f}, as fitted before ({record})", flush=True)
            return saved
    train, test, classes = folder_counts(cfg.data.root)
    pretrain = (0, 0)
    if cfg.backbone.data is not None:
        pre_train, _, pre_classes = folder_counts(cfg.backbone.data.root)
        pretrain = (pre_train, pre_classes)
    began = time.perf_counter()
    jobs = forecast(cfg, seeds, train, test, classes, pretrain)
    spent_s += time.perf_counter() - began
    factor = fit_factor(jobs, 60 * minutes, spent_s)
    projected = total_minutes(jobs)
    print(forecast_table(jobs), flush=True)
    print(
        f"{projected:.1f} min projected at the config's epochs on this machine; epochs x {factor:.3f} to fit "
        f"{minutes:g} min ({spent_s / 60:.1f} min spent so far)",
        flush=True,
    )
    fitted = {
        "key": key,
        "factor": factor,
        "budget_min": minutes,
        "projected_min": projected,
        "spent_before_training_s": spent_s,
        "cpu": cpu_description(),
        "jobs": [j.record() for j in jobs],
    }
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(fitted, indent=1) + "\n")
    return fitted


# the forecast's stage names for the pipeline's first stages, and the config's epoch counts they train
FIRST_STAGES = {"pretrain backbones": ("pretrain backbones", "backbone"), STAGE1: ("stage 1", "stage1")}


def refit_to_pace(
    cfg: SystemConfig, out: Path, seed: int, fit: dict[str, Any], elapsed: Callable[[], float]
) -> tuple[SystemConfig, dict[str, float]]:
    """Trains the first seed's stages before the generalist (timed), then corrects the fit for the pace they ran
    at (`askexpert.training.forecast.refit_factor`): the stages still to run train epochs x the corrected
    factor. The correction is kept in fit.json, so a resumed run trains the epochs it started with; none is
    made when those stages were trained before this run (their pace is unknown). `elapsed()`: seconds since
    the budget's start. Returns the config for every seed and the first stages' seconds."""
    from askexpert.training.forecast import Job, refit_factor

    saved = fit.get("refit")
    timings: dict[str, float] = {}
    if saved is None:
        system = seed_system(out, cfg, seed, None)
        presets = {cfg.generalist.preset, cfg.expert.preset}
        before = [p for p in (system.stage1_path, *map(system.backbone_path, presets)) if p.exists()]
        timings = run_first_stages(system, log=lambda m: print(m, flush=True))
        ran = [name for name in FIRST_STAGES if name in timings]
        if before or not ran:
            print("no correction of the fit: its first stages were trained before this run", flush=True)
            return cfg, timings
        try:
            refit = refit_factor(
                [Job.from_record(j) for j in fit["jobs"]],
                fit["factor"],
                tuple(FIRST_STAGES[name][0] for name in ran),
                sum(timings[name] for name in ran),
                60 * fit["budget_min"],
                elapsed(),
            )
        except ConfigError as exc:
            print(f"the budget cannot be held: {exc}; the rest keeps epochs x {fit['factor']:.3f}", flush=True)
            return cfg, timings
        done = {FIRST_STAGES[name][1] for name in ran}
        saved = {**asdict(refit), "stages": [s for s in EPOCH_STAGES if s not in done]}
        fit["refit"] = saved
        (out / "fit.json").write_text(json.dumps(fit, indent=1) + "\n")
        print(
            f"{', '.join(refit.done)} ran at {refit.pace:.2f}x the forecast's time: {', '.join(saved['stages'])} "
            f"epochs x {refit.factor:.3f} (fitted: x {fit['factor']:.3f})",
            flush=True,
        )
    if saved["factor"] < fit["factor"]:
        cfg = cfg.with_epochs_scaled(saved["factor"] / fit["factor"], saved["stages"])
    return cfg, timings


def fit_line(result: dict[str, Any]) -> str:
    """What --fit-minutes did, for the table's header: the figures depend on it."""
    fit = result.get("fit")
    if not fit:
        return ""
    if fit["factor"] >= 1:
        line = f" Fits {fit['budget_min']:g} min here at the config's epochs (projected {fit['projected_min']:.1f})."
    else:
        line = (
            f" **Epochs x {fit['factor']:.3f}** to fit {fit['budget_min']:g} min on this machine (projected "
            f"{fit['projected_min']:.1f} min at the config's epochs): weaker models than the config's."
        )
    refit = fit.get("refit")
    if refit and refit["factor"] < fit["factor"]:
        line += (
            f" {', '.join(refit['done'])} ran at {refit['pace']:.2f}x the forecast's time, so "
            f"{', '.join(refit['stages'])} trained epochs x {refit['factor']:.3f}."
        )
    return line


def data_record(root: Path) -> dict[str, Any]:
    """What benchmark.json keeps of the data the run read: its tree, and whether it is the CIFAR-100 tree
    shared/data ships (its `classes.json`), decided while the tree is there (`--report-only` may run without it)."""
    return {"root": str(root), "cifar100": (root / "classes.json").is_file()}


def data_names(result: dict[str, Any]) -> tuple[str, str]:
    """(title, test-split sentence) for the data the run read: CIFAR-100's wording for shared/data's tree or a
    record that predates `data`, else the tree's own name (the same script runs on any image-folder tree, e.g.
    the log's Tiny-ImageNet check)."""
    data = result.get("data")
    if data is None or data["cifar100"]:
        return "real CIFAR-100", (
            "the re-drawn 100-per-class split of shared/data's CIFAR-100 (close to, not strictly comparable "
            "with, the official test set)"
        )
    return f"the image folder `{Path(data['root']).name}`", f"the `test/` folder of `{data['root']}`"


def spread(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "n": len(arr)}


def fmt(stat: dict[str, float], scale: float = 100.0) -> str:
    return f"{stat['mean'] * scale:.2f} ± {stat['std'] * scale:.2f}"


def aggregate(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of the paper's table."""
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for summary in summaries:
        for row in summary["headline"]:
            name = row["system"].split(" (")[0]  # the chosen point differs per seed: group by kind
            rows.setdefault((row["schedule"], name), []).append(row)
    table = []
    for (schedule, name), group in rows.items():
        entry: dict[str, Any] = {"schedule": schedule, "system": name, "points": [r["system"] for r in group]}
        for metric in ("accuracy", "offload_rate", "routing_hit_rate", "abstain_rate"):
            vals = [r[metric] for r in group if r.get(metric) is not None and not np.isnan(r[metric])]
            if vals:
                entry[metric] = spread(vals)
        table.append(entry)
    versus = {}
    for row in (r for s in summaries for r in s.get("versus_static", [])):
        for metric in ("closed_set_subsets", "open_set_subsets", "system"):
            versus.setdefault(row["schedule"], {}).setdefault(metric, []).append(row[metric])
    subset_acc = {}
    for s in summaries:
        for schedule in s["schedules"]:
            for kind, suffix in (("closed", ""), ("open", " open-set")):
                accs = [r[f"{schedule}{suffix}"] for r in s["experts"]]
                subset_acc.setdefault((schedule, kind), []).append(float(np.nanmean(accs)))
        subset_acc.setdefault(("generalist", "closed"), []).append(
            float(np.mean([r.get("generalist closed-set", np.nan) for r in s["experts"]]))
        )
        if all("stage 1 closed-set" in r for r in s["experts"]):  # the experts' start: what their stages added
            subset_acc.setdefault(("stage 1", "closed"), []).append(
                float(np.mean([r["stage 1 closed-set"] for r in s["experts"]]))
            )
    collab: dict[tuple[str, str], dict[str, list[float]]] = {}
    for s in summaries:
        for row in s.get("collaboration", []):
            if row["expert"] != "all":
                continue
            entry = collab.setdefault((row["schedule"], row["split"]), {})
            n = row["routed"]
            for metric, value in (
                ("fixes_%", row["fixes"] / n),
                ("breaks_%", row["breaks"] / n),
                ("routing_hit_%", row["routing_hit_rate"]),
                ("generalist_%", row["generalist_accuracy"]),
                ("oracle_gate_%", row["oracle_gate_accuracy"]),
                ("oracle_gate_gain_points", row["oracle_gate_accuracy"] - row["generalist_accuracy"]),
            ):
                entry.setdefault(metric, []).append(value)
    gates: dict[tuple[str, str], dict[str, list[float]]] = {}
    for s in summaries:
        by_schedule: dict[str, list[dict[str, Any]]] = {}
        for row in s.get("gates", []):
            by_schedule.setdefault(row["schedule"], []).append(row)
            entry = gates.setdefault((row["schedule"], row["gate"]), {})
            for metric in GATE_METRICS:
                entry.setdefault(metric, []).append(row[metric])
        for schedule, rows_ in by_schedule.items():  # learned − the best confidence gate, at equal offload
            learned = next((r for r in rows_ if r["gate"] == "learned"), None)
            if learned is None:
                continue
            entry = gates.setdefault((schedule, "learned − best confidence gate"), {})
            for pct in (10, 20, 30):
                best = max(r[f"test_accuracy_at_{pct}"] for r in rows_ if r["gate"] != "learned")
                entry.setdefault(f"test_accuracy_at_{pct}", []).append(learned[f"test_accuracy_at_{pct}"] - best)
    return {
        "table": table,
        "gates": [{"schedule": sc, "gate": g, **{m: spread(v) for m, v in d.items()}} for (sc, g), d in gates.items()],
        "model_validation": summaries[0].get("model_validation", {}),
        "collaboration": [
            {"schedule": sched, "split": split, **{m: spread(v) for m, v in d.items()}}
            for (sched, split), d in collab.items()
        ],
        "versus_static": {k: {m: spread(v) for m, v in d.items()} for k, d in versus.items()},
        "subset_accuracy": [
            {"model": schedule, "kind": kind, **spread(v)} for (schedule, kind), v in subset_acc.items()
        ],
        "budgets": summaries[0].get("budgets", []),
        "chosen_points": [s.get("chosen_on_validation", {}) for s in summaries],
        "combination_rules": [r for s in summaries for r in s.get("combination_rules", [])],
        "rules": rule_families(summaries),
    }


def rule_families(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each combination rule's best point (one expert, or a second one for close calls), over seeds."""
    families: dict[tuple[str, str], dict[str, list[float]]] = {}
    for row in (r for s in summaries for r in s.get("combination_rules", [])):
        entry = families.setdefault((row["schedule"], row["rule"]), {})
        for metric in ("val_accuracy", "test_accuracy", "test_offload_rate", "test_routing_hit_rate"):
            if row.get(metric) is not None:
                entry.setdefault(metric, []).append(row[metric])
    return [
        {"schedule": sc, "rule": rule, **{m: spread(v) for m, v in d.items()}} for (sc, rule), d in families.items()
    ]


def trained_before(out: Path, seeds: list[int], since: float) -> list[str]:
    """The checkpoints under OUT that this invocation found already trained (written before `since`, a Unix
    time): the stages they hold were skipped by their fingerprints, so its wall time is not the benchmark's from
    nothing. The seeds after the first copy the shared stages by design: only their experts count."""
    found = []
    for i, seed in enumerate(seeds):
        root = out / f"seed{seed}"
        pattern = "**/*.safetensors" if i == 0 else "experts/**/*.safetensors"
        found += [str(f.relative_to(out)) for f in sorted(root.glob(pattern)) if f.stat().st_mtime < since]
    return found


def resumed_at_start(out: Path, seeds: list[int]) -> list[str]:
    """The stages a run can resume from a saved point (`*.resume.pt` beside a checkpoint, left by a stopped
    run and removed when the stage ends): called before training, so that the record says which stages this
    invocation did not train from their first step, which `trained_before` (finished checkpoints) cannot see."""
    return [str(f.relative_to(out)) for seed in seeds for f in sorted((out / f"seed{seed}").glob("**/*.resume.pt"))]


def wall_line(result: dict[str, Any]) -> str:
    """The table's wall time, saying when this invocation did not train every stage from its first step."""
    if result.get("wall_s") is None:  # --report-only keeps an earlier run's times; with none on record it says so
        return "not timed (tables rewritten by --report-only, no timed run on record)"
    reused = result.get("trained_before") or []
    resumed = result.get("resumed") or []
    found = [
        f"{len(reused)} checkpoint(s) already trained (benchmark.json's `trained_before`)" if reused else "",
        f"{len(resumed)} stage(s) stopped part-way and resumed (`resumed`)" if resumed else "",
    ]
    line = f"{result['wall_s'] / 60:.1f} min on {result['machine']}"
    if result.get("wall_from_budget_start_s") is not None:
        line += f" ({result['wall_from_budget_start_s'] / 60:.1f} min from the budget's start: setup included)"
    return line + (f" (this invocation's: it found {' and '.join(f for f in found if f)})" if reused or resumed else "")


def write_outputs(out: Path, result: dict[str, Any]) -> str:
    agg = result["aggregate"]
    rows = []
    for r in agg["table"]:
        rows.append(
            {
                "schedule": r["schedule"],
                "system": r["system"],
                "accuracy_%": fmt(r["accuracy"]),
                "offload_%": fmt(r["offload_rate"]) if "offload_rate" in r else "",
                "routing_hit_%": fmt(r["routing_hit_rate"]) if "routing_hit_rate" in r else "",
                "abstain_%": fmt(r["abstain_rate"]) if "abstain_rate" in r else "",
            }
        )
    vs_rows = [
        {"schedule": k, **{f"{m}_points": fmt(v) for m, v in d.items()}} for k, d in agg["versus_static"].items()
    ]
    sub_rows = [{"model": r["model"], "kind": r["kind"], "subset_accuracy_%": fmt(r)} for r in agg["subset_accuracy"]]
    collab_rows = [
        {"schedule": r["schedule"], "split": r["split"], **{m: fmt(v) for m, v in r.items() if isinstance(v, dict)}}
        for r in agg.get("collaboration", [])
    ]
    gate_rows = [
        {"schedule": r["schedule"], "gate": r["gate"], **{m: fmt(v) for m, v in r.items() if isinstance(v, dict)}}
        for r in agg.get("gates", [])
    ]
    rule_rows = [
        {"schedule": r["schedule"], "rule": r["rule"], **{m: fmt(v) for m, v in r.items() if isinstance(v, dict)}}
        for r in agg.get("rules", [])
    ]
    val = agg.get("model_validation") or {}
    val_line = (
        f"Validation accuracy of the all-class models: generalist {val['generalist'] * 100:.2f} %, "
        f"stage 1 (the expert preset) {val['stage1'] * 100:.2f} % "
        f"(stage 1 − generalist: {(val['stage1'] - val['generalist']) * 100:+.2f} points).\n"
        if val.get("generalist") is not None and val.get("stage1") is not None
        else ""
    )
    seeds = result["seeds"]
    wall = wall_line(result)
    title, test_split = data_names(result)
    md = [
        f"# askexpert on {title} (CPU scale)\n",
        f"Seeds of the expert stage: {seeds} (mean ± sample std over seeds). Wall time: "
        f"{wall}.{fit_line(result)} Test split: {test_split}. "
        "Every operating point was chosen on the validation split (the config's `val_fraction` of train, per "
        "class, held out).\n",
        "## The paper's table (test split, accuracy in %)\n",
        markdown_table(rows),
        "\n## What collaboration lives on (every sample offloaded at the chosen point's k and rule)\n",
        "Fixes: the generalist was wrong and the routed expert's answer is right; breaks: the reverse (% of "
        "all samples). The oracle gate offloads exactly the fixes: the most any gate can add with these models.\n",
        markdown_table(collab_rows) if collab_rows else "(not reported)\n",
        "\n## Gates compared (τ set on validation; test figures in %)\n",
        "Parity: the validation-chosen τ that first reaches edge execution's accuracy on validation, on test. "
        "At 10/20/30: the τ offloading that share of validation. Oracle share: the part of the oracle gate's "
        "gain captured at 30 % (× 100). The last row per schedule: the learned gate minus the best confidence "
        "gate at each offload (points).\n",
        markdown_table(gate_rows) if gate_rows else "(not reported)\n",
        "\n## Combination rules, each at its best point on validation (%)\n",
        "`+ 2nd expert`: a sample also asks the runner-up expert when its routing score is close "
        "(`routing.second_within`); offload counts requests, so such a sample counts twice.\n",
        markdown_table(rule_rows) if rule_rows else "(not reported)\n",
        "\n## Models on validation\n",
        val_line,
        "\n## Against static experts (percentage points)\n",
        markdown_table(vs_rows) if vs_rows else "(no static experts)\n",
        "\n## Mean accuracy on the experts' own subsets (%)\n",
        markdown_table(sub_rows),
        "\n## Training budget per expert (images)\n",
        markdown_table(agg["budgets"]) if agg["budgets"] else "",
        "\n## Points chosen on validation, per seed\n",
        "```\n" + json.dumps(agg["chosen_points"], indent=1) + "\n```\n",
        "\n## Stage times (s)\n",
        markdown_table([{"seed": s, **{k: round(v, 1) for k, v in t.items()}} for s, t in result["timings"].items()]),
    ]
    text = "\n".join(md)
    (out / "benchmark.md").write_text(text)
    (out / "benchmark.json").write_text(json.dumps(result, indent=1, default=str))
    write_csv(out / "benchmark.csv", rows)
    plot(out / "benchmark.png", agg, title)
    return text


def plot(path: Path, agg: dict[str, Any], title: str) -> None:
    rows = [r for r in agg["table"] if "accuracy" in r]
    labels = [f"{r['schedule']}\n{r['system']}" for r in rows]
    means = [r["accuracy"]["mean"] * 100 for r in rows]
    errs = [r["accuracy"]["std"] * 100 for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(rows)), 4.6))
    ax.bar(
        range(len(rows)),
        means,
        yerr=errs,
        capsize=3,
        color=["tab:blue" if "static" == r["schedule"] else "tab:orange" for r in rows],
    )
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(f"{title[0].upper()}{title[1:]}, CPU scale: static (blue) vs progressive (orange) experts")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_only(out: Path, seeds: list[int]) -> None:
    """Rewrite the tables from the trained seed directories (the caches make this take seconds)."""
    from askexpert.evaluate.run import evaluate_system

    previous = json.loads((out / "benchmark.json").read_text()) if (out / "benchmark.json").is_file() else {}
    summaries = [evaluate_system(SystemDir.open(out / f"seed{seed}")) for seed in seeds]
    result = {
        **{k: previous.get(k) for k in RUN_RECORD},
        "seeds": seeds,
        "aggregate": aggregate(summaries),
        "summaries": summaries,
    }
    result["timings"] = result["timings"] or {}
    if not (isinstance(result["wall_s"], (int, float)) and math.isfinite(result["wall_s"])):
        result["wall_s"] = None  # an earlier --report-only's NaN: null in valid JSON, "not timed" in the table
    print(write_outputs(out, result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="CIFAR-100 image-folder tree or its .tar.gz")
    ap.add_argument(
        "--pretrain-data", type=Path, default=None, help="pretraining tree or .tar.gz (none: no pretraining)"
    )
    ap.add_argument("--out", type=Path, default=Path("runs/cifar100-cpu"))
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--seeds", default="0,1", help="seeds of the expert stage (stage 1 and experts)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every epoch count (e.g. 0.02 for a smoke run)")
    ap.add_argument(
        "--fit-minutes",
        type=float,
        default=None,
        help="time the work here first and scale every epoch count down so that the run fits this many minutes "
        "from its start (kept in OUT/fit.json, so a resumed run trains the same epochs)",
    )
    ap.add_argument(
        "--budget-start",
        type=float,
        default=None,
        help="Unix time the budget and the wall time count from (default: this script's start); the shell script "
        "passes its own, so that its setup counts",
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="re-evaluate the trained seed directories under OUT (no training) and rewrite the tables",
    )
    args = ap.parse_args()
    if args.fit_minutes is not None and (args.scale != 1.0 or not args.fit_minutes > 0):
        ap.error("--fit-minutes takes a positive number of minutes and replaces --scale")
    if args.report_only:
        report_only(args.out.resolve(), [int(s) for s in args.seeds.split(",") if s.strip()])
        return

    start, started_at = time.perf_counter(), time.time()
    out = args.out.resolve()
    cfg = SystemConfig.from_yaml(args.config)
    data_root = image_tree(args.data, out / "data", "classes.json")
    raw = cfg.model_dump(mode="json")
    raw["data"]["root"] = str(data_root)
    if args.pretrain_data is not None:
        raw["backbone"]["data"]["root"] = str(image_tree(args.pretrain_data, out / "data", "classes.tsv"))
    else:
        raw["backbone"]["data"] = None
    cfg = SystemConfig.from_dict(raw, origin=str(args.config))
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    # the budget's start, once for the fit and the wall time (a start after this process's own is not believed)
    budget_start = None if args.budget_start is None else min(args.budget_start, started_at)
    clock = started_at if budget_start is None else budget_start
    fit = None
    if args.fit_minutes is not None:
        try:
            fit = fit_to_budget(cfg, out, len(seeds), args.fit_minutes, time.time() - clock)
        except ConfigError as exc:  # a budget too small for this machine's inference alone
            raise SystemExit(f"--fit-minutes {args.fit_minutes:g}: {exc}") from None
        cfg = cfg.with_epochs_scaled(fit["factor"]) if fit["factor"] < 1 else cfg
    elif args.scale != 1.0:
        cfg = cfg.with_epochs_scaled(args.scale)
    resumed = resumed_at_start(out, seeds)
    first_timings: dict[str, float] = {}
    if fit is not None:
        print(f"== seed {seeds[0]}, the stages before the generalist: {out / f'seed{seeds[0]}'}", flush=True)
        cfg, first_timings = refit_to_pace(cfg, out, seeds[0], fit, lambda: time.time() - clock)
    summaries, timings = [], {}
    first: SystemDir | None = None
    for seed in seeds:
        system = seed_system(out, cfg, seed, first)
        print(f"== seed {seed}: {system.root}", flush=True)
        summary = run_pipeline(system, log=lambda m: print(m, flush=True))
        if first is None:  # the first stages ran before, timed for the fit's correction: their time is theirs
            for name, seconds in first_timings.items():
                summary["timings_s"][name] = seconds + summary["timings_s"].get(name, 0.0)
        summaries.append(summary)
        timings[seed] = summary["timings_s"]
        first = first or system
    import platform

    import torch

    from askexpert.models.predict import cpu_description

    machine = f"{platform.machine()}, {cpu_description()}, {torch.get_num_threads()} torch threads" + (
        f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", CPU only"
    )
    result = {
        "data": data_record(data_root),
        "seeds": seeds,
        "wall_s": time.perf_counter() - start,
        "wall_from_budget_start_s": None if budget_start is None else time.time() - budget_start,
        "machine": machine,
        "scale": fit["factor"] if fit is not None else args.scale,
        "fit": fit,
        "timings": timings,
        "trained_before": trained_before(out, seeds, started_at),
        "resumed": resumed,
        "aggregate": aggregate(summaries),
        "summaries": summaries,
    }
    print(write_outputs(out, result))
    print(f"written to {out}/benchmark.{{md,json,csv,png}}", file=sys.stderr)


if __name__ == "__main__":
    main()
