"""The Router: decide *whether* to ask an expert (gate) and *which one* (Top-k scoring).

Pure, batched numpy ops: no per-sample Python loop, so routing costs a tiny
fraction of the generalist's forward pass and the same code serves the live
classifier and the cached-logit sweeps. No torch: the router runs on the edge.

Gate (offload when the generalist is unsure), against threshold τ:
  * ``max_prob``: max_c p_c < τ
  * ``margin``:   p_(1) − p_(2) < τ
  * ``entropy``:  H(p) / log C > τ
  * ``learned``:  the deferral gate's expected gain of asking the routed expert > τ
    (`askexpert.deferral`; fitted on held-out outputs by `askexpert evaluate`)

Expert choice from the Top-k classes:
  * ``weighted``: score_e = Σ_{c ∈ Top-k} p_c · [c ∈ S_e]
  * ``count``:    score_e = |Top-k ∩ S_e|
argmax over experts; ties go to the expert holding the best-ranked Top-k class
(so the top-1 class's expert first), then to the lowest expert index (only
possible with overlapping subsets that hold the same Top-k classes).

A second expert (``second_within`` > 0, beyond the paper): an offloaded sample also asks
the runner-up (the same choice among the other experts) when its score is at least
(1 − second_within) × the best's, and above 0. Disjoint subsets cap how often the expert
holding the true class is asked; a close call is where the router misses most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np

from askexpert.config import RoutingConfig
from askexpert.deferral import DeferralGate, gate_fingerprint
from askexpert.errors import RoutingError
from askexpert.partition import Partition
from askexpert.system import SystemDir

Gate = Literal["max_prob", "margin", "entropy", "learned"]
Scoring = Literal["weighted", "count"]
GATES: tuple[str, ...] = ("max_prob", "margin", "entropy")  # the confidence gates: a statistic of p alone
LEARNED = "learned"
ALL_GATES: tuple[str, ...] = (*GATES, LEARNED)
SCORINGS: tuple[str, ...] = ("weighted", "count")
_TIE_TOLERANCE = 1e-6


def _as_probs(probs: object) -> np.ndarray:
    """The probabilities as a numpy array (a CPU tensor converts without a copy), checked."""
    p = np.asarray(probs)
    if p.ndim != 2 or p.shape[1] < 1:
        raise RoutingError(f"probabilities must be (N, C); got shape {tuple(p.shape)}")
    if not np.issubdtype(p.dtype, np.floating):
        raise RoutingError(f"probabilities must be floating point; got {p.dtype}")
    return p


def uncertainty(probs: np.ndarray, gate: str) -> np.ndarray:
    """The per-sample statistic the gate compares with τ."""
    p = _as_probs(probs)
    if gate == "max_prob":
        return p.max(axis=1)
    if gate == "margin":
        if p.shape[1] < 2:
            return np.ones(p.shape[0], dtype=p.dtype)
        top2 = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    if gate == "entropy":
        ent = -(p * np.log(np.maximum(p, 1e-12))).sum(axis=1)
        return (ent / math.log(max(2, p.shape[1]))).astype(p.dtype)
    if gate == LEARNED:
        raise RoutingError("the learned gate scores with its fitted model: give the Router its DeferralGate")
    raise RoutingError(f"unknown gate {gate!r}; choose one of {', '.join(ALL_GATES)}")


def gate_offloads(stat: np.ndarray, gate: str, tau: np.ndarray | float) -> np.ndarray:
    """The gate's one comparison: entropy and learned offload above τ, max_prob and margin below it.

    Broadcasts, so the live router and the cached sweeps (many τ at once) share it.
    """
    if gate not in ALL_GATES:
        raise RoutingError(f"unknown gate {gate!r}; choose one of {', '.join(ALL_GATES)}")
    return np.asarray(stat > tau if gate in ("entropy", LEARNED) else stat < tau)


def offload_mask(probs: np.ndarray, gate: str, tau: float) -> np.ndarray:
    """True where the sample should go to an expert."""
    return gate_offloads(uncertainty(probs, gate), gate, tau)


def _check_k(k: int, num_classes: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise RoutingError(f"top_k must be an integer ≥ 1; got {k!r}")
    if k > num_classes:
        raise RoutingError(f"top_k={k} exceeds the number of classes ({num_classes})")


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, k), classes (N, k)), best first; equal probabilities in class order."""
    p = _as_probs(probs)
    _check_k(k, p.shape[1])
    classes = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(p, classes, axis=1), classes.astype(np.int64)


