"""Every number of the evaluation, computed from the cache with vectorised numpy.

`outcomes` evaluates many gate thresholds at once: offload masks are a
(T, N) array, so a 50-value τ sweep costs a few array ops, and the expert
choice (which depends on k, not τ) is computed once per k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from askexpert.evaluate.cache import LogitCache, ScheduleOutputs
from askexpert.protocol import OTHER, expert_answer, final_labels, softmax
from askexpert.routing import GATES, choose_expert, gate_offloads, uncertainty


def subset_accuracy(logits: np.ndarray, labels: np.ndarray, subset: Sequence[int]) -> float:
    """Closed-set accuracy on samples of the subset: argmax over the subset's outputs ("other" excluded)."""
    mask = np.isin(labels, subset)
    if not mask.any():
        return float("nan")
    pred = np.asarray(subset)[logits[mask, : len(subset)].argmax(1)]
    return float((pred == labels[mask]).mean())


def open_set_accuracy(logits: np.ndarray, labels: np.ndarray, subset: Sequence[int]) -> float:
    """Accuracy on samples of the subset with "other" competing: answering "other" counts as wrong."""
    mask = np.isin(labels, subset)
    if not mask.any():
        return float("nan")
    classes = np.asarray([*subset, OTHER])
    pred = classes[logits[mask].argmax(1)]
    return float((pred == labels[mask]).mean())


def other_rate_outside(logits: np.ndarray, labels: np.ndarray, subset: Sequence[int]) -> float:
    """Share of out-of-subset samples the expert answers with "other" (its abstain recall)."""
    mask = ~np.isin(labels, subset)
    if not mask.any():
        return float("nan")
    return float((logits[mask].argmax(1) == len(subset)).mean())


def expert_labels(
    cache: LogitCache, outputs: ScheduleOutputs, rule: str = "replace", weight: float = 0.5
) -> np.ndarray:
    """(E, N) every expert's global answer on every sample under a combination rule (OTHER: abstains)."""
    if rule == "replace":
        return outputs.labels
    rows = []
    for eid, classes in zip(cache.partition.expert_ids, cache.partition.output_classes(), strict=True):
        rows.append(expert_answer(softmax(outputs.logits[eid]), classes, cache.gen_probs, rule, weight))
    return np.stack(rows)


