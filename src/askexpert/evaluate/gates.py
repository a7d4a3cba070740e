"""Every gate's statistic on a cache, and the learned gate's fit (scikit-learn) on held-out outputs.

Why cross-fitting: the models trained on the train split, so their outputs there are
over-confident and useless for learning when the expert helps; validation is the only
held-out split, and τ (with k and the rule) is also chosen on it. So the gate's
validation statistic is *out-of-fold*: each fifth of validation is scored by a gate
fitted on the other four, and τ is chosen on outputs the gate never fitted. The gate
the edge uses (and the test split is scored with) is fitted on all of validation.
Targets use the `replace` rule (what the routed expert's own answer would do).

Two forms are fitted (`askexpert.deferral`): the logistic model over the edge's features,
and the expected gain from a per-class competence table. Per schedule and k the one whose
out-of-fold scores give the higher mean validation accuracy over offload rates 5 … 95 %
is kept: the gate decides how much the system pays for its accuracy, so it is judged
over the whole range of offloads rather than at one point.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from askexpert.deferral import BREAK, FIX, DeferralGate, edge_features, gate_fingerprint, outcome_labels
from askexpert.evaluate.cache import LogitCache, ScheduleOutputs
from askexpert.evaluate.metrics import GateStats, routed_experts
from askexpert.system import SystemDir

FOLDS = 5
REGULARISATION = 1.0  # scikit-learn's C, on standardised features
COMPETENCE_PRIOR = 5.0  # images' worth of the expert's mean accuracy on its own classes, per (expert, class) cell
CURVE_RATES = np.linspace(0.05, 0.95, 19)  # the offload rates a form is judged over (mean accuracy)
FORMS = ("logistic", "expected_gain")


class _Design(NamedTuple):
    """What both forms are fitted from, per sample of a cache: computed once for the fits and the cross-fits."""

    x: np.ndarray  # the edge's features (`edge_features`)
    outcomes: np.ndarray  # BREAK / SAME / FIX under `replace`
    expert: np.ndarray  # the routed expert
    right: np.ndarray  # whether the routed expert's answer is right


def _design(cache: LogitCache, outputs: ScheduleOutputs, k: int, scoring: str) -> _Design:
    expert = routed_experts(cache, k, scoring)
    x = edge_features(cache.gen_probs, cache.partition.membership(), expert)
    answer = outputs.labels[expert, np.arange(len(cache.labels))]
    return _Design(x, outcome_labels(cache.gen_pred, answer, cache.labels), expert, answer == cache.labels)


def competence(
    expert: np.ndarray, right: np.ndarray, labels: np.ndarray, membership: np.ndarray, prior: float = COMPETENCE_PRIOR
) -> np.ndarray:
    """Q (E, C): of the images of class c routed to expert e, the share it answers right ("other" is not right),
    smoothed towards the expert's mean over its own classes (0 outside them) with `prior` images' weight."""
    m = np.asarray(membership, dtype=np.float64)
    hits, counts = np.zeros(m.shape), np.zeros(m.shape)
    np.add.at(hits, (expert, labels), right.astype(np.float64))
    np.add.at(counts, (expert, labels), 1.0)
    own = np.where(m > 0, 1.0, 0.0)
    mean = (hits * own).sum(axis=1) / np.maximum(1.0, (counts * own).sum(axis=1))
    return np.clip((hits + prior * own * mean[:, None]) / (counts + prior), 0.0, 1.0)


def curve_mean(score: np.ndarray, y: np.ndarray) -> float:
    """Mean gain in accuracy over CURVE_RATES when the highest scores are offloaded (`replace` outcomes)."""
    delta = np.select([y == FIX, y == BREAK], [1.0, -1.0], 0.0)[np.argsort(-score, kind="stable")]
    gained = np.concatenate([[0.0], np.cumsum(delta)]) / len(y)
    return float(gained[np.round(CURVE_RATES * len(y)).astype(int)].mean())


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


def _fit_form(
    form: str, cache: LogitCache, design: _Design, rows: np.ndarray, k: int, scoring: str, fp: str
) -> DeferralGate:
    if form == "logistic":
        return _fit(design.x[rows], design.outcomes[rows], k, scoring, fp)
    table = competence(design.expert[rows], design.right[rows], cache.labels[rows], cache.partition.membership())
    return DeferralGate.expected_gain(k, scoring, fp, table, {"samples": int(len(rows)), "prior": COMPETENCE_PRIOR})


def fit_gate(
    cache: LogitCache, outputs: ScheduleOutputs, k: int, scoring: str, fitted_on: str, form: str = "logistic"
) -> DeferralGate:
    """The deferral gate of one form fitted on every sample of `cache` (the validation split)."""
    design = _design(cache, outputs, k, scoring)
    return _fit_form(form, cache, design, np.arange(len(cache.labels)), k, scoring, fitted_on)


def cross_fit_scores(
    cache: LogitCache,
    outputs: ScheduleOutputs,
    k: int,
    scoring: str,
    folds: int = FOLDS,
    seed: int = 0,
    form: str = "logistic",
) -> np.ndarray:
    """Out-of-fold gate scores: each sample scored by a gate that never saw it."""
    return _cross_fit(cache, _design(cache, outputs, k, scoring), k, scoring, form, folds, seed)


def _cross_fit(
    cache: LogitCache,
    design: _Design,
    k: int,
    scoring: str,
    form: str,
    folds: int = FOLDS,
    seed: int = 0,
) -> np.ndarray:
    from sklearn.model_selection import KFold

    membership = cache.partition.membership()
    expert = design.expert
    out = np.empty(len(expert))
    for fit_rows, score_rows in KFold(min(folds, len(expert)), shuffle=True, random_state=seed).split(expert):
        gate = _fit_form(form, cache, design, fit_rows, k, scoring, "cross-fit")
        out[score_rows] = gate.score(cache.gen_probs[score_rows], membership, expert[score_rows])
    return out


def _fit_chosen(
    val: LogitCache, outputs: ScheduleOutputs, k: int, scoring: str, fitted_on: str
) -> tuple[DeferralGate, np.ndarray]:
    """The form validation prefers (out-of-fold), fitted on all of `val`, and that form's out-of-fold scores."""
    design = _design(val, outputs, k, scoring)  # once for the fits and the cross-fits
    oof = {form: _cross_fit(val, design, k, scoring, form) for form in FORMS}
    judged = {form: curve_mean(scores, design.outcomes) for form, scores in oof.items()}
    form = max(FORMS, key=lambda f: judged[f])  # ties: the first, the logistic model
    gate = _fit_form(form, val, design, np.arange(len(val.labels)), k, scoring, fitted_on)
    gate.info["validation_mean_gain"] = judged  # what chose the form: out-of-fold accuracy gained, mean over rates
    return gate, oof[form]


def fit_chosen_gate(val: LogitCache, outputs: ScheduleOutputs, k: int, scoring: str, fitted_on: str) -> DeferralGate:
    """The gate `askexpert evaluate` stores: the form validation prefers, fitted on all of validation."""
    return _fit_chosen(val, outputs, k, scoring, fitted_on)[0]


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
            gate, oof = _fit_chosen(val, val.schedules[schedule], k, scoring, fitted_on)
            gates[(schedule, k)] = gate
            val_stats.learned[(schedule, k)] = oof
            test_stats.learned[(schedule, k)] = gate.score(test.gen_probs, membership, test_experts[k])
    return test_stats, val_stats, gates
