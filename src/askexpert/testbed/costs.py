"""The testbed's cost model: every strategy's latency and energy from the measured pieces.

* edge compute: measured on this machine × the edge profile's `slowdown`, or the
  profile's own measured times where it has them for these presets;
* network: the measured round trip minus the server's own time (emulated link), or
  plus the analytic link model's time (loopback);
* near-edge compute: the server's measured compute × the near-edge profile's
  slowdown, or the profile's measured times (and metered joules) per batch size;
  where the profile is this very machine (`host`), the server's own metered joules;
* a failed offload costs the time it took, spent waiting at the edge's idle power;
* energy: the profiles' watts × those times and the radio model (Huang et al. 2012).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from askexpert.errors import ConfigError
from askexpert.evaluate.metrics import offload_masks
from askexpert.measure.energy import PowerModel, account
from askexpert.measure.link import LinkModel
from askexpert.measure.profiles import DeviceProfile
from askexpert.protocol import final_labels
from askexpert.testbed.measurement import Measurement
from askexpert.testbed.spec import SampleMeasurement, TestbedSpec

TABLE_COLUMNS = [
    "strategy",
    "tau",
    "accuracy",
    "offload_rate",
    "latency_mean_ms",
    "latency_p50_ms",
    "latency_p99_ms",
    "energy_edge_mj",
    "energy_radio_mj",
    "energy_near_edge_mj",
    "energy_total_mj",
    "bytes_sent_per_sample",
]


def _network_s(row: SampleMeasurement, spec: TestbedSpec, emulated: bool) -> float:
    """Time on the wire and in the HTTP stacks: measured round trip minus the server's own time."""
    server_s = (row.queue_ms + row.compute_ms) / 1e3
    measured = max(0.0, row.rtt_ms / 1e3 - server_s)
    if emulated:
        return measured
    model = LinkModel(spec.link)
    per_request = model.round_trip_s(row.bytes_sent / row.requests, row.bytes_received / row.requests)
    return measured + row.requests * per_request


def compute_sources(spec: TestbedSpec, presets: dict[str, str]) -> dict[str, Any]:
    """Which compute times come from a profile's measurements (for these presets) rather than × slowdown."""
    edge = spec.edge.measured
    near = spec.near_edge.measured
    return {
        "edge_generalist_ms": edge.per_image_ms("generalist", presets.get("generalist", ""), 1) if edge else None,
        "edge_expert_ms": edge.per_image_ms("expert", presets.get("expert", ""), 1) if edge else None,
        "near_expert_measured": bool(near and near.per_image_ms("expert", presets.get("expert", ""), 1) is not None),
    }


def measured_on(profile: DeviceProfile) -> str:
    m = profile.measured
    return f"{m.device}, {m.date}" if m else "not measured"


