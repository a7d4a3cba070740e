"""Every gate's statistic on a cache, and the learned gate's fit (scikit-learn) on held-out outputs.

Why cross-fitting: the models trained on the train split, so their outputs there are
over-confident and useless for learning when the expert helps; validation is the only
held-out split, and τ (with k and the rule) is also chosen on it. So the gate's
validation statistic is *out-of-fold*: each fifth of validation is scored by a gate
fitted on the other four, and τ is chosen on outputs the gate never fitted. The gate
the edge uses (and the test split is scored with) is fitted on all of validation.
Targets use the `replace` rule (what the routed expert's own answer would do).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from askexpert.deferral import DeferralGate, edge_features, gate_fingerprint, outcome_labels
from askexpert.evaluate.cache import LogitCache, ScheduleOutputs
from askexpert.evaluate.metrics import GateStats, routed_experts
from askexpert.system import SystemDir

FOLDS = 5
REGULARISATION = 1.0  # scikit-learn's C, on standardised features


def _design(
    cache: LogitCache, outputs: ScheduleOutputs, k: int, scoring: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, outcomes and the routed expert of every sample of `cache`."""
    expert = routed_experts(cache, k, scoring)
    x = edge_features(cache.gen_probs, cache.partition.membership(), expert)
    answer = outputs.labels[expert, np.arange(len(cache.labels))]
    return x, outcome_labels(cache.gen_pred, answer, cache.labels), expert


def _fit(x: np.ndarray, y: np.ndarray, k: int, scoring: str, fitted_on: str) -> DeferralGate:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    classes = np.unique(y)
    info = {"samples": int(len(y)), "counts": {int(c): int((y == c).sum()) for c in classes}, "C": REGULARISATION}
    if len(classes) == 1:  # nothing to learn: a constant gate
        zeros = np.zeros((1, x.shape[1]))
        return DeferralGate(k, scoring, fitted_on, scaler.mean_, scale, zeros, np.zeros(1), (int(classes[0]),), info)
    clf = LogisticRegression(C=REGULARISATION, max_iter=2000).fit((x - scaler.mean_) / scale, y)
    outcomes = tuple(int(c) for c in clf.classes_)
    return DeferralGate(k, scoring, fitted_on, scaler.mean_, scale, clf.coef_, clf.intercept_, outcomes, info)


def fit_gate(cache: LogitCache, outputs: ScheduleOutputs, k: int, scoring: str, fitted_on: str) -> DeferralGate:
    """The deferral gate fitted on every sample of `cache` (the validation split)."""
    x, y, _ = _design(cache, outputs, k, scoring)
    return _fit(x, y, k, scoring, fitted_on)


def cross_fit_scores(
    cache: LogitCache, outputs: ScheduleOutputs, k: int, scoring: str, folds: int = FOLDS, seed: int = 0
) -> np.ndarray:
    """Out-of-fold gate scores: each sample scored by a gate that never saw it."""
    return _cross_fit(cache, *_design(cache, outputs, k, scoring), k, scoring, folds, seed)


def _cross_fit(
    cache: LogitCache,
    x: np.ndarray,
    y: np.ndarray,
    expert: np.ndarray,
    k: int,
    scoring: str,
    folds: int = FOLDS,
    seed: int = 0,
) -> np.ndarray:
    from sklearn.model_selection import KFold

    membership = cache.partition.membership()
    out = np.empty(len(y))
    for fit_rows, score_rows in KFold(min(folds, len(y)), shuffle=True, random_state=seed).split(x):
        gate = _fit(x[fit_rows], y[fit_rows], k, scoring, "cross-fit")
        out[score_rows] = gate.score(cache.gen_probs[score_rows], membership, expert[score_rows])
    return out


def learned_stats(
    system: SystemDir, test: LogitCache, val: LogitCache, ks: Sequence[int], scoring: str
) -> tuple[GateStats, GateStats, dict[tuple[str, int], DeferralGate]]:
    """Both caches' statistics with the learned gate added: out-of-fold on validation, the full fit on test."""
    test_stats, val_stats = GateStats.of(test), GateStats.of(val)
    gates: dict[tuple[str, int], DeferralGate] = {}
    membership = test.partition.membership()
    test_experts = {k: routed_experts(test, k, scoring) for k in ks}  # routing does not depend on the schedule
    for schedule in test.schedules:
        fitted_on = gate_fingerprint(system, schedule)
        for k in ks:
            x, y, expert = _design(val, val.schedules[schedule], k, scoring)  # once for the fit and the cross-fit
            gate = _fit(x, y, k, scoring, fitted_on)
            gates[(schedule, k)] = gate
            val_stats.learned[(schedule, k)] = _cross_fit(val, x, y, expert, k, scoring)
            test_stats.learned[(schedule, k)] = gate.score(test.gen_probs, membership, test_experts[k])
    return test_stats, val_stats, gates
