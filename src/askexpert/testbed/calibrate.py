"""`askexpert calibrate`: choose τ and k for a latency, energy or accuracy target.

Accuracy and offload rate for every (τ, k) come from the *validation* split's
cached outputs, answered with the config's combination rule (`testbed.choice`;
the test split is never used for a choice). Latency and energy
come from a testbed run's per-sample costs: a sample answered on the edge costs
what `edge-only` measured, an offloaded one what `near-edge-only` measured, so
    latency(τ, k) = L_edge + offload_rate(τ, k) · (L_near − L_edge)
and likewise for energy. The chosen point is written into the system's config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from askexpert.config import SystemConfig
from askexpert.errors import ConfigError
from askexpert.routing import LEARNED
from askexpert.system import SystemDir
from askexpert.testbed.choice import ValidationView
from askexpert.testbed.costs import offload_costs


def predict(view: ValidationView, cost: dict[str, float], taus: np.ndarray, ks: list[int]) -> list[dict[str, Any]]:
    """Accuracy, latency and energy at every (τ, k) from the validation outputs and the testbed's costs."""
    rows = []
    for k in ks:
        res = view.outcomes(taus, k)
        for t, tau in enumerate(taus):
            rate = float(res["offload_rate"][t])
            rows.append(
                {
                    "tau": float(tau),
                    "k": k,
                    "accuracy": float(res["accuracy"][t]),
                    "offload_rate": rate,
                    "latency_ms": cost["edge_latency_ms"] + rate * cost["offload_latency_ms"],
                    "energy_mj": cost["edge_energy_mj"] + rate * cost["offload_energy_mj"],
                }
            )
    return rows


def choose(
    rows: list[dict[str, Any]],
    latency_budget_ms: float | None = None,
    energy_budget_mj: float | None = None,
    accuracy_floor: float | None = None,
    minimise: str = "latency",
) -> dict[str, Any]:
    """Max accuracy under the budgets given; with only an accuracy floor, min latency/energy above it."""
    if latency_budget_ms is None and energy_budget_mj is None and accuracy_floor is None:
        raise ConfigError("give --latency-budget-ms, --energy-budget-mj or --accuracy-floor")
    feasible = [
        r
        for r in rows
        if (latency_budget_ms is None or r["latency_ms"] <= latency_budget_ms)
        and (energy_budget_mj is None or r["energy_mj"] <= energy_budget_mj)
        and (accuracy_floor is None or r["accuracy"] >= accuracy_floor)
    ]
    if not feasible:
        cheapest = min(rows, key=lambda r: r["latency_ms"])
        best = max(rows, key=lambda r: r["accuracy"])
        raise ConfigError(
            "no (τ, k) meets the target; the cheapest point predicts "
            f"{cheapest['latency_ms']:.2f} ms, {cheapest['energy_mj']:.2f} mJ "
            f"at accuracy {cheapest['accuracy']:.4f}; "
            f"the most accurate predicts {best['accuracy']:.4f} "
            f"at {best['latency_ms']:.2f} ms, {best['energy_mj']:.2f} mJ"
        )
    if latency_budget_ms is not None or energy_budget_mj is not None:
        return max(feasible, key=lambda r: (r["accuracy"], -r["latency_ms"], -r["k"]))
    key = "latency_ms" if minimise == "latency" else "energy_mj"
    return min(feasible, key=lambda r: (r[key], -r["accuracy"], r["k"]))


def calibrate(
    system: SystemDir,
    testbed_json: Path | None = None,
    latency_budget_ms: float | None = None,
    energy_budget_mj: float | None = None,
    accuracy_floor: float | None = None,
    minimise: str = "latency",
    write: bool = True,
) -> dict[str, Any]:
    path = testbed_json or system.root / "testbed" / "testbed.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no testbed results; run `askexpert testbed` first")
    testbed = json.loads(path.read_text())
    cost = offload_costs(testbed["table"])
    cfg = system.config()
    view = ValidationView.of(system)  # the served schedule, with the config's gate and combination rule
    taus = np.linspace(0.0, 1.0, cfg.evaluate.taus)
    ks = list(range(1, cfg.evaluate.max_k + 1))
    if cfg.routing.gate == LEARNED:  # its gate was fitted for one k, and its scores crowd near 0.5
        ks = [cfg.routing.top_k]
        taus = view.spanning_taus(cfg.evaluate.taus)
    rows = predict(view, cost, taus, ks)
    best = choose(rows, latency_budget_ms, energy_budget_mj, accuracy_floor, minimise)
    result = {
        "chosen": best,
        "cost_model": cost,
        "targets": {
            "latency_budget_ms": latency_budget_ms,
            "energy_budget_mj": energy_budget_mj,
            "accuracy_floor": accuracy_floor,
            "minimise": minimise,
        },
        "testbed": str(path),
    }
    if write:
        raw = cfg.model_dump(mode="json")
        raw["routing"].update(tau=best["tau"], top_k=best["k"])
        SystemConfig.from_dict(raw).to_yaml(system.config_path)
        (path.parent / "calibration.json").write_text(json.dumps({**result, "grid": rows}, indent=1))
    return result
