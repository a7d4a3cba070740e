"""The learned deferral gate: predicts, from what the edge already has, what asking the routed expert gains.

Confidence gates (max_prob, margin, entropy) threshold the generalist's own certainty,
which fails when the downstream models are specialists (Jitkrittum et al., NeurIPS
2023): a sample the generalist is unsure of is often one the routed expert gets wrong
too. This gate is a multinomial logistic model over three outcomes of asking the
routed expert (it *breaks* a right answer, changes nothing, *fixes* a wrong one),
fitted on held-out outputs (`evaluate/gates.py`, scikit-learn). Its score is the
expected gain mapped onto 0…1, (1 + P(fix) − P(break)) / 2, and it offloads above τ.

Its second form, the *expected gain*, needs no model: a table of what each expert
knows per class, Q[e, c] (the share of held-out images of class c routed to e that it
answers right), turns the generalist's distribution into the expected accuracy of the
routed expert on this sample, Σ_c p(c)·Q[e, c], and the score is that minus the
generalist's own, max p, mapped onto 0…1 the same way. `askexpert evaluate` fits both
and keeps, per schedule and k, the one that validation says pays.

Scoring is numpy only, so the live edge, the cached evaluation and the testbed share
this one implementation. The file holds plain numbers (JSON) and the fingerprint of
the models it was fitted on: a gate fitted on other models is refused, as a stale
checkpoint is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from askexpert.errors import CheckpointError, RoutingError
from askexpert.fingerprint import fingerprint
from askexpert.models.meta import read_meta
from askexpert.protocol import final_labels
from askexpert.system import SystemDir

FORMAT = "askexpert-deferral-gate/1"
FORMAT_COMPETENCE = "askexpert-deferral-gate/2"  # /1 plus the competence table: an older reader refuses it
BREAK, SAME, FIX = 0, 1, 2
TOP = 10  # sorted probabilities kept as features


def edge_features(probs: np.ndarray, membership: np.ndarray, expert: np.ndarray) -> np.ndarray:
    """(N, F) what the edge has before any offload: its sorted probabilities (and their logs), normalised
    entropy, margin, every expert's subset mass (as is and sorted) and which expert the router picked."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise RoutingError(f"probabilities must be (N, C); got shape {p.shape}")
    m = np.asarray(membership, dtype=np.float64)
    if m.ndim != 2 or m.shape[1] != p.shape[1]:
        raise RoutingError(f"membership must be (experts, {p.shape[1]}); got {m.shape}")
    n, c = p.shape
    top = -np.sort(-p, axis=1)[:, :TOP]
    if c < TOP:
        top = np.hstack([top, np.zeros((n, TOP - c))])
    entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1, keepdims=True) / np.log(max(2, c))
    mass = p @ m.T  # (N, E)
    routed = np.eye(m.shape[0])[np.asarray(expert, dtype=np.int64)]
    return np.hstack(
        [
            top,
            np.log(top[:, :5] + 1e-9),
            entropy,
            top[:, :1] - top[:, 1:2],
            mass,
            -np.sort(-mass, axis=1),
            routed,
            (routed * mass).sum(axis=1, keepdims=True),
        ]
    )