def outcomes(
    cache: LogitCache,
    outputs: ScheduleOutputs,
    offload: np.ndarray,
    chosen: np.ndarray,
    answers: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Metrics for T routing settings at once.

    offload: (T, N) bool; chosen: (N,) or (T, N) expert index per sample;
    answers: (E, N) the experts' labels under a combination rule (default: `replace`).
    Returns arrays of length T.
    """
    y = cache.labels
    n = len(y)
    offload = np.atleast_2d(offload)
    chosen = np.broadcast_to(chosen, offload.shape)
    cols = np.broadcast_to(np.arange(n), offload.shape)
    expert_label = (outputs.labels if answers is None else answers)[chosen, cols]  # (T, N)
    final, answered = final_labels(cache.gen_pred[None, :], expert_label, offload)
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
    return gate_offloads(stat[None, :], gate, taus[:, None])


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


@dataclass(frozen=True)
class OperatingPoint:
    """Everything that turns cached outputs into one collaborative system's answers."""

    gate: str
    tau: float
    k: int
    scoring: str = "weighted"
    combine: str = "replace"
    mix_weight: float = 0.5

    def describe(self) -> str:
        rule = f"mix w={self.mix_weight:g}" if self.combine == "mix" else self.combine
        return f"{self.gate} τ={self.tau:.3g}, k={self.k}, {rule}"


def point_outcome(cache: LogitCache, outputs: ScheduleOutputs, point: OperatingPoint) -> dict[str, float]:
    mask = offload_masks(gate_statistic(cache, point.gate), point.gate, np.asarray([point.tau]))
    answers = expert_labels(cache, outputs, point.combine, point.mix_weight)
    res = outcomes(cache, outputs, mask, routed_experts(cache, point.k, point.scoring), answers)
    return {name: float(v[0]) for name, v in res.items() if name != "load"}


def choose_point(
    cache: LogitCache,
    outputs: ScheduleOutputs,
    taus: np.ndarray,
    ks: Sequence[int],
    rules: Sequence[tuple[str, float]],
    gates: Sequence[str] = GATES,
    scoring: str = "weighted",
) -> tuple[OperatingPoint, float]:
    """The most accurate (gate, τ, k, rule) on `cache` (the validation split); ties: the lower offload rate."""
    best: tuple[float, float] | None = None
    choice = OperatingPoint(gates[0], float(taus[0]), ks[0], scoring)
    stats = {g: gate_statistic(cache, g) for g in gates}
    masks = {g: offload_masks(stats[g], g, taus) for g in gates}
    answers = {rule: expert_labels(cache, outputs, *rule) for rule in rules}
    for k in ks:
        chosen = routed_experts(cache, k, scoring)
        for rule in rules:
            for gate in gates:
                res = outcomes(cache, outputs, masks[gate], chosen, answers[rule])
                for t in range(len(taus)):
                    score = (float(res["accuracy"][t]), -float(res["offload_rate"][t]))
                    if best is None or score > best:
                        best = score
                        choice = OperatingPoint(gate, float(taus[t]), k, scoring, rule[0], rule[1])
    return choice, (best[0] if best else float("nan"))


def headline(
    cache: LogitCache, point: OperatingPoint, chosen: dict[str, OperatingPoint] | None = None
) -> list[dict[str, Any]]:
    """Generalist alone, near-edge only, oracle routing and collaborative, for each schedule.

    `point` is the config's operating point; `chosen` adds, per schedule, the point chosen on validation.
    """
    n = len(cache.labels)
    gen_acc = float((cache.gen_pred == cache.labels).mean())
    everything = np.ones((1, n), dtype=bool)
    rows = []
    for schedule, outputs in cache.schedules.items():
        own = (chosen or {}).get(schedule)
        k = own.k if own is not None else point.k
        rows.append(
            {"schedule": schedule, "system": "generalist only (edge)", "accuracy": gen_acc, "offload_rate": 0.0}
        )
        for system, mask, experts in (
            (f"near-edge only (router, k={k})", everything, routed_experts(cache, k, point.scoring)),
            ("oracle routing (all offloaded)", everything, oracle_experts(cache)),
        ):
            res = outcomes(cache, outputs, mask, experts)
            rows.append(
                {"schedule": schedule, "system": system, **{m: float(v[0]) for m, v in res.items() if m != "load"}}
            )
        gate_point = own or point
        oracle = fixes_and_breaks(cache, outputs, gate_point, "", schedule)[-1]
        rows.append(
            {
                "schedule": schedule,
                "system": f"oracle gate (offloads exactly the fixes; k={gate_point.k}, {gate_point.combine})",
                "accuracy": oracle["oracle_gate_accuracy"],
                "offload_rate": oracle["fixes"] / n,
            }
        )
        points = [("collaborative, config", point)]
        if own is not None:
            points.append(("collaborative, chosen on validation", own))
        for name, p in points:
            rows.append(
                {"schedule": schedule, "system": f"{name} ({p.describe()})", **point_outcome(cache, outputs, p)}
            )
    return rows


def expert_table(cache: LogitCache) -> list[dict[str, Any]]:
    """Each expert on its own subset, per schedule: closed-set (argmax over the subset), open-set
    ("other" competing, counted wrong) and how often it says "other" outside its subset."""
    rows = []
    for eid, subset in zip(cache.partition.expert_ids, cache.partition.subsets, strict=True):
        row: dict[str, Any] = {"expert": eid, "classes": len(subset)}
        mask = np.isin(cache.labels, subset)
        row["generalist"] = float((cache.gen_pred[mask] == cache.labels[mask]).mean()) if mask.any() else float("nan")
        # the fair yardstick for an expert's closed-set accuracy: the generalist restricted to the same classes
        row["generalist closed-set"] = subset_accuracy(cache.gen_probs[:, list(subset)], cache.labels, subset)
        for schedule, outputs in cache.schedules.items():
            row[schedule] = subset_accuracy(outputs.logits[eid], cache.labels, subset)
            row[f"{schedule} open-set"] = open_set_accuracy(outputs.logits[eid], cache.labels, subset)
            row[f"{schedule} other-outside"] = other_rate_outside(outputs.logits[eid], cache.labels, subset)
        rows.append(row)
    return rows


def fixes_and_breaks(
    cache: LogitCache, outputs: ScheduleOutputs, point: OperatingPoint, split: str, schedule: str
) -> list[dict[str, Any]]:
    """What collaboration lives on: per routed expert and overall, if every sample were offloaded at `point`'s
    k, scoring and combination rule, how many of the generalist's wrong answers the expert turns right
    ("fixes") and how many right ones it turns wrong ("breaks"; an "other" answer falls back, so never breaks).

    The oracle gate offloads exactly the fixes: its accuracy is the generalist's plus fixes / N, the most
    any gate can add with these models and this router.
    """
    y = cache.labels
    n = len(y)
    chosen = routed_experts(cache, point.k, point.scoring)
    answers = expert_labels(cache, outputs, point.combine, point.mix_weight)[chosen, np.arange(n)]
    final, _ = final_labels(cache.gen_pred, answers, np.ones(n, dtype=bool))
    gen_right = cache.gen_pred == y
    fixes = ~gen_right & (final == y)
    breaks = gen_right & (final != y)
    hit = cache.partition.membership()[chosen, y]
    gen_acc = float(gen_right.mean())
    base = {"schedule": schedule, "split": split, "point": point.describe()}
    groups = [(eid, chosen == e) for e, eid in enumerate(cache.partition.expert_ids)] + [("all", np.ones(n, bool))]
    rows = []
    for eid, mask in groups:
        routed = int(mask.sum())
        rows.append(
            {
                **base,
                "expert": eid,
                "routed": routed,
                "generalist_wrong": int((~gen_right & mask).sum()),
                "fixes": int((fixes & mask).sum()),
                "breaks": int((breaks & mask).sum()),
                "routing_hit_rate": float(hit[mask].mean()) if routed else float("nan"),
                "oracle_gate_gain": float((fixes & mask).sum() / n),
            }
        )
    rows[-1]["generalist_accuracy"] = gen_acc
    rows[-1]["oracle_gate_accuracy"] = gen_acc + float(fixes.sum() / n)
    return rows