def strategies(
    run: Measurement, spec: TestbedSpec, taus: list[float]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-strategy table and per-sample records, computed from the measured pieces."""
    rows, labels, emulated = run.rows, np.asarray(run.labels), run.emulated
    edge, near = PowerModel(spec.edge), PowerModel(spec.near_edge)
    model = LinkModel(spec.link)
    n = len(rows)
    presets = run.presets
    gen_s = np.array([r.gen_s for r in rows]) * spec.edge.slowdown
    local_s = np.array([r.local_expert_s for r in rows]) * spec.edge.slowdown
    timed = compute_sources(spec, presets)
    if timed["edge_generalist_ms"] is not None:  # measured on the device: replaces this machine × slowdown
        gen_s = np.full(n, timed["edge_generalist_ms"] / 1e3)
    requests = np.array([r.requests for r in rows])  # experts asked per sample (a second one counts)
    passes = requests * run.expert_views  # a profile's measured expert times and joules are per forward pass
    if timed["edge_expert_ms"] is not None:
        local_s = passes * timed["edge_expert_ms"] / 1e3
    ok = np.array([r.ok for r in rows])  # the server answered (an abstention counts as an answer)
    net_s = np.array([_network_s(r, spec, emulated) for r in rows])
    encode_s = np.array([r.encode_ms / 1e3 for r in rows])
    near_s = np.array([r.compute_ms / 1e3 / max(1.0, r.batch_size) for r in rows])
    near_s_scaled = near_s * spec.near_edge.slowdown
    near_j: list[float | None] = [None] * n  # metered near-edge joules per sample, where a meter saw them
    measured = spec.near_edge.measured
    for i, r in enumerate(rows):
        if not r.ok:
            continue
        if measured is not None and presets.get("expert"):  # the device's own figures replace × slowdown
            per_image = measured.per_image_ms("expert", presets["expert"], int(r.batch_size))
            if per_image is not None:
                near_s_scaled[i] = passes[i] * per_image / 1e3
            joules = measured.per_image_j("expert", presets["expert"], int(r.batch_size))
            near_j[i] = None if joules is None else passes[i] * joules
        if near_j[i] is None and spec.near_edge.host:  # the server ran on the profiled machine and metered it
            near_j[i] = r.extra.get("server_energy_j")
    queue_s = np.array([r.queue_ms / 1e3 for r in rows])
    up = np.array([r.bytes_sent for r in rows])
    down = np.array([r.bytes_received for r in rows])
    stat = np.array([r.stat for r in rows])
    gen_label = np.array([r.gen_label for r in rows])
    local_label = np.array([r.local_label for r in rows])
    remote_label = np.array([r.remote_label for r in rows])
    offload_s = np.array([r.offload_s for r in rows])
    # A failed offload costs the time it really took (a timeout in full), spent waiting on the edge.
    offload_extra = np.where(ok, encode_s + net_s + queue_s + near_s_scaled, offload_s)

    def summarise(
        name: str, tau: float | None, offload: np.ndarray, label: np.ndarray, latency: np.ndarray, compute: np.ndarray
    ) -> dict[str, Any]:
        parts = [
            account(
                edge,
                near,
                spec.radio,
                model,
                float(compute[i]),
                float(latency[i] - compute[i]),
                float(up[i]) if offload[i] else 0.0,
                float(down[i]) if offload[i] else 0.0,
                float(near_s_scaled[i]) if offload[i] else 0.0,
                near_j[i] if offload[i] else None,
            )
            for i in range(n)
        ]
        e = {k: np.array([getattr(p, k) for p in parts]) for k in ("edge_j", "radio_j", "near_edge_j", "total_j")}
        return {
            "strategy": name,
            "tau": tau,
            "accuracy": float((label == labels).mean()),
            "offload_rate": float((offload * requests).mean()),  # requests: a sample asking two counts twice
            "latency_mean_ms": float(latency.mean() * 1e3),
            "latency_p50_ms": float(np.percentile(latency, 50) * 1e3),
            "latency_p99_ms": float(np.percentile(latency, 99) * 1e3),
            "energy_edge_mj": float(e["edge_j"].mean() * 1e3),
            "energy_radio_mj": float(e["radio_j"].mean() * 1e3),
            "energy_near_edge_mj": float(e["near_edge_j"].mean() * 1e3),
            "energy_total_mj": float(e["total_j"].mean() * 1e3),
            "bytes_sent_per_sample": float((up * offload).mean()),
            "failed_offloads": int((offload & ~ok).sum()),
        }

    nothing = np.zeros(n, dtype=bool)
    everything = np.ones(n, dtype=bool)
    asked = np.ones(n, dtype=bool)
    remote_or_gen = final_labels(gen_label, remote_label, asked)[0]  # abstain → fallback, the shared rule
    local_or_gen = final_labels(gen_label, local_label, asked)[0]
    table = [
        summarise("edge-only", None, nothing, gen_label, gen_s, gen_s),
        summarise(
            "edge-execution",
            None,
            nothing,
            local_or_gen,
            gen_s + local_s,
            gen_s + local_s,
        ),
        summarise(
            "near-edge-only",
            None,
            everything,
            np.where(everything & ok, remote_or_gen, gen_label),
            gen_s + offload_extra * everything,
            gen_s,
        ),
    ]
    for tau in taus:
        off = offload_masks(stat, run.gate, np.asarray([tau]))[0]  # attempted, answered or not
        label = np.where(off & ok, remote_or_gen, gen_label)
        table.append(summarise("collaborative", tau, off, label, gen_s + offload_extra * off, gen_s))
    records = [
        {
            **rows[i].as_dict(),
            "truth": int(labels[i]),
            "edge_compute_ms_modelled": float(gen_s[i] * 1e3),
            "network_ms": float(net_s[i] * 1e3),
            "network_measured": bool(emulated),
            "near_edge_compute_ms_modelled": float(near_s_scaled[i] * 1e3),
        }
        for i in range(n)
    ]
    return table, records


# Liu & Fahmy, "Ask the Expert" (arXiv 2602.13334): latency −45 % against edge execution,
# energy −46 % against near-edge-only offload.
PAPER_LATENCY_RATIO = 0.55
PAPER_ENERGY_RATIO = 0.54


def offload_costs(table: list[dict[str, Any]]) -> dict[str, float]:
    """The linear cost model: a sample answered on the edge costs edge-only's figures, an offload adds the rest.

    latency(offload rate r) ≈ edge_latency_ms + r · offload_latency_ms, and likewise for energy.
    """
    rows = {r["strategy"]: r for r in table}
    try:
        edge, near = rows["edge-only"], rows["near-edge-only"]
    except KeyError:
        raise ConfigError(
            "testbed table lacks the edge-only / near-edge-only rows; rerun `askexpert testbed`"
        ) from None
    return {
        "edge_latency_ms": edge["latency_mean_ms"],
        "offload_latency_ms": near["latency_mean_ms"] - edge["latency_mean_ms"],
        "edge_energy_mj": edge["energy_total_mj"],
        "offload_energy_mj": near["energy_total_mj"] - edge["energy_total_mj"],
    }


def _offload_terms(table: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """What one offload adds, term by term (means over the answered offloads), to see which dominates."""
    rows = {r["strategy"]: r for r in table}
    edge, near = rows["edge-only"], rows["near-edge-only"]
    ok = [r for r in records if r.get("error") is None] or records

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in ok])) if ok else float("nan")

    return {
        "latency_ms": {
            "encode": mean("encode_ms"),
            "network": mean("network_ms"),
            "queue": mean("queue_ms"),
            "near_edge_compute": mean("near_edge_compute_ms_modelled"),
        },
        "energy_mj": {
            "edge_waiting": near["energy_edge_mj"] - edge["energy_edge_mj"],
            "radio": near["energy_radio_mj"] - edge["energy_radio_mj"],
            "near_edge_compute": near["energy_near_edge_mj"] - edge["energy_near_edge_mj"],
        },
        "edge_ms": {
            "generalist": edge["latency_mean_ms"],
            "expert_on_edge": rows["edge-execution"]["latency_mean_ms"] - edge["latency_mean_ms"],
        },
    }


def headline_ratios(
    table: list[dict[str, Any]], records: list[dict[str, Any]], choice: dict[str, Any]
) -> dict[str, Any]:
    """The paper's two comparisons at the τ chosen on validation (`testbed.choice.parity_tau`).

    Also the largest offload rate at which each target would hold with the measured cost of an
    offload (the linear model of `offload_costs`), beside the rate the chosen τ needed.
    """
    exec_row = next(r for r in table if r["strategy"] == "edge-execution")
    near_row = next(r for r in table if r["strategy"] == "near-edge-only")
    row = next(r for r in table if r["strategy"] == "collaborative" and np.isclose(r["tau"], choice["tau"]))
    cost = offload_costs(table)
    return {
        **choice,
        "accuracy": row["accuracy"],
        "offload_rate": row["offload_rate"],
        "edge_execution_accuracy": exec_row["accuracy"],
        "reaches_edge_execution_on_test": row["accuracy"] >= exec_row["accuracy"],
        "latency_ratio_vs_edge_execution": row["latency_mean_ms"] / exec_row["latency_mean_ms"],
        "energy_ratio_vs_near_edge_only": row["energy_total_mj"] / near_row["energy_total_mj"],
        "targets": {"latency": PAPER_LATENCY_RATIO, "energy": PAPER_ENERGY_RATIO},
        "max_offload_rate_for_target": {
            "latency": (PAPER_LATENCY_RATIO * exec_row["latency_mean_ms"] - cost["edge_latency_ms"])
            / cost["offload_latency_ms"],
            "energy": (PAPER_ENERGY_RATIO * near_row["energy_total_mj"] - cost["edge_energy_mj"])
            / cost["offload_energy_mj"],
        },
        "offload_terms": _offload_terms(table, records),
    }