def outcome_labels(gen_pred: np.ndarray, expert_answer: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """BREAK, SAME or FIX per sample: what replacing the generalist's answer with the expert's would do.

    An "other" answer falls back to the generalist (the protocol's one rule), so it never breaks or fixes.
    """
    gen_right = gen_pred == labels
    final_right = final_labels(gen_pred, expert_answer, np.ones(len(labels), dtype=bool))[0] == labels
    out = np.full(len(labels), SAME, dtype=np.int64)
    out[~gen_right & final_right] = FIX
    out[gen_right & ~final_right] = BREAK
    return out


@dataclass(frozen=True)
class DeferralGate:
    """A fitted gate: standardisation and a linear model per outcome, for routing at (k, scoring)."""

    k: int
    scoring: str
    fitted_on: str  # fingerprint of the generalist, partition and expert set (`gate_fingerprint`)
    mean: np.ndarray  # (F,)
    scale: np.ndarray  # (F,)
    coef: np.ndarray  # (O, F), one row per outcome in `outcomes` (one row when fewer than 3 were seen)
    intercept: np.ndarray  # (O,)
    outcomes: tuple[int, ...]  # which of BREAK, SAME, FIX the rows are (a class absent from the fit has no row)
    info: dict[str, Any] = field(default_factory=dict)
    competence: np.ndarray | None = None  # (E, C): the expected-gain form (then the linear model is empty)

    @classmethod
    def expected_gain(
        cls, k: int, scoring: str, fitted_on: str, competence: np.ndarray, info: dict[str, Any] | None = None
    ) -> DeferralGate:
        """The model-free form: Q[e, c], what expert e answers right of class c (`evaluate.gates.competence`)."""
        empty = np.zeros(0)
        return cls(k, scoring, fitted_on, empty, empty, np.zeros((1, 0)), np.zeros(1), (SAME,), info or {}, competence)

    @property
    def form(self) -> str:
        return "logistic" if self.competence is None else "expected_gain"

    def __post_init__(self) -> None:
        # one memory layout however the gate was made (scikit-learn's coef_ is Fortran-ordered, a loaded one is
        # not): BLAS may sum in another order for another layout, and the live edge, the cache and a reloaded
        # gate must score bit-identically
        for name in ("mean", "scale", "coef", "intercept"):
            object.__setattr__(self, name, np.ascontiguousarray(getattr(self, name), dtype=np.float64))
        f = self.mean.shape[0]
        rows = 3 if len(self.outcomes) == 3 else 1  # scikit-learn: one row for a binary fit
        if self.scale.shape != (f,) or self.coef.shape != (rows, f) or not np.all(self.scale > 0):
            raise RoutingError(f"deferral gate: inconsistent shapes {self.mean.shape}, {self.coef.shape}")
        if self.intercept.shape != (rows,) or not set(self.outcomes) <= {BREAK, SAME, FIX}:
            raise RoutingError(f"deferral gate: outcomes {self.outcomes} do not match the intercepts")
        if self.competence is not None:
            q = np.ascontiguousarray(self.competence, dtype=np.float64)
            object.__setattr__(self, "competence", q)
            if q.ndim != 2 or not np.all((q >= 0) & (q <= 1)):
                raise RoutingError(f"deferral gate: competence must be (experts, classes) in 0…1; got shape {q.shape}")

    def outcome_probs(self, features: np.ndarray) -> np.ndarray:
        """(N, 3) P(break), P(same), P(fix)."""
        if features.ndim != 2 or features.shape[1] != self.mean.shape[0]:
            raise RoutingError(f"deferral gate takes {self.mean.shape[0]} features; got shape {features.shape}")
        z = (features - self.mean) / self.scale
        if len(self.outcomes) == 1:
            out = np.zeros((len(z), 3))
            out[:, self.outcomes[0]] = 1.0
            return out
        if len(self.outcomes) == 2:  # binary: scikit-learn keeps one row, for the second class
            logit = z @ self.coef[-1] + self.intercept[-1]
            second = 1.0 / (1.0 + np.exp(-logit))
            cols = np.stack([1.0 - second, second], axis=1)
        else:
            logits = z @ self.coef.T + self.intercept
            logits -= logits.max(axis=1, keepdims=True)
            cols = np.exp(logits)
            cols /= cols.sum(axis=1, keepdims=True)
        out = np.zeros((len(z), 3))
        out[:, list(self.outcomes)] = cols
        return out

    def score(self, probs: np.ndarray, membership: np.ndarray, expert: np.ndarray) -> np.ndarray:
        """(N,) expected gain of asking the routed expert, mapped onto 0…1 (0.5: no gain expected)."""
        if self.competence is not None:
            p = np.asarray(probs, dtype=np.float64)
            q = self.competence
            if p.ndim != 2 or q.shape != (np.shape(membership)[0], p.shape[1]):
                raise RoutingError(
                    f"deferral gate: competence of shape {q.shape} does not fit {np.shape(membership)[0]} experts "
                    f"and probabilities of shape {p.shape}"
                )
            routed = np.asarray(expert, dtype=np.int64)
            gain = np.einsum("nc,nc->n", p, q[routed]) - p.max(axis=1)
            return (1.0 + gain) / 2.0
        o = self.outcome_probs(edge_features(probs, membership, expert))
        return (1.0 + o[:, FIX] - o[:, BREAK]) / 2.0

    def check(self, fitted_on: str, k: int, scoring: str, origin: str = "deferral gate") -> None:
        """Refuse a gate fitted on other models or for another routing (one line, naming the fix)."""
        if self.fitted_on != fitted_on:
            raise CheckpointError(
                f"{origin} was fitted on other models ({self.fitted_on}, now {fitted_on}); "
                "refit it with `askexpert evaluate`"
            )
        if (self.k, self.scoring) != (k, scoring):
            raise CheckpointError(
                f"{origin} was fitted for k={self.k}, {self.scoring} scoring, but routing asks k={k}, {scoring}; "
                "refit it with `askexpert evaluate`"
            )

    def to_json(self, path: str | Path) -> None:
        data = {
            "format": FORMAT if self.competence is None else FORMAT_COMPETENCE,
            "k": self.k,
            "scoring": self.scoring,
            "fitted_on": self.fitted_on,
            "outcomes": list(self.outcomes),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "coef": self.coef.tolist(),
            "intercept": self.intercept.tolist(),
            "info": self.info,
        }
        if self.competence is not None:
            data["competence"] = self.competence.tolist()
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)

    @classmethod
    def from_json(cls, path: str | Path) -> DeferralGate:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"deferral gate not found: {path}; fit it with `askexpert evaluate`")
        try:
            data = json.loads(path.read_text())
            if data.get("format") not in (FORMAT, FORMAT_COMPETENCE):
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r} or {FORMAT_COMPETENCE!r}")
            table = data.get("competence") if data["format"] == FORMAT_COMPETENCE else None
            if data["format"] == FORMAT_COMPETENCE and table is None:
                raise ValueError("no competence table")
            return cls(
                k=int(data["k"]),
                scoring=str(data["scoring"]),
                fitted_on=str(data["fitted_on"]),
                mean=np.asarray(data["mean"], dtype=np.float64),
                scale=np.asarray(data["scale"], dtype=np.float64),
                coef=np.atleast_2d(np.asarray(data["coef"], dtype=np.float64)),
                intercept=np.asarray(data["intercept"], dtype=np.float64),
                outcomes=tuple(int(o) for o in data["outcomes"]),
                info=dict(data.get("info", {})),
                competence=np.asarray(table, dtype=np.float64) if table is not None else None,
            )
        except (ValueError, KeyError, TypeError, AttributeError, RoutingError) as exc:
            raise CheckpointError(f"{path}: not a deferral gate file: {exc}") from None


def gate_fingerprint(system: SystemDir, schedule: str) -> str:
    """What a deferral gate depends on: the generalist, the partition and the served schedule's experts."""
    part = system.partition()
    shas = [system.generalist_meta().sha256]
    shas += [read_meta(system.expert_path(schedule, e)).sha256 for e in part.expert_ids]
    runtime = system.config().serving.expert_runtime()  # the outputs it was fitted on depend on how experts run
    return fingerprint("deferral/1", shas, [list(s) for s in part.subsets], *runtime)
