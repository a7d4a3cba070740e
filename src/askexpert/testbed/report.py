"""The testbed's report: table (MD/CSV/JSON), per-sample records, plots, and what was measured or modelled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from askexpert.evaluate.report import markdown_table, write_csv
from askexpert.measure.energy import available_meters
from askexpert.testbed.costs import TABLE_COLUMNS, compute_sources, measured_on
from askexpert.testbed.measurement import Measurement
from askexpert.testbed.spec import EDGE_REPEATS, TestbedSpec


def _plots(out: Path, table: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, label, name in (
        ("latency_mean_ms", "mean latency per sample (ms)", "latency_vs_accuracy.png"),
        ("energy_total_mj", "energy per sample (mJ)", "energy_vs_accuracy.png"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        collab = [r for r in table if r["strategy"] == "collaborative"]
        ax.plot(
            [r[key] for r in collab], [r["accuracy"] * 100 for r in collab], marker="o", label="collaborative (τ sweep)"
        )
        for r in collab:
            ax.annotate(
                f"τ={r['tau']:g}", (r[key], r["accuracy"] * 100), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        for r, marker in zip([r for r in table if r["strategy"] != "collaborative"], ("s", "^", "D"), strict=False):
            ax.scatter([r[key]], [r["accuracy"] * 100], marker=marker, s=70, label=r["strategy"], zorder=5)
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"Accuracy vs {label.split(' per')[0]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)


def provenance(run: Measurement, spec: TestbedSpec) -> dict[str, str]:
    """Column by column: what was measured (and where) and what was modelled."""
    timed = compute_sources(spec, run.presets)
    meters = sorted(available_meters())
    return {
        "link": run.link_mode,
        "edge_compute": (
            f"measured on the device ({spec.edge.name} profile, {measured_on(spec.edge)}), "
            f"generalist {timed['edge_generalist_ms']:.3g} ms, expert {timed['edge_expert_ms']} ms per image"
            if timed["edge_generalist_ms"] is not None
            else f"measured on this machine (best of {EDGE_REPEATS} runs per sample) with "
            f"{run.edge_threads} thread(s) × slowdown "
            f"{spec.edge.slowdown:g} of profile {spec.edge.name} (modelled scaling)"
        ),
        "near_edge_compute": (
            f"measured on the device ({spec.near_edge.name} profile, {measured_on(spec.near_edge)}), per batch size"
            if timed["near_expert_measured"]
            else f"measured by the server × slowdown {spec.near_edge.slowdown:g} of profile "
            f"{spec.near_edge.name} (modelled scaling)"
        ),
        "energy_edge_mj": f"modelled: profile {spec.edge.name}'s active {spec.edge.active_w:g} W × edge compute "
        f"+ idle {spec.edge.idle_w:g} W × waiting (no meter on the edge device here)",
        "energy_radio_mj": f"modelled: radio model {spec.link.radio} (Huang et al. 2012) × the transfer time "
        "of the measured request and reply bytes",
        "energy_near_edge_mj": _near_edge_energy_source(run, spec),
        "meters_readable_here": ", ".join(meters) or "none",
    }


def _near_edge_energy_source(run: Measurement, spec: TestbedSpec) -> str:
    """Metered on the device (its profile), metered by the testbed's own server (host profile), or modelled."""
    near = spec.near_edge
    metered = [r.extra["server_energy_j"] for r in run.rows if r.ok and "server_energy_j" in r.extra]
    server = (
        f"the testbed's server metered {1e3 * sum(metered) / len(metered):.3g} mJ per sample on this machine"
        if metered
        else "the testbed's server had no readable meter"
    )
    if near.measured is not None and near.measured.j:
        return f"metered on the device ({near.measured.meter}, profile {near.name}, {measured_on(near)})"
    if near.host and metered:
        return f"metered: {server} (profile {near.name} is this machine)"
    return (
        f"modelled: profile {near.name}'s active {near.active_w:g} W × near-edge compute time "
        f"({server}; used only when the near-edge profile is this machine)"
    )