def expert_scores(
    probs: np.ndarray, membership: np.ndarray, k: int, scoring: str = "weighted"
) -> tuple[np.ndarray, np.ndarray]:
    """(scores (N, E), best_rank (N, E)): each expert's Top-k score and its best-ranked Top-k class.

    best_rank[n, e] is the rank (0 = top-1) of the best Top-k class expert e holds, k if none.
    """
    p = _as_probs(probs)
    m = np.asarray(membership).astype(bool)
    if m.ndim != 2 or m.shape[1] != p.shape[1]:
        raise RoutingError(f"membership must be (experts, {p.shape[1]}); got {tuple(m.shape)}")
    if scoring not in SCORINGS:
        raise RoutingError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")
    return _scores(*top_k(p, k), m, scoring)


def _scores(top_p: np.ndarray, top_c: np.ndarray, m: np.ndarray, scoring: str) -> tuple[np.ndarray, np.ndarray]:
    """`expert_scores` from the Top-k already taken (sorted descending), so a caller that needs it sorts once."""
    k = top_c.shape[1]
    held = m.T[top_c]  # (N, k, E)
    weights = top_p if scoring == "weighted" else np.ones_like(top_p)
    scores = (weights[..., None] * held).sum(axis=1)
    ranks = np.arange(k).reshape(1, k, 1)
    best_rank = np.where(held, ranks, k).min(axis=1)
    return scores, best_rank


def _choose(scores: np.ndarray, best_rank: np.ndarray, k: int) -> np.ndarray:
    is_max = scores >= scores.max(axis=1, keepdims=True) - _TIE_TOLERANCE
    return np.where(is_max, best_rank, k + 1).argmin(axis=1).astype(np.int64)


def choose_expert(probs: np.ndarray, membership: np.ndarray, k: int, scoring: str = "weighted") -> np.ndarray:
    """Index (N,) of the expert with the highest Top-k score, ties as documented above."""
    return _choose(*expert_scores(probs, membership, k, scoring), k)


NO_SECOND = -1  # RouteDecision.second where a sample asks one expert


def _runner_up(scores: np.ndarray, best_rank: np.ndarray, k: int, first: np.ndarray, within: float) -> np.ndarray:
    n = len(first)
    if within <= 0.0 or scores.shape[1] < 2:
        return np.full(n, NO_SECOND, dtype=np.int64)
    rows = np.arange(n)
    others = scores.astype(np.float64)
    others[rows, first] = -np.inf
    second = _choose(others, best_rank, k)
    close = (others[rows, second] > 0) & (others[rows, second] >= (1.0 - within) * scores[rows, first] - _TIE_TOLERANCE)
    return np.where(close, second, NO_SECOND).astype(np.int64)


