"""The report folder: `report.md`, CSV and JSON of every number, PNG plots.

Plots use matplotlib's non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from askexpert.evaluate.metrics import GATE_METRICS  # noqa: E402


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def finish_plot(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """Labels, grid, legend, and the PNG: the same finish for every plot askexpert writes."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _select(rows: Sequence[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def plot_pareto(
    path: Path, sweep: Sequence[dict[str, Any]], point: dict[str, Any], headline: Sequence[dict[str, Any]]
) -> None:
    """Accuracy against offload rate along the τ sweep, per schedule, operating point marked."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for schedule in sorted({r["schedule"] for r in sweep}):
        rows = sorted(
            _select(sweep, schedule=schedule, gate=point["gate"], k=point["top_k"], scoring=point["scoring"]),
            key=lambda r: r["offload_rate"],
        )
        line = ax.plot(
            [r["offload_rate"] * 100 for r in rows],
            [r["accuracy"] * 100 for r in rows],
            marker=".",
            label=f"{schedule} experts",
        )[0]
        op = [r for r in headline if r["schedule"] == schedule and r["system"].startswith("collaborative")]
        if op:
            ax.scatter(
                [op[0]["offload_rate"] * 100],
                [op[0]["accuracy"] * 100],
                s=120,
                marker="*",
                color=line.get_color(),
                edgecolor="black",
                zorder=5,
                label=f"{schedule}: operating point τ={point['tau']:g}",
            )
    finish_plot(
        fig,
        ax,
        path,
        "offload rate (% of samples sent to an expert)",
        "top-1 accuracy (%)",
        f"Accuracy vs offload ({point['gate']} gate, k={point['top_k']})",
    )


def plot_gates(path: Path, sweep: Sequence[dict[str, Any]], gates: Sequence[dict[str, Any]], scoring: str) -> None:
    """Accuracy against offload rate for every gate, per schedule at its compared k (solid: learned)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for g in gates:
        rows = sorted(
            _select(sweep, schedule=g["schedule"], gate=g["gate"], k=g["k"], scoring=scoring),
            key=lambda r: r["offload_rate"],
        )
        ax.plot(
            [r["offload_rate"] * 100 for r in rows],
            [r["accuracy"] * 100 for r in rows],
            linestyle="-" if g["gate"] == "learned" else "--",
            label=f"{g['schedule']}: {g['gate']} (k={g['k']})",
        )
    finish_plot(
        fig, ax, path, "offload rate (% of samples sent to an expert)", "top-1 accuracy (%)", "Gates compared (test)"
    )


