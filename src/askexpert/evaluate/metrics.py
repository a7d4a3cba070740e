"""Every number of the evaluation, computed from the cache with vectorised numpy.

`outcomes` evaluates many gate thresholds at once: offload masks are a
(T, N) array, so a 50-value τ sweep costs a few array ops, and the expert
choice (which depends on k, not τ) is computed once per k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from askexpert.config import RoutingConfig
from askexpert.evaluate.cache import LogitCache, ScheduleOutputs
from askexpert.protocol import OTHER, expert_answer, final_labels, pair_answer, softmax
from askexpert.routing import GATES, LEARNED, NO_SECOND, choose_expert, choose_experts, gate_offloads, uncertainty


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


@dataclass(frozen=True)
class SecondExpert:
    """The runner-up expert each sample also asks when offloaded (`routing.second_within`), and the pair's answer."""

    expert: np.ndarray  # (N,) expert index, NO_SECOND where the sample asks one expert
    answer: np.ndarray  # (N,) the two experts' combined answer where expert ≠ NO_SECOND (`pair_answer`)


def second_expert(
    cache: LogitCache,
    outputs: ScheduleOutputs,
    k: int,
    scoring: str,
    within: float,
    rule: str = "replace",
    weight: float = 0.5,
) -> SecondExpert | None:
    """Who else each sample asks at (k, scoring, second_within) and what the pair answers; None for one expert."""
    if within <= 0.0:
        return None
    first, second = choose_experts(cache.gen_probs, cache.partition.membership(), k, scoring, within)
    classes = cache.partition.output_classes()
    ids = cache.partition.expert_ids
    answer = np.full(len(first), OTHER, dtype=np.int64)
    asks = second != NO_SECOND
    for a, b in {(int(a), int(b)) for a, b in zip(first[asks], second[asks], strict=True)}:
        rows = np.flatnonzero(asks & (first == a) & (second == b))
        probs = (softmax(outputs.logits[ids[a]][rows]), softmax(outputs.logits[ids[b]][rows]))
        answer[rows] = pair_answer(probs, (classes[a], classes[b]), cache.gen_probs[rows], rule, weight)
    return SecondExpert(second, answer)


def asks_two(second: SecondExpert | None) -> bool:
    """Whether any sample asks a second expert."""
    return second is not None and bool((second.expert != NO_SECOND).any())


