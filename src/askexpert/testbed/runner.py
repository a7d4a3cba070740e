"""`askexpert testbed`: edge-only, edge execution, near-edge only and collaborative, side by side.

One pass over the same samples, one image at a time (an edge camera's view): for
every sample the edge runs the generalist, routes, runs the routed expert *locally*
(edge execution) and also asks the real server over the link (offload). Every
strategy and every τ is then a per-sample choice among these measured pieces, so
all of them are compared on identical samples and identical network conditions.

What is measured and what is modelled (each record says so):
* edge compute: measured here with the edge profile's thread count, × the
  profile's `slowdown` (modelled scaling to the edge device);
* network: measured round trip over the emulated link (root: namespace + tbf +
  relay/netem), minus the server's own time; without emulation, the analytic
  link model's time plus the measured loopback overhead (modelled);
* near-edge compute: the server's measured compute × the near-edge profile's slowdown;
* energy: power model (profile watts × those times) and the radio model; a
  hardware meter (RAPL/NVML) is used only where it can be read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from askexpert.data import load_splits
from askexpert.evaluate.metrics import offload_masks
from askexpert.evaluate.report import markdown_table, write_csv
from askexpert.inference.backend import BackendError, LocalExpertBackend
from askexpert.inference.http_backend import HttpExpertBackend
from askexpert.measure.energy import PowerModel, account, available_meters
from askexpert.measure.link import LinkModel
from askexpert.measure.netem import PEER_IP, DelayRelay, LinkUnavailable, NamespaceLink, can_emulate
from askexpert.measure.profiles import DeviceProfile, LinkPreset, RadioModel, load_device, load_link
from askexpert.models import load_checkpoint, predict_logits
from askexpert.partition import Partition
from askexpert.protocol import OTHER, final_labels
from askexpert.routing import Router, uncertainty
from askexpert.serving.process import ServerProcess
from askexpert.system import SystemDir

T = TypeVar("T")

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


@dataclass(frozen=True)
class TestbedSpec:
    edge: DeviceProfile
    near_edge: DeviceProfile
    link_name: str
    link: LinkPreset
    radio: RadioModel


def spec_from_names(edge: str, near_edge: str, link: str) -> TestbedSpec:
    preset, radio = load_link(link)
    return TestbedSpec(load_device(edge), load_device(near_edge), link, preset, radio)


EDGE_REPEATS = 3  # edge compute is timed as the best of this many runs: a shared host's hiccups are not the device's


def _best_of(repeats: int, fn: Callable[..., T], *args: Any) -> tuple[float, T]:
    """(shortest wall time of `repeats` calls of fn(*args), the last call's result)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - start)
    return best, result


def _measure_samples(system: SystemDir, images: np.ndarray, url: str, threads: int) -> list[dict[str, Any]]:
    """Per sample: generalist, routing, local expert (edge execution), remote expert (offload)."""
    cfg = system.config()
    part = Partition.from_json(system.partition_path)
    rc = cfg.routing
    router = Router(part.membership(), rc.gate, rc.tau, rc.top_k, rc.scoring)
    generalist, _ = load_checkpoint(system.generalist_path)
    local = LocalExpertBackend.from_dir(system.root / "experts" / cfg.serving.schedule, part)
    remote = HttpExpertBackend(url, cfg.serving.model_copy(update={"retries": 0, "timeout_s": 30.0}))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows: list[dict[str, Any]] = []
    try:
        # Warm-up, untimed: first calls pay for lazy initialisation (kernels, allocator, connection),
        # which would otherwise inflate the first measured samples and make reruns disagree.
        for _ in range(3):
            predict_logits(generalist, images[:1])
            for eid in part.expert_ids:
                local.predict(eid, images[:1])
                remote.predict(eid, images[:1])
        for i in tqdm(range(len(images)), desc="testbed", unit="sample", leave=False):
            img = images[i : i + 1]
            gen_s, logits = _best_of(EDGE_REPEATS, predict_logits, generalist, img)
            probs = torch.from_numpy(logits).softmax(dim=1)
            route_s, decision = _best_of(EDGE_REPEATS, router, probs)
            gen_s += route_s
            eid = part.expert_ids[int(decision.expert[0])]
            local_s, local_reply = _best_of(EDGE_REPEATS, local.predict, eid, img)
            t0 = time.perf_counter()
            try:
                reply = remote.predict(eid, img)
                remote_label, info = int(reply.labels[0]), reply.info
            except BackendError as exc:
                remote_label, info = OTHER, {"error": str(exc)}  # type: ignore[dict-item]
            offload_s = time.perf_counter() - t0
            rows.append(
                {
                    "id": i,
                    "gen_label": int(probs.argmax()),
                    "stat": float(uncertainty(probs, rc.gate)[0]),
                    "expert": eid,
                    "local_label": int(local_reply.labels[0]),
                    "remote_label": remote_label,
                    "gen_s": gen_s,
                    "local_expert_s": local_s,
                    "offload_s": offload_s,
                    **{k: v for k, v in info.items()},
                }
            )
    finally:
        torch.set_num_threads(previous_threads)
        remote.close()
    return rows


def measure(system: SystemDir, spec: TestbedSpec, samples: int, emulate: str = "auto") -> dict[str, Any]:
    """Run the measurement pass; returns per-sample rows and how the link was made."""
    cfg = system.config()
    test = load_splits(cfg.data, system.root).test
    n = min(samples, len(test))
    images, labels = test.images[:n], test.labels[:n]
    threads = spec.edge.threads_here()
    reason = can_emulate()
    if emulate == "on" and reason:
        raise LinkUnavailable(f"--emulate on, but {reason}")
    use_ns = emulate != "off" and reason is None
    no_wait = ("--max-wait-ms", "0")  # one sample at a time: a batching wait would only add latency
    # The server shares this machine's cores with the edge measurement: OpenMP threads that
    # busy-wait after each request would steal them and inflate the edge's compute times.
    quiet = {"OMP_WAIT_POLICY": "PASSIVE"}
    if use_ns:
        with NamespaceLink(spec.link) as link:
            with ServerProcess(system.root, *no_wait, host=PEER_IP, prefix=link.exec_prefix(), env=quiet) as server:
                relay_delay = link.methods.get("delay") == "relay"
                p = spec.link
                with DelayRelay(
                    (PEER_IP, server.port),
                    p.rtt_ms if relay_delay else 0.0,
                    p.jitter_ms if relay_delay else 0.0,
                    p.loss if relay_delay else 0.0,
                ) as relay:
                    server.wait_ready(f"http://127.0.0.1:{relay.port}")
                    rows = _measure_samples(system, images, f"http://127.0.0.1:{relay.port}", threads)
            methods = link.methods
            mode = f"emulated: namespace + veth, rate by {methods['rate']}, delay/jitter/loss by {methods['delay']}"
    else:
        with ServerProcess(system.root, *no_wait, env=quiet) as server:
            rows = _measure_samples(system, images, server.wait_ready().url, threads)
        mode = "model: loopback + analytic link model" + (f" ({reason})" if reason else " (--emulate off)")
    return {"rows": rows, "labels": labels.tolist(), "link_mode": mode, "emulated": use_ns, "edge_threads": threads}


def _network_s(row: dict[str, Any], spec: TestbedSpec, emulated: bool) -> float:
    """Time on the wire and in the HTTP stacks: measured round trip minus the server's own time."""
    server_s = (row.get("queue_ms", 0.0) + row.get("compute_ms", 0.0)) / 1e3
    measured = max(0.0, row.get("rtt_ms", 0.0) / 1e3 - server_s)
    if emulated:
        return measured
    model = LinkModel(spec.link)
    return measured + model.round_trip_s(row.get("bytes_sent", 0.0), row.get("bytes_received", 0.0))


def compute_sources(spec: TestbedSpec, presets: dict[str, str]) -> dict[str, Any]:
    """Which compute times come from a profile's measurements (for these presets) rather than × slowdown."""
    edge = spec.edge.measured
    near = spec.near_edge.measured
    return {
        "edge_generalist_ms": edge.per_image_ms("generalist", presets.get("generalist", ""), 1) if edge else None,
        "edge_expert_ms": edge.per_image_ms("expert", presets.get("expert", ""), 1) if edge else None,
        "near_expert_measured": bool(near and near.per_image_ms("expert", presets.get("expert", ""), 1) is not None),
    }


def _measured_on(profile: DeviceProfile) -> str:
    m = profile.measured
    return f"{m.device}, {m.date}" if m else "not measured"


def strategies(
    run: dict[str, Any], spec: TestbedSpec, taus: list[float]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-strategy table and per-sample records, computed from the measured pieces."""
    rows, labels, emulated = run["rows"], np.asarray(run["labels"]), run["emulated"]
    edge, near = PowerModel(spec.edge), PowerModel(spec.near_edge)
    model = LinkModel(spec.link)
    n = len(rows)
    presets = run.get("presets", {})
    gen_s = np.array([r["gen_s"] for r in rows]) * spec.edge.slowdown
    local_s = np.array([r["local_expert_s"] for r in rows]) * spec.edge.slowdown
    timed = compute_sources(spec, presets)
    if timed["edge_generalist_ms"] is not None:  # measured on the device: replaces this machine × slowdown
        gen_s = np.full(n, timed["edge_generalist_ms"] / 1e3)
    if timed["edge_expert_ms"] is not None:
        local_s = np.full(n, timed["edge_expert_ms"] / 1e3)
    ok = np.array(["error" not in r for r in rows])  # the server answered (an abstention counts as an answer)
    net_s = np.array([_network_s(r, spec, emulated) for r in rows])
    encode_s = np.array([r.get("encode_ms", 0.0) / 1e3 for r in rows])
    near_s = np.array([r.get("compute_ms", 0.0) / 1e3 / max(1.0, r.get("batch_size", 1.0)) for r in rows])
    near_s_scaled = near_s * spec.near_edge.slowdown
    if spec.near_edge.measured is not None and presets.get("expert"):
        for i, r in enumerate(rows):
            per_image = spec.near_edge.measured.per_image_ms("expert", presets["expert"], int(r.get("batch_size", 1)))
            if per_image is not None and "error" not in r:
                near_s_scaled[i] = per_image / 1e3
    queue_s = np.array([r.get("queue_ms", 0.0) / 1e3 for r in rows])
    up = np.array([r.get("bytes_sent", 0.0) for r in rows])
    down = np.array([r.get("bytes_received", 0.0) for r in rows])
    stat = np.array([r["stat"] for r in rows])
    gen_label = np.array([r["gen_label"] for r in rows])
    local_label = np.array([r["local_label"] for r in rows])
    remote_label = np.array([r["remote_label"] for r in rows])
    offload_s = np.array([r.get("offload_s", 0.0) for r in rows])
    # A failed offload costs the time it really took (a timeout in full), spent waiting on the edge.
    offload_extra = np.where(ok, encode_s + net_s + queue_s + near_s_scaled, offload_s)

    near_j: list[float | None] = [None] * n  # metered near-edge joules per sample, where the profile has them
    if spec.near_edge.measured is not None and presets.get("expert"):
        for i, r in enumerate(rows):
            if "error" not in r:
                near_j[i] = spec.near_edge.measured.per_image_j(
                    "expert", presets["expert"], int(r.get("batch_size", 1))
                )

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
            "offload_rate": float(offload.mean()),
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
        off = offload_masks(stat, run["gate"], np.asarray([tau]))[0]  # attempted, answered or not
        label = np.where(off & ok, remote_or_gen, gen_label)
        table.append(summarise("collaborative", tau, off, label, gen_s + offload_extra * off, gen_s))
    records = [
        {
            **rows[i],
            "truth": int(labels[i]),
            "edge_compute_ms_modelled": float(gen_s[i] * 1e3),
            "network_ms": float(net_s[i] * 1e3),
            "network_measured": bool(emulated),
            "near_edge_compute_ms_modelled": float(near_s_scaled[i] * 1e3),
        }
        for i in range(n)
    ]
    return table, records


def headline_ratios(table: list[dict[str, Any]]) -> dict[str, Any]:
    """The paper's two comparisons, at the fastest τ whose accuracy is no lower than edge execution."""
    exec_row = next(r for r in table if r["strategy"] == "edge-execution")
    near_row = next(r for r in table if r["strategy"] == "near-edge-only")
    eligible = [r for r in table if r["strategy"] == "collaborative" and r["accuracy"] >= exec_row["accuracy"]]
    if not eligible:
        best_acc = max((r for r in table if r["strategy"] == "collaborative"), key=lambda r: r["accuracy"])
        return {
            "eligible": False,
            "note": f"no τ reaches edge execution's accuracy ({exec_row['accuracy']:.4f}); best collaborative "
            f"accuracy {best_acc['accuracy']:.4f} at τ={best_acc['tau']}",
        }
    best = min(eligible, key=lambda r: r["latency_mean_ms"])
    return {
        "eligible": True,
        "tau": best["tau"],
        "latency_ratio_vs_edge_execution": best["latency_mean_ms"] / exec_row["latency_mean_ms"],
        "energy_ratio_vs_near_edge_only": best["energy_total_mj"] / near_row["energy_total_mj"],
        "accuracy": best["accuracy"],
        "edge_execution_accuracy": exec_row["accuracy"],
    }


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


def run_testbed(
    system: SystemDir,
    spec: TestbedSpec,
    samples: int = 500,
    taus: list[float] | None = None,
    emulate: str = "auto",
) -> dict[str, Any]:
    cfg = system.config()
    taus = taus if taus is not None else [0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    run = measure(system, spec, samples, emulate)
    run["gate"] = cfg.routing.gate
    run["presets"] = {"generalist": cfg.generalist.preset, "expert": cfg.expert.preset}
    timed = compute_sources(spec, run["presets"])
    table, records = strategies(run, spec, taus)
    ratios = headline_ratios(table)
    meters = sorted(available_meters())
    provenance = {
        "link": run["link_mode"],
        "edge_compute": (
            f"measured on the device ({spec.edge.name} profile, {_measured_on(spec.edge)}), "
            f"generalist {timed['edge_generalist_ms']:.3g} ms, expert {timed['edge_expert_ms']} ms per image"
            if timed["edge_generalist_ms"] is not None
            else f"measured on this machine (best of {EDGE_REPEATS} runs per sample) with "
            f"{run['edge_threads']} thread(s) × slowdown "
            f"{spec.edge.slowdown:g} of profile {spec.edge.name} (modelled scaling)"
        ),
        "near_edge_compute": (
            f"measured on the device ({spec.near_edge.name} profile, {_measured_on(spec.near_edge)}), per batch size"
            if timed["near_expert_measured"]
            else f"measured by the server × slowdown {spec.near_edge.slowdown:g} of profile "
            f"{spec.near_edge.name} (modelled scaling)"
        ),
        "energy": "power model from the profiles' watts × those times, radio model "
        f"{spec.link.radio} (Huang et al. 2012); hardware meters readable here: {meters or 'none'}"
        + (
            f"; near-edge compute energy metered ({spec.near_edge.measured.meter}) on the device"
            if spec.near_edge.measured is not None and spec.near_edge.measured.j
            else ""
        ),
    }
    summary = {
        "system": cfg.name,
        "samples": len(records),
        "edge_profile": spec.edge.model_dump(),
        "near_edge_profile": spec.near_edge.model_dump(),
        "link": {"name": spec.link_name, **spec.link.model_dump()},
        "routing": cfg.routing.model_dump(),
        "provenance": provenance,
        "table": table,
        "headline": ratios,
    }
    out = system.root / "testbed"
    out.mkdir(parents=True, exist_ok=True)
    (out / "testbed.json").write_text(json.dumps(summary, indent=1))
    write_csv(out / "testbed.csv", table)
    with (out / "records.jsonl").open("w") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    _plots(out, table)
    cols = TABLE_COLUMNS
    md = [
        f"# askexpert testbed: {cfg.name}\n",
        f"{len(records)} test samples, one at a time. Edge `{spec.edge.name}`, near-edge `{spec.near_edge.name}`, "
        f"link `{spec.link_name}`.\n",
        "## Results\n",
        markdown_table(table, cols),
        "\n## Headline\n",
    ]
    if ratios["eligible"]:
        md.append(
            f"At τ={ratios['tau']:g}: latency / edge execution = **{ratios['latency_ratio_vs_edge_execution']:.3f}**, "
            f"energy / near-edge only = **{ratios['energy_ratio_vs_near_edge_only']:.3f}** "
            "(paper: 0.55 and 0.54).\n"
        )
    else:
        md.append(ratios["note"] + "\n")
    md += ["\n## What was measured and what was modelled\n"] + [f"* {k}: {v}\n" for k, v in provenance.items()]
    md.append("\n![latency](latency_vs_accuracy.png)\n\n![energy](energy_vs_accuracy.png)\n")
    (out / "testbed.md").write_text("\n".join(md))
    summary["out"] = str(out)
    return summary
