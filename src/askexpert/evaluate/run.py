"""`askexpert evaluate`: cache once, sweep from the cache, write the report."""

from __future__ import annotations

from typing import Any

import numpy as np

from askexpert.evaluate.cache import LogitCache, build_cache
from askexpert.evaluate.metrics import (
    expert_table,
    gate_statistic,
    headline,
    offload_masks,
    outcomes,
    routed_experts,
    sweep,
)
from askexpert.evaluate.report import write_report
from askexpert.system import SystemDir


def _operating_rows(cache: LogitCache, gate: str, tau: float, ks: list[int], scoring: str) -> list[dict[str, Any]]:
    mask = offload_masks(gate_statistic(cache, gate), gate, np.asarray([tau]))
    rows = []
    for k in ks:
        chosen = routed_experts(cache, k, scoring)
        for schedule, outputs in cache.schedules.items():
            res = outcomes(cache, outputs, mask, chosen)
            row: dict[str, Any] = {"schedule": schedule, "k": k}
            row.update({name: float(v[0]) for name, v in res.items() if name != "load"})
            row.update({f"load_{e}": float(res["load"][0, i]) for i, e in enumerate(cache.partition.expert_ids)})
            rows.append(row)
    return rows


def summarise(system: SystemDir, cache: LogitCache) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    cfg = system.config()
    rc = cfg.routing
    max_k = min(cfg.evaluate.max_k, cache.gen_probs.shape[1])
    ks = list(range(1, max_k + 1))
    taus = np.linspace(0.0, 1.0, cfg.evaluate.taus)
    rows = sweep(cache, taus, ks)
    experts = expert_table(cache)
    schedules = list(cache.schedules)
    diff = None
    if "static" in schedules and "progressive" in schedules:
        diff = float(np.nanmean([r["progressive"] - r["static"] for r in experts]))
    by_k = _operating_rows(cache, rc.gate, rc.tau, ks, rc.scoring)
    summary: dict[str, Any] = {
        "system": cfg.name,
        "test_samples": int(len(cache.labels)),
        "num_classes": int(cache.gen_probs.shape[1]),
        "partition_strategy": cache.partition.strategy,
        "expert_ids": list(cache.partition.expert_ids),
        "schedules": schedules,
        "cache_key": cache.key,
        "operating_point": {"gate": rc.gate, "tau": rc.tau, "k": rc.top_k, "scoring": rc.scoring},
        "headline": headline(cache, rc.gate, rc.tau, rc.top_k, rc.scoring),
        "experts": experts,
        "progressive_minus_static": diff,
        "accuracy_vs_k": [{k: v for k, v in r.items() if not k.startswith("load_")} for r in by_k],
        "operating_rows": [r for r in by_k if r["k"] == rc.top_k],
    }
    return summary, rows


def evaluate_system(system: SystemDir) -> dict[str, Any]:
    """Build/reuse the cache, compute every table, write `report/`; returns the summary."""
    cache = build_cache(system)
    summary, rows = summarise(system, cache)
    summary["report"] = str(write_report(system.report_dir, summary, rows))
    return summary
