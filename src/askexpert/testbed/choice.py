"""The served system's accuracy on the validation split, for the choices the testbed and calibrate make.

Accuracy and offload rate at any τ come from the cached validation outputs of the
served schedule, answered with the config's gate, k, scoring and combination rule
(the rules the live edge applies): the test split is never read for a choice. The learned
gate's validation statistic is out-of-fold (`evaluate.gates`), as when `evaluate` chose τ.
The testbed's headline τ is chosen here (`parity_tau`): the lowest offload rate
whose validation accuracy reaches edge execution's, as the paper's comparison asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from askexpert.config import RoutingConfig
from askexpert.deferral import DeferralGate
from askexpert.errors import ConfigError
from askexpert.evaluate.cache import LogitCache, ScheduleOutputs, build_cache
from askexpert.evaluate.gates import cross_fit_scores
from askexpert.evaluate.metrics import (
    PARITY_GRID_POINTS,
    SecondExpert,
    expert_labels,
    gate_statistic,
    offload_masks,
    outcomes,
    point_second,
    routed_experts,
)
from askexpert.routing import LEARNED
from askexpert.system import SystemDir


@dataclass(frozen=True)
class ValidationView:
    """The served schedule's validation outputs under the config's gate and combination rule."""

    cache: LogitCache
    outputs: ScheduleOutputs
    # the config's operating point: gate, scoring, k (the learned gate's statistic holds for it alone),
    # rule and second expert
    point: RoutingConfig
    answers: np.ndarray  # (E, N) every expert's answer under the combination rule
    stat: np.ndarray  # (N,) the gate's statistic

    @classmethod
    def of(cls, system: SystemDir) -> ValidationView:
        cfg = system.config()
        rc, schedule = cfg.routing, cfg.serving.schedule
        cache = build_cache(system, [schedule], split="val")
        outputs = cache.schedules[schedule]
        answers = expert_labels(cache, outputs, rc.combine, rc.mix_weight)
        # the learned gate's validation scores are out-of-fold, as `evaluate` chose τ on them
        # (in the form `evaluate` chose for the stored gate)
        if rc.gate == LEARNED:
            form = DeferralGate.from_json(system.deferral_gate_path).form
            stat = cross_fit_scores(cache, outputs, rc.top_k, rc.scoring, form=form)
        else:
            stat = gate_statistic(cache, rc.gate)
        return cls(cache, outputs, rc, answers, stat)

    def second(self, k: int) -> SecondExpert | None:
        """The config's second expert (if any) at another k."""
        return point_second(self.cache, self.outputs, self.point.updated(top_k=k))

    def outcomes(self, taus: np.ndarray, k: int) -> dict[str, np.ndarray]:
        """Accuracy, offload rate, ... at every τ (arrays of len(taus))."""
        gate, fitted_k = self.point.gate, self.point.top_k
        if gate == LEARNED and k != fitted_k:
            raise ConfigError(f"the learned gate was fitted for k={fitted_k}; it cannot score routing at k={k}")
        masks = offload_masks(self.stat, gate, np.asarray(taus, dtype=np.float64))
        chosen = routed_experts(self.cache, k, self.point.scoring)
        return outcomes(self.cache, self.outputs, masks, chosen, self.answers, self.second(k))

    def edge_execution_accuracy(self, k: int) -> float:
        """Every sample answered by its routed expert(s) (edge execution, or near-edge only: the same answers)."""
        everything = np.ones((1, len(self.cache.labels)), dtype=bool)
        chosen = routed_experts(self.cache, k, self.point.scoring)
        res = outcomes(self.cache, self.outputs, everything, chosen, self.answers, self.second(k))
        return float(res["accuracy"][0])

    def spanning_taus(self, points: int) -> np.ndarray:
        """τ values whose validation offload rates spread evenly over 0…1 (quantiles of the gate statistic)."""
        return np.unique(np.round(np.quantile(self.stat, np.linspace(0.0, 1.0, points)), 4))


def parity_tau(view: ValidationView, k: int, points: int = PARITY_GRID_POINTS) -> dict[str, Any]:
    """The fastest τ (lowest validation offload rate) whose validation accuracy reaches edge execution's,
    searched on the gate table's grid (`evaluate`'s parity column), so the two agree.

    When no τ does, the most accurate one, with `eligible` False.
    """
    taus = view.spanning_taus(points)
    res = view.outcomes(taus, k)
    target = view.edge_execution_accuracy(k)
    acc, rate = res["accuracy"], res["offload_rate"]
    reach = np.flatnonzero(acc >= target)
    best = int(reach[np.argmin(rate[reach])]) if reach.size else int(np.argmax(acc))
    return {
        "tau": float(taus[best]),
        "eligible": bool(reach.size),
        "val_accuracy": float(acc[best]),
        "val_offload_rate": float(rate[best]),
        "val_edge_execution_accuracy": target,
        "val_samples": len(view.cache.labels),
    }