def _with_second(
    cache: LogitCache, second: SecondExpert, answers: np.ndarray, hit: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(answers, hit, pair): a sample that asks two experts takes the pair's answer, and counts as a hit when
    either expert holds its class. `answers` and `hit` are (N,) or (T, N); `pair` is (N,)."""
    pair = second.expert != NO_SECOND
    held = cache.partition.membership()[np.where(pair, second.expert, 0), cache.labels]
    return np.where(pair, second.answer, answers), hit | (pair & held), pair


def outcomes(
    cache: LogitCache,
    outputs: ScheduleOutputs,
    offload: np.ndarray,
    chosen: np.ndarray,
    answers: np.ndarray | None = None,
    second: SecondExpert | None = None,
) -> dict[str, np.ndarray]:
    """Metrics for T routing settings at once.

    offload: (T, N) bool; chosen: (N,) or (T, N) expert index per sample;
    answers: (E, N) the experts' labels under a combination rule (default: `replace`);
    second: the runner-up each sample also asks, and the pair's answer (default: one expert).
    `offload_rate` counts requests (a sample that asks two experts counts twice), `offloaded_samples`
    the samples sent; the hit rate counts a sample whose true class either asked expert holds.
    Returns arrays of length T.
    """
    y = cache.labels
    n = len(y)
    offload = np.atleast_2d(offload)
    chosen = np.broadcast_to(chosen, offload.shape)
    cols = np.broadcast_to(np.arange(n), offload.shape)
    expert_label = (outputs.labels if answers is None else answers)[chosen, cols]  # (T, N)
    hit = cache.partition.membership()[chosen, np.broadcast_to(y, offload.shape)]
    pair = np.zeros(n, dtype=bool)
    if second is not None:
        expert_label, hit, pair = _with_second(cache, second, expert_label, hit)
    final, answered = final_labels(cache.gen_pred[None, :], expert_label, offload)
    n_off = offload.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        result = {
            "accuracy": (final == y).mean(axis=1),
            "offload_rate": (n_off + (offload & pair).sum(axis=1)) / n,
            "offloaded_samples": n_off / n,
            "routing_hit_rate": np.where(n_off > 0, (hit & offload).sum(axis=1) / n_off, np.nan),
            "abstain_rate": np.where(n_off > 0, (offload & ~answered).sum(axis=1) / n_off, np.nan),
            "offloaded_expert_accuracy": np.where(
                n_off > 0, ((expert_label == y) & offload).sum(axis=1) / n_off, np.nan
            ),
        }
    asked = [offload & (chosen == e) for e in range(cache.partition.num_experts)]
    if second is not None:
        asked = [a | (offload & (second.expert == e)) for e, a in enumerate(asked)]
    loads = np.stack([a.sum(axis=1) / n for a in asked], axis=1)
    result["load"] = loads  # (T, E)
    return result


def routed_experts(cache: LogitCache, k: int, scoring: str) -> np.ndarray:
    return choose_expert(cache.gen_probs, cache.partition.membership(), k, scoring)


def oracle_experts(cache: LogitCache) -> np.ndarray:
    """The (first) expert that holds each sample's true class: the best any router could do."""
    return cache.partition.membership()[:, cache.labels].argmax(axis=0)


def gate_statistic(cache: LogitCache, gate: str) -> np.ndarray:
    return uncertainty(cache.gen_probs, gate)


@dataclass
class GateStats:
    """Each gate's per-sample statistic on one cache: the confidence gates once, the learned gate per
    (schedule, k), because what the routed expert gains depends on both (`evaluate.gates` adds it)."""

    confidence: dict[str, np.ndarray]
    learned: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(cls, cache: LogitCache) -> GateStats:
        return cls({g: gate_statistic(cache, g) for g in GATES})

    @property
    def gates(self) -> tuple[str, ...]:
        return (*self.confidence, LEARNED) if self.learned else tuple(self.confidence)

    def __call__(self, gate: str, schedule: str, k: int) -> np.ndarray:
        if gate == LEARNED:
            try:
                return self.learned[(schedule, k)]
            except KeyError:
                raise KeyError(f"no learned gate scores for schedule {schedule!r}, k={k}") from None
        return self.confidence[gate]


def offload_masks(stat: np.ndarray, gate: str, taus: np.ndarray) -> np.ndarray:
    return gate_offloads(stat[None, :], gate, taus[:, None])


def gate_taus(gate: str, stat: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """The thresholds a sweep tries: the given grid, or for the learned gate (whose scores crowd near 0.5)
    the quantiles of its statistic, so that its offload rates spread over 0…1 as evenly as the grid's."""
    if gate != LEARNED:
        return taus
    return np.unique(np.concatenate([[0.0], np.round(np.quantile(stat, np.linspace(0.0, 1.0, len(taus))), 6)]))


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
    stats: GateStats | None = None,
) -> list[dict[str, Any]]:
    """One row per (schedule, scoring, k, gate, τ)."""
    rows: list[dict[str, Any]] = []
    stats = GateStats.of(cache) if stats is None else stats
    for scoring in scorings:
        for k in ks:
            chosen = routed_experts(cache, k, scoring)
            for schedule, outputs in cache.schedules.items():
                for gate in gates:
                    stat = stats(gate, schedule, k)
                    grid = gate_taus(gate, stat, taus)
                    res = outcomes(cache, outputs, offload_masks(stat, gate, grid), chosen)
                    base = {"schedule": schedule, "scoring": scoring, "k": k, "gate": gate}
                    rows.extend(_rows(base, res, cache.partition.expert_ids, grid))
    return rows


def point_second(cache: LogitCache, outputs: ScheduleOutputs, point: RoutingConfig) -> SecondExpert | None:
    return second_expert(
        cache, outputs, point.top_k, point.scoring, point.second_within, point.combine, point.mix_weight
    )


def point_outcome(
    cache: LogitCache, outputs: ScheduleOutputs, point: RoutingConfig, stat: np.ndarray | None = None
) -> dict[str, float]:
    """The metrics at one point; `stat`: the gate's statistic (the confidence gates compute their own)."""
    stat = gate_statistic(cache, point.gate) if stat is None else stat
    mask = offload_masks(stat, point.gate, np.asarray([point.tau]))
    answers = expert_labels(cache, outputs, point.combine, point.mix_weight)
    chosen = routed_experts(cache, point.top_k, point.scoring)
    res = outcomes(cache, outputs, mask, chosen, answers, point_second(cache, outputs, point))
    return {name: float(v[0]) for name, v in res.items() if name != "load"}


def choose_point(
    cache: LogitCache,
    outputs: ScheduleOutputs,
    taus: np.ndarray,
    ks: Sequence[int],
    rules: Sequence[tuple[str, float]],
    gates: Sequence[str] = GATES,
    scoring: str = "weighted",
    stats: GateStats | None = None,
    schedule: str = "",
    withins: Sequence[float] = (0.0,),
) -> tuple[RoutingConfig, float]:
    """The most accurate (gate, τ, k, rule, second_within) on `cache` (the validation split); ties: the lower
    offload rate (requests: a second expert counts).

    `stats` gives each gate's statistic for `schedule` (default: the confidence gates').
    """
    best: tuple[float, float] | None = None
    choice = RoutingConfig.model_validate({"gate": gates[0], "tau": float(taus[0]), "top_k": ks[0], "scoring": scoring})
    stats = GateStats.of(cache) if stats is None else stats
    answers = {rule: expert_labels(cache, outputs, *rule) for rule in rules}
    for k in ks:
        chosen = routed_experts(cache, k, scoring)
        seconds = {
            (within, rule): second_expert(cache, outputs, k, scoring, within, *rule)
            for within in withins
            for rule in rules
        }
        for gate in gates:
            stat = stats(gate, schedule, k)
            grid = gate_taus(gate, stat, taus)
            masks = offload_masks(stat, gate, grid)
            for (within, rule), second in seconds.items():
                res = outcomes(cache, outputs, masks, chosen, answers[rule], second)
                for t in range(len(grid)):
                    score = (float(res["accuracy"][t]), -float(res["offload_rate"][t]))
                    if best is None or score > best:
                        best = score
                        choice = RoutingConfig.model_validate(
                            {
                                "gate": gate,
                                "tau": float(grid[t]),
                                "top_k": k,
                                "scoring": scoring,
                                "combine": rule[0],
                                "mix_weight": rule[1],
                                # a window no sample can use (k = 1: only one expert scores) is one expert
                                "second_within": within if asks_two(second) else 0.0,
                            }
                        )
    return choice, (best[0] if best else float("nan"))


def headline(
    cache: LogitCache,
    point: RoutingConfig,
    chosen: dict[str, RoutingConfig] | None = None,
    stats: GateStats | None = None,
) -> list[dict[str, Any]]:
    """Generalist alone, near-edge only, oracle routing and collaborative, for each schedule.

    `point` is the config's operating point; `chosen` adds, per schedule, the point chosen on validation.
    """
    n = len(cache.labels)
    gen_acc = float((cache.gen_pred == cache.labels).mean())
    everything = np.ones((1, n), dtype=bool)
    stats = GateStats.of(cache) if stats is None else stats
    rows = []
    for schedule, outputs in cache.schedules.items():
        own = (chosen or {}).get(schedule)
        k = own.top_k if own is not None else point.top_k
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
                "system": f"oracle gate (offloads exactly the fixes; k={gate_point.top_k}, {gate_point.combine})",
                "accuracy": oracle["oracle_gate_accuracy"],
                "offload_rate": oracle["fixes"] / n,
            }
        )
        points = [("collaborative, config", point)]
        if own is not None:
            points.append(("collaborative, chosen on validation", own))
        for name, p in points:
            outcome = point_outcome(cache, outputs, p, stats(p.gate, schedule, p.top_k))
            rows.append({"schedule": schedule, "system": f"{name} ({p.describe()})", **outcome})
    return rows


