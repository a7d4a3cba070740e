"""The Router: decide *whether* to ask an expert (gate) and *which one* (Top-k scoring).

Pure, batched tensor ops: no per-sample Python loop, so routing costs a tiny
fraction of the generalist's forward pass and the same code serves the live
classifier and the cached-logit sweeps.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, TypeVar, cast

import numpy as np
import torch

from askexpert.config import RoutingConfig
from askexpert.deferral import DeferralGate
from askexpert.errors import RoutingError

Gate = Literal["max_prob", "margin", "entropy", "learned"]
Scoring = Literal["weighted", "count"]
GATES: tuple[str, ...] = ("max_prob", "margin", "entropy")  # the confidence gates: a statistic of p alone
LEARNED = "learned"
ALL_GATES: tuple[str, ...] = (*GATES, LEARNED)
SCORINGS: tuple[str, ...] = ("weighted", "count")
_TIE_TOLERANCE = 1e-6


def _check_probs(probs: torch.Tensor) -> None:
    if probs.ndim != 2 or probs.shape[1] < 1:
        raise RoutingError(f"probabilities must be (N, C); got shape {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise RoutingError(f"probabilities must be floating point; got {probs.dtype}")


def uncertainty(probs: torch.Tensor, gate: str) -> torch.Tensor:
    """The per-sample statistic the gate compares with τ."""
    _check_probs(probs)
    if gate == "max_prob":
        return probs.max(dim=1).values
    if gate == "margin":
        if probs.shape[1] < 2:
            return torch.ones(probs.shape[0], dtype=probs.dtype, device=probs.device)
        top2 = probs.topk(2, dim=1).values
        return top2[:, 0] - top2[:, 1]
    if gate == "entropy":
        ent = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=1)
        return ent / math.log(max(2, probs.shape[1]))
    if gate == LEARNED:
        raise RoutingError("the learned gate scores with its fitted model: give the Router its DeferralGate")
    raise RoutingError(f"unknown gate {gate!r}; choose one of {', '.join(ALL_GATES)}")


T = TypeVar("T", torch.Tensor, np.ndarray)


def gate_offloads(stat: T, gate: str, tau: T | float) -> T:
    """The gate's one comparison: entropy and learned offload above τ, max_prob and margin below it.

    Works on tensors and numpy arrays alike and broadcasts, so the live router and
    the cached sweeps (many τ at once) share it.
    """
    if gate not in ALL_GATES:
        raise RoutingError(f"unknown gate {gate!r}; choose one of {', '.join(ALL_GATES)}")
    out: T = stat > tau if gate in ("entropy", LEARNED) else stat < tau
    return out


def offload_mask(probs: torch.Tensor, gate: str, tau: float) -> torch.Tensor:
    """True where the sample should go to an expert."""
    return gate_offloads(uncertainty(probs, gate), gate, tau)


def _check_k(k: int, num_classes: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise RoutingError(f"top_k must be an integer ≥ 1; got {k!r}")
    if k > num_classes:
        raise RoutingError(f"top_k={k} exceeds the number of classes ({num_classes})")


def expert_scores(
    probs: torch.Tensor, membership: torch.Tensor, k: int, scoring: str = "weighted"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (N, E), best_rank (N, E)): each expert's Top-k score and its best-ranked Top-k class.

    best_rank[n, e] is the rank (0 = top-1) of the best Top-k class expert e holds, k if none.
    """
    _check_probs(probs)
    if membership.ndim != 2 or membership.shape[1] != probs.shape[1]:
        raise RoutingError(f"membership must be (experts, {probs.shape[1]}); got {tuple(membership.shape)}")
    if scoring not in SCORINGS:
        raise RoutingError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")
    _check_k(k, probs.shape[1])
    top_p, top_c = probs.topk(k, dim=1)  # (N, k), sorted descending
    held = membership.to(probs.device).T[top_c]  # (N, k, E)
    weights = top_p if scoring == "weighted" else torch.ones_like(top_p)
    scores = (weights.unsqueeze(-1) * held).sum(dim=1)
    ranks = torch.arange(k, device=probs.device).view(1, k, 1).expand_as(held)
    best_rank = torch.where(held, ranks, torch.full_like(ranks, k)).min(dim=1).values
    return scores, best_rank


def choose_expert(probs: torch.Tensor, membership: torch.Tensor, k: int, scoring: str = "weighted") -> torch.Tensor:
    """Index (N,) of the expert with the highest Top-k score, ties as documented above."""
    scores, best_rank = expert_scores(probs, membership, k, scoring)
    is_max = scores >= scores.max(dim=1, keepdim=True).values - _TIE_TOLERANCE
    candidate_rank = torch.where(is_max, best_rank, torch.full_like(best_rank, k + 1))
    return candidate_rank.argmin(dim=1)


@dataclass(frozen=True)
class RouteDecision:
    offload: torch.Tensor  # (N,) bool
    expert: torch.Tensor  # (N,) long: the chosen expert (computed for every sample)
    topk_classes: torch.Tensor  # (N, k) long
    topk_probs: torch.Tensor  # (N, k)
    stat: torch.Tensor  # (N,) the gate's statistic, compared with τ


class Router:
    """The gate and the Top-k expert choice at one operating point (`RoutingConfig`, validated once)."""

    def __init__(
        self,
        membership: np.ndarray | torch.Tensor,
        point: RoutingConfig | None = None,
        deferral: DeferralGate | None = None,
    ) -> None:
        point = point or RoutingConfig()
        if not isinstance(point, RoutingConfig):
            raise RoutingError(f"the operating point must be a RoutingConfig; got {type(point).__name__}")
        m = torch.as_tensor(np.asarray(membership)).bool()
        if m.ndim != 2 or m.shape[0] < 1:
            raise RoutingError(f"membership must be a non-empty (experts, classes) matrix; got {tuple(m.shape)}")
        if not bool(m.any(dim=0).all()):
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

    def __call__(self, probs: torch.Tensor) -> RouteDecision:
        if probs.ndim == 2 and probs.shape[1] != self.membership.shape[1]:
            raise RoutingError(
                f"generalist gives {probs.shape[1]} classes but the partition has {self.membership.shape[1]}"
            )
        expert = choose_expert(probs, self.membership, self.k, self.scoring)
        if self.deferral is not None:
            score = self.deferral.score(probs.double().numpy(), self.membership.numpy(), expert.numpy())
            stat = torch.from_numpy(score)
        else:
            stat = uncertainty(probs, self.gate)
        offload = gate_offloads(stat, self.gate, self.tau)
        top_p, top_c = probs.topk(self.k, dim=1)
        return RouteDecision(offload, expert, top_c, top_p, stat)