def plot_accuracy_vs_k(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for schedule in sorted({r["schedule"] for r in rows}):
        sel = sorted(_select(rows, schedule=schedule), key=lambda r: r["k"])
        ax.plot([r["k"] for r in sel], [r["accuracy"] * 100 for r in sel], marker="o", label=f"{schedule}: accuracy")
        ax.plot(
            [r["k"] for r in sel],
            [r["routing_hit_rate"] * 100 for r in sel],
            marker="x",
            linestyle="--",
            label=f"{schedule}: routing hit rate",
        )
    finish_plot(
        fig,
        ax,
        path,
        "k (generalist Top-k classes used for routing)",
        "percent (%)",
        "Collaborative accuracy and routing hit rate vs k (at the operating τ)",
    )


def plot_expert_load(path: Path, row: dict[str, Any], expert_ids: Sequence[str]) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.bar(list(expert_ids), [row[f"load_{e}"] * 100 for e in expert_ids], color="tab:orange")
    ax.set_xlabel("expert")
    ax.set_ylabel("share of all samples sent to it (%)")
    ax.set_title(f"Per-expert load at the operating point ({row['schedule']} experts)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_expert_accuracy(path: Path, rows: Sequence[dict[str, Any]], schedules: Sequence[str]) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    names = [r["expert"] for r in rows]
    columns = [
        "generalist closed-set",
        *(["stage 1 closed-set"] if rows and "stage 1 closed-set" in rows[0] else []),
        *schedules,
    ]
    width = 0.8 / len(columns)
    for i, column in enumerate(columns):
        ax.bar([j + i * width for j in range(len(rows))], [r[column] * 100 for r in rows], width, label=column)
    ax.set_xticks([j + width * (len(columns) - 1) / 2 for j in range(len(rows))], names)
    ax.set_xlabel("expert (its class subset)")
    ax.set_ylabel("accuracy on the subset's test samples (%)")
    ax.set_title("Accuracy on each expert's subset")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, summary: dict[str, Any], sweep: Sequence[dict[str, Any]]) -> Path:
    """Write every table and plot of `summary` (see `evaluate.run.evaluate_system`) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    point = summary["operating_point"]
    schedules = summary["schedules"]
    expert_ids = summary["expert_ids"]
    (out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=True))
    write_csv(out / "sweep.csv", sweep)
    write_csv(out / "headline.csv", summary["headline"])
    write_csv(out / "experts.csv", summary["experts"])
    write_csv(out / "accuracy_vs_k.csv", summary["accuracy_vs_k"])
    for name in ("combination_rules", "versus_static", "budgets", "collaboration", "gates"):
        if summary.get(name):
            write_csv(out / f"{name}.csv", summary[name])
    plot_pareto(out / "pareto.png", sweep, point, summary["headline"])
    plot_accuracy_vs_k(out / "accuracy_vs_k.png", summary["accuracy_vs_k"])
    load_row = summary["operating_rows"][-1]
    plot_expert_load(out / "expert_load.png", load_row, expert_ids)
    plot_expert_accuracy(out / "expert_accuracy.png", summary["experts"], schedules)
    if summary.get("gates"):
        plot_gates(out / "gates.png", sweep, summary["gates"], point["scoring"])
    diff = summary.get("progressive_minus_static")
    md = [
        f"# askexpert evaluation: {summary['system']}\n",
        f"Test split: {summary['test_samples']} samples, {summary['num_classes']} classes, "
        f"{len(expert_ids)} experts (partition `{summary['partition_strategy']}`). "
        f"Cache key `{summary['cache_key']}`. Config operating point: gate `{point['gate']}`, τ={point['tau']:g}, "
        f"k={point['top_k']}, scoring `{point['scoring']}`. Points marked *chosen on validation* were picked on the "
        f"{summary.get('val_samples', 0)} validation samples; the test split only reports them.\n",
        "## Headline\n",
        markdown_table(
            summary["headline"], ["schedule", "system", "accuracy", "offload_rate", "routing_hit_rate", "abstain_rate"]
        ),
    ]
    if summary.get("combination_rules"):
        md += [
            "\n## Combination rules (best point of each, chosen on validation)\n",
            "`+ 2nd expert`: an offloaded sample also asks the runner-up expert when its routing score is close "
            "(`routing.second_within`); offload rates count requests, so such a sample counts twice.\n\n",
            markdown_table(summary["combination_rules"]),
        ]
    md += [
        "\n## Experts on their own subsets (test split)\n",
        "Generalist: its plain accuracy on the subset's samples; generalist closed-set: its argmax over the "
        "subset's classes only (the fair yardstick for an expert's closed-set accuracy); stage 1 closed-set: "
        "the same for stage 1, where the experts of an `init: shared` schedule start (what their own stages "
        "added is the difference). "
        'Closed-set: argmax over the subset\'s classes. Open-set: "other" competes and counts as wrong. '
        'Other-outside: share of out-of-subset samples answered "other".\n\n',
        markdown_table(summary["experts"]),
    ]
    if summary.get("collaboration"):
        md += [
            "\n## What collaboration lives on: fixes and breaks (every sample offloaded at the point's k and rule)\n",
            "Fixes: the generalist was wrong and the routed expert's answer is right; breaks: the reverse. "
            "The oracle gate offloads exactly the fixes. Validation and test.\n\n",
            markdown_table(
                summary["collaboration"],
                [
                    "schedule",
                    "split",
                    "expert",
                    "routed",
                    "generalist_wrong",
                    "fixes",
                    "breaks",
                    "routing_hit_rate",
                    "oracle_gate_gain",
                    "oracle_gate_accuracy",
                ],
            ),
        ]
    if summary.get("gates"):
        md += [
            "\n## Gates compared (what decides the costs; τ set on validation, `replace` rule)\n",
            "Parity: the lowest validation offload rate whose validation accuracy reaches edge execution's "
            "(every sample answered by its routed expert), and what that τ gives on test. Then test accuracy and "
            "routing hit rate at the τ that offloads 10/20/30 % of validation, and the share of the oracle "
            "gate's gain captured at 30 %. The learned gate's validation scores are out-of-fold.\n\n",
            markdown_table(
                summary["gates"],
                ["schedule", "gate", "k", "test_generalist", "test_edge_execution", *GATE_METRICS],
            ),
            "\n![gates](gates.png)\n",
        ]
    if summary.get("versus_static"):
        md += ["\n## Against static experts (points of accuracy × 100 = percentage points)\n"]
        md.append(markdown_table(summary["versus_static"]))
    if diff is not None:
        md.append(f"\nMean progressive − static on the subsets (closed-set): **{diff * 100:+.2f} points**.\n")
    if summary.get("budgets"):
        md += ["\n## Training budget (images seen per expert)\n", markdown_table(summary["budgets"])]
    md += [
        "\n## Accuracy vs k at the operating τ\n",
        markdown_table(summary["accuracy_vs_k"], ["schedule", "k", "accuracy", "offload_rate", "routing_hit_rate"]),
        "\n## Plots\n",
        "![pareto](pareto.png)\n\n![accuracy vs k](accuracy_vs_k.png)\n\n"
        "![expert load](expert_load.png)\n\n![expert accuracy](expert_accuracy.png)\n",
        "\nEvery sweep row (schedule × k × gate × τ) is in `sweep.csv`; all numbers above are in `summary.json`.\n",
    ]
    (out / "report.md").write_text("\n".join(md))
    return out / "report.md"