def expert_table(cache: LogitCache, stage1: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Each expert on its own subset, per schedule: closed-set (argmax over the subset), open-set
    ("other" competing, counted wrong) and how often it says "other" outside its subset.

    `stage1`: stage 1's logits (N, C) on the same samples (`cache.build_stage1_logits`), for its closed-set
    accuracy on each subset: what the experts that start from it had before their own stages."""
    rows = []
    for eid, subset in zip(cache.partition.expert_ids, cache.partition.subsets, strict=True):
        row: dict[str, Any] = {"expert": eid, "classes": len(subset)}
        mask = np.isin(cache.labels, subset)
        row["generalist"] = float((cache.gen_pred[mask] == cache.labels[mask]).mean()) if mask.any() else float("nan")
        # the fair yardstick for an expert's closed-set accuracy: the generalist restricted to the same classes
        row["generalist closed-set"] = subset_accuracy(cache.gen_probs[:, list(subset)], cache.labels, subset)
        if stage1 is not None:
            row["stage 1 closed-set"] = subset_accuracy(stage1[:, list(subset)], cache.labels, subset)
        for schedule, outputs in cache.schedules.items():
            row[schedule] = subset_accuracy(outputs.logits[eid], cache.labels, subset)
            row[f"{schedule} open-set"] = open_set_accuracy(outputs.logits[eid], cache.labels, subset)
            row[f"{schedule} other-outside"] = other_rate_outside(outputs.logits[eid], cache.labels, subset)
        rows.append(row)
    return rows


def fixes_and_breaks(
    cache: LogitCache, outputs: ScheduleOutputs, point: RoutingConfig, split: str, schedule: str
) -> list[dict[str, Any]]:
    """What collaboration lives on: per routed expert and overall, if every sample were offloaded at `point`'s
    k, scoring, combination rule and second expert (if any), how many of the generalist's wrong answers the
    expert turns right ("fixes") and how many right ones it turns wrong ("breaks"; an "other" answer falls
    back, so never breaks).

    The oracle gate offloads exactly the fixes: its accuracy is the generalist's plus fixes / N, the most
    any gate can add with these models and this router.
    """
    y = cache.labels
    n = len(y)
    chosen = routed_experts(cache, point.top_k, point.scoring)
    answers = expert_labels(cache, outputs, point.combine, point.mix_weight)[chosen, np.arange(n)]
    hit = cache.partition.membership()[chosen, y]
    second = point_second(cache, outputs, point)
    if second is not None:
        answers, hit, _ = _with_second(cache, second, answers, hit)
    final, _ = final_labels(cache.gen_pred, answers, np.ones(n, dtype=bool))
    gen_right = cache.gen_pred == y
    fixes = ~gen_right & (final == y)
    breaks = gen_right & (final != y)
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


def _offload_above(gate: str) -> bool:
    return bool(gate_offloads(np.ones(1), gate, 0.5)[0])


def tau_for_rate(gate: str, stat: np.ndarray, rate: float) -> float:
    """The τ at which `gate` offloads a `rate` share of the samples whose statistic is `stat`."""
    return float(np.quantile(stat, 1.0 - rate if _offload_above(gate) else rate))


EQUAL_OFFLOAD = (0.1, 0.2, 0.3)  # offload rates (set on validation) at which the gates are compared
# τ candidates for the parity point (quantiles of the gate statistic, 0.5 % of offload apart): one grid
# for the gate table here and the testbed's headline τ, so both find the same lowest parity offload
PARITY_GRID_POINTS = 201

# the figures people compare gates by (gate_comparison's columns, in the report, the CLI and the benchmark)
GATE_METRICS = (
    "parity_test_offload",
    "parity_test_accuracy",
    "test_accuracy_at_10",
    "test_accuracy_at_20",
    "test_accuracy_at_30",
    "test_hit_rate_at_30",
    "oracle_share_at_30",
)


def gate_comparison(
    test: LogitCache,
    val: LogitCache,
    test_stat: np.ndarray,
    val_stat: np.ndarray,
    gate: str,
    schedule: str,
    k: int,
    scoring: str = "weighted",
) -> dict[str, Any]:
    """What decides the costs, for one gate (τ always set on validation, `replace` rule):

    * parity: the lowest validation offload rate whose validation accuracy reaches edge execution's
      (every sample answered by its routed expert), and what that τ gives on test;
    * accuracy, offload rate and routing hit rate on test at the τ giving 10/20/30 % offload on validation;
    * the share of the oracle gate's gain captured at 30 %.
    """
    row: dict[str, Any] = {"schedule": schedule, "gate": gate, "k": k}
    views = {
        "val": (val, val_stat, routed_experts(val, k, scoring)),
        "test": (test, test_stat, routed_experts(test, k, scoring)),
    }

    def at(split: str, taus: np.ndarray) -> dict[str, np.ndarray]:
        cache, stat, chosen = views[split]
        return outcomes(cache, cache.schedules[schedule], offload_masks(stat, gate, taus), chosen)

    everything = {s: at(s, np.asarray([np.inf if not _offload_above(gate) else -np.inf])) for s in views}
    target = float(everything["val"]["accuracy"][0])
    grid = np.unique(np.quantile(val_stat, np.linspace(0.0, 1.0, PARITY_GRID_POINTS)))
    grid = np.concatenate([[-np.inf], grid, [np.inf]])
    res = at("val", grid)
    reach = np.flatnonzero(res["accuracy"] >= target)
    best = float(grid[reach[np.argmin(res["offload_rate"][reach])]]) if reach.size else float("nan")
    on_test = at("test", np.asarray([best])) if reach.size else None
    gen_acc = float((test.gen_pred == test.labels).mean())
    point = RoutingConfig.model_validate({"gate": gate, "tau": 0.0, "top_k": k, "scoring": scoring})
    oracle = fixes_and_breaks(test, test.schedules[schedule], point, "test", schedule)
    oracle_gain = float(oracle[-1]["oracle_gate_accuracy"]) - gen_acc
    row.update(
        {
            "test_generalist": gen_acc,
            "test_edge_execution": float(everything["test"]["accuracy"][0]),
            "parity_val_offload": float(res["offload_rate"][reach].min()) if reach.size else float("nan"),
            "parity_test_offload": float(on_test["offload_rate"][0]) if on_test is not None else float("nan"),
            "parity_test_accuracy": float(on_test["accuracy"][0]) if on_test is not None else float("nan"),
            "oracle_gain": oracle_gain,
        }
    )
    for rate in EQUAL_OFFLOAD:
        tau = tau_for_rate(gate, val_stat, rate)
        r = at("test", np.asarray([tau]))
        pct = round(rate * 100)
        row[f"test_accuracy_at_{pct}"] = float(r["accuracy"][0])
        row[f"test_offload_at_{pct}"] = float(r["offload_rate"][0])
        row[f"test_hit_rate_at_{pct}"] = float(r["routing_hit_rate"][0])
    last = round(EQUAL_OFFLOAD[-1] * 100)
    gained = row[f"test_accuracy_at_{last}"] - gen_acc
    row[f"oracle_share_at_{last}"] = gained / oracle_gain if oracle_gain > 0 else float("nan")
    return row