def choose_experts(
    probs: np.ndarray, membership: np.ndarray, k: int, scoring: str = "weighted", second_within: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """(first (N,), second (N,)): the expert `choose_expert` picks, and the runner-up to ask as well where its
    score is within `second_within` of the first's (NO_SECOND elsewhere; module docstring)."""
    scores, best_rank = expert_scores(probs, membership, k, scoring)
    first = _choose(scores, best_rank, k)
    return first, _runner_up(scores, best_rank, k, first, second_within)


@dataclass(frozen=True)
class RouteDecision:
    offload: np.ndarray  # (N,) bool
    expert: np.ndarray  # (N,) int64: the chosen expert (computed for every sample)
    topk_classes: np.ndarray  # (N, k) int64
    topk_probs: np.ndarray  # (N, k)
    stat: np.ndarray  # (N,) the gate's statistic, compared with τ
    second: np.ndarray  # (N,) int64: the runner-up expert an offloaded sample also asks, NO_SECOND if none


class Router:
    """The gate and the Top-k expert choice at one operating point (`RoutingConfig`, validated once)."""

    def __init__(
        self,
        membership: np.ndarray,
        point: RoutingConfig | None = None,
        deferral: DeferralGate | None = None,
    ) -> None:
        point = point or RoutingConfig()
        if not isinstance(point, RoutingConfig):
            raise RoutingError(f"the operating point must be a RoutingConfig; got {type(point).__name__}")
        m = np.asarray(membership).astype(bool)
        if m.ndim != 2 or m.shape[0] < 1:
            raise RoutingError(f"membership must be a non-empty (experts, classes) matrix; got {tuple(m.shape)}")
        if not bool(m.any(axis=0).all()):
            raise RoutingError("membership leaves some classes without an expert")
        gate, k, scoring = point.gate, point.top_k, point.scoring
        _check_k(k, m.shape[1])
        if gate == LEARNED:
            if deferral is None:
                raise RoutingError("gate 'learned' needs its fitted deferral gate; run `askexpert evaluate` to fit it")
            if (deferral.k, deferral.scoring) != (k, scoring):
                raise RoutingError(
                    f"the deferral gate was fitted for k={deferral.k}, {deferral.scoring} scoring; "
                    f"the router asks k={k}, {scoring}"
                )
        self.deferral = deferral if gate == LEARNED else None
        self.membership = m
        self.point = point

    def at(self, point: RoutingConfig) -> Router:
        """The same experts and fitted gate at another operating point (a new Router, validated anew)."""
        return Router(self.membership, point, self.deferral)

    @property
    def gate(self) -> Gate:
        return cast(Gate, self.point.gate)

    @property
    def tau(self) -> float:
        return self.point.tau

    @property
    def k(self) -> int:
        return self.point.top_k

    @property
    def scoring(self) -> Scoring:
        return cast(Scoring, self.point.scoring)

    @property
    def num_experts(self) -> int:
        return int(self.membership.shape[0])

    def __call__(self, probs: np.ndarray) -> RouteDecision:
        p = _as_probs(probs)
        if p.shape[1] != self.membership.shape[1]:
            raise RoutingError(
                f"generalist gives {p.shape[1]} classes but the partition has {self.membership.shape[1]}"
            )
        top_p, top_c = top_k(p, self.k)  # sorted once: for the expert's score and for the decision
        scores, best_rank = _scores(top_p, top_c, self.membership, self.scoring)
        expert = _choose(scores, best_rank, self.k)
        second = _runner_up(scores, best_rank, self.k, expert, self.point.second_within)
        if self.deferral is not None:
            stat = self.deferral.score(p.astype(np.float64), self.membership, expert)
        else:
            stat = uncertainty(p, self.gate)
        offload = gate_offloads(stat, self.gate, self.tau)
        return RouteDecision(offload, expert, top_c, top_p, stat, second)


def system_router(system: SystemDir, part: Partition | None = None) -> Router:
    """The config's operating point as a Router; `gate: learned` loads the fitted gate and refuses a stale one."""
    cfg = system.config()
    rc = cfg.routing
    part = part or system.partition()
    deferral = None
    if rc.gate == LEARNED:
        path = system.deferral_gate_path
        deferral = DeferralGate.from_json(path)
        deferral.check(gate_fingerprint(system, cfg.serving.schedule), rc.top_k, rc.scoring, origin=str(path))
    return Router(part.membership(), rc, deferral)
