"""Every number of the evaluation, computed from the cache with vectorised numpy.

`outcomes` evaluates many gate thresholds at once: offload masks are a
(T, N) array, so a 50-value τ sweep costs a few array ops, and the expert
choice (which depends on k, not τ) is computed once per k.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from askexpert.evaluate.cache import LogitCache, ScheduleOutputs
from askexpert.routing import GATES, choose_expert, uncertainty


def subset_accuracy(logits: np.ndarray, labels: np.ndarray, subset: Sequence[int]) -> float:
    """Closed-set accuracy on samples of the subset: argmax over the subset's outputs ("other" excluded)."""
    mask = np.isin(labels, subset)
    if not mask.any():
        return float("nan")
    pred = np.asarray(subset)[logits[mask, : len(subset)].argmax(1)]
    return float((pred == labels[mask]).mean())


def outcomes(
    cache: LogitCache, outputs: ScheduleOutputs, offload: np.ndarray, chosen: np.ndarray
) -> dict[str, np.ndarray]:
    """Metrics for T routing settings at once.

    offload: (T, N) bool; chosen: (N,) or (T, N) expert index per sample.
    Returns arrays of length T.
    """
    y = cache.labels
    n = len(y)
    offload = np.atleast_2d(offload)
    chosen = np.broadcast_to(chosen, offload.shape)
    cols = np.broadcast_to(np.arange(n), offload.shape)
    expert_label = outputs.labels[chosen, cols]  # (T, N)
    answered = offload & (expert_label >= 0)
    final = np.where(answered, expert_label, cache.gen_pred[None, :])
    n_off = offload.sum(axis=1)
    hit = cache.partition.membership()[chosen, np.broadcast_to(y, offload.shape)]
    with np.errstate(invalid="ignore", divide="ignore"):
        result = {
            "accuracy": (final == y).mean(axis=1),
            "offload_rate": n_off / n,
            "routing_hit_rate": np.where(n_off > 0, (hit & offload).sum(axis=1) / n_off, np.nan),
            "abstain_rate": np.where(n_off > 0, (offload & ~answered).sum(axis=1) / n_off, np.nan),
            "offloaded_expert_accuracy": np.where(
                n_off > 0, ((expert_label == y) & offload).sum(axis=1) / n_off, np.nan
            ),
        }
    loads = np.stack([(offload & (chosen == e)).sum(axis=1) / n for e in range(cache.partition.num_experts)], axis=1)
    result["load"] = loads  # (T, E)
    return result


def routed_experts(cache: LogitCache, k: int, scoring: str) -> np.ndarray:
    membership = torch.from_numpy(cache.partition.membership())
    return choose_expert(torch.from_numpy(cache.gen_probs), membership, k, scoring).numpy()


def oracle_experts(cache: LogitCache) -> np.ndarray:
    """The (first) expert that holds each sample's true class: the best any router could do."""
    return cache.partition.membership()[:, cache.labels].argmax(axis=0)


def gate_statistic(cache: LogitCache, gate: str) -> np.ndarray:
    return uncertainty(torch.from_numpy(cache.gen_probs), gate).numpy()


def offload_masks(stat: np.ndarray, gate: str, taus: np.ndarray) -> np.ndarray:
    return stat[None, :] > taus[:, None] if gate == "entropy" else stat[None, :] < taus[:, None]


def _rows(
    base: dict[str, Any], res: dict[str, np.ndarray], expert_ids: Sequence[str], taus: np.ndarray
) -> list[dict[str, Any]]:
    rows = []
    for t, tau in enumerate(taus):
        row = dict(base, tau=float(tau))
        for name, values in res.items():
            if name == "load":
                row.update({f"load_{e}": float(values[t, i]) for i, e in enumerate(expert_ids)})
            else:
                row[name] = float(values[t])
        rows.append(row)
    return rows


def sweep(
    cache: LogitCache,
    taus: np.ndarray,
    ks: Sequence[int],
    gates: Sequence[str] = GATES,
    scorings: Sequence[str] = ("weighted",),
) -> list[dict[str, Any]]:
    """One row per (schedule, scoring, k, gate, τ)."""
    rows: list[dict[str, Any]] = []
    stats = {g: gate_statistic(cache, g) for g in gates}
    masks = {g: offload_masks(stats[g], g, taus) for g in gates}
    for scoring in scorings:
        for k in ks:
            chosen = routed_experts(cache, k, scoring)
            for schedule, outputs in cache.schedules.items():
                for gate in gates:
                    res = outcomes(cache, outputs, masks[gate], chosen)
                    base = {"schedule": schedule, "scoring": scoring, "k": k, "gate": gate}
                    rows.extend(_rows(base, res, cache.partition.expert_ids, taus))
    return rows


def headline(cache: LogitCache, gate: str, tau: float, k: int, scoring: str) -> list[dict[str, Any]]:
    """Generalist alone, near-edge only, oracle routing and collaborative, for each schedule."""
    n = len(cache.labels)
    gen_acc = float((cache.gen_pred == cache.labels).mean())
    chosen = routed_experts(cache, k, scoring)
    everything = np.ones((1, n), dtype=bool)
    at_point = offload_masks(gate_statistic(cache, gate), gate, np.asarray([tau]))
    rows = []
    for schedule, outputs in cache.schedules.items():
        rows.append(
            {"schedule": schedule, "system": "generalist only (edge)", "accuracy": gen_acc, "offload_rate": 0.0}
        )
        for system, mask, experts in (
            (f"near-edge only (router, k={k})", everything, chosen),
            ("oracle routing (all offloaded)", everything, oracle_experts(cache)),
            (f"collaborative ({gate} τ={tau:g}, k={k})", at_point, chosen),
        ):
            res = outcomes(cache, outputs, mask, experts)
            rows.append(
                {
                    "schedule": schedule,
                    "system": system,
                    "accuracy": float(res["accuracy"][0]),
                    "offload_rate": float(res["offload_rate"][0]),
                    "routing_hit_rate": float(res["routing_hit_rate"][0]),
                    "abstain_rate": float(res["abstain_rate"][0]),
                }
            )
    return rows


def expert_table(cache: LogitCache) -> list[dict[str, Any]]:
    """Each expert's closed-set accuracy on its own subset (test split), per schedule."""
    rows = []
    for eid, subset in zip(cache.partition.expert_ids, cache.partition.subsets, strict=True):
        row: dict[str, Any] = {"expert": eid, "classes": len(subset)}
        mask = np.isin(cache.labels, subset)
        row["generalist"] = float((cache.gen_pred[mask] == cache.labels[mask]).mean()) if mask.any() else float("nan")
        for schedule, outputs in cache.schedules.items():
            row[schedule] = subset_accuracy(outputs.logits[eid], cache.labels, subset)
        rows.append(row)
    return rows