def headline_lines(h: dict[str, Any]) -> list[str]:
    """The headline in words: the ratios at the τ chosen on validation, and what one offload costs, term by term."""
    how = (
        "the lowest validation offload rate whose accuracy reaches edge execution's"
        if h["eligible"]
        else "no τ reaches edge execution's validation accuracy; the most accurate τ"
    )
    need, terms = h["max_offload_rate_for_target"], h["offload_terms"]
    lines = [
        f"τ={h['tau']:g}, chosen on the validation split ({h['val_samples']} samples) as {how}: "
        f"validation accuracy {h['val_accuracy']:.4f} against {h['val_edge_execution_accuracy']:.4f}, "
        f"offload rate {h['val_offload_rate']:.3f}.\n",
        f"On the test samples: latency / edge execution = **{h['latency_ratio_vs_edge_execution']:.3f}** "
        f"(target ≤ {h['targets']['latency']}), energy / near-edge only = "
        f"**{h['energy_ratio_vs_near_edge_only']:.3f}** (target ≤ {h['targets']['energy']}); accuracy "
        f"{h['accuracy']:.4f} against edge execution's {h['edge_execution_accuracy']:.4f}, offload rate "
        f"{h['offload_rate']:.3f}.\n",
        f"With the measured cost of one offload, the latency target holds up to an offload rate of "
        f"{need['latency']:.3f} and the energy target up to {need['energy']:.3f}.\n",
        "\n| what one offload adds | " + " | ".join(terms["latency_ms"]) + " |",
        "|---|" + "---|" * len(terms["latency_ms"]),
        "| latency (ms) | " + " | ".join(f"{v:.3g}" for v in terms["latency_ms"].values()) + " |",
        "\n| what one offload adds | " + " | ".join(terms["energy_mj"]) + " |",
        "|---|" + "---|" * len(terms["energy_mj"]),
        "| energy (mJ) | " + " | ".join(f"{v:.3g}" for v in terms["energy_mj"].values()) + " |",
        f"\nOn the edge: generalist {terms['edge_ms']['generalist']:.3g} ms, the expert run there "
        f"{terms['edge_ms']['expert_on_edge']:.3g} ms more (edge execution).\n",
    ]
    return lines


def write_testbed_report(
    out: Path,
    name: str,
    routing: dict[str, Any],
    spec: TestbedSpec,
    run: Measurement,
    table: list[dict[str, Any]],
    records: list[dict[str, Any]],
    ratios: dict[str, Any],
) -> dict[str, Any]:
    """Write testbed.{md,csv,json}, records.jsonl and the plots into `out`; returns the summary."""
    where = provenance(run, spec)
    summary = {
        "system": name,
        "samples": len(records),
        "edge_profile": spec.edge.model_dump(),
        "near_edge_profile": spec.near_edge.model_dump(),
        "link": {"name": spec.link_name, **spec.link.model_dump()},
        "routing": routing,
        "provenance": where,
        "table": table,
        "headline": ratios,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "testbed.json").write_text(json.dumps(summary, indent=1))
    write_csv(out / "testbed.csv", table)
    with (out / "records.jsonl").open("w") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    _plots(out, table)
    cols = TABLE_COLUMNS
    md = [
        f"# askexpert testbed: {name}\n",
        f"{len(records)} test samples, one at a time. Edge `{spec.edge.name}`, near-edge `{spec.near_edge.name}`, "
        f"link `{spec.link_name}`. Every expert answer through the combination rule `{run.rule}`.\n",
        "## Results\n",
        markdown_table(table, cols),
        "\n## Headline\n",
    ]
    md += headline_lines(ratios)
    md += ["\n## What was measured and what was modelled\n"] + [f"* {k}: {v}\n" for k, v in where.items()]
    md.append("\n![latency](latency_vs_accuracy.png)\n\n![energy](energy_vs_accuracy.png)\n")
    (out / "testbed.md").write_text("\n".join(md))
    summary["out"] = str(out)
    return summary
