"""Batch plans: which sample indices each optimizer step sees.

A plan is an int array (steps, batch). Schedules differ only in how they mix
two pools: the expert's own classes (`subset`) and everything else
(`others`, trained as the "other" class). Every schedule of an expert gets the
same number of steps and the same batch size, so static and progressive
experts have the same training budget by construction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from askexpert.config import Stage


class _Stream:
    """Endless sampling without replacement: a fresh permutation each pass."""

    def __init__(self, pool: np.ndarray, rng: np.random.Generator) -> None:
        self.pool, self.rng = pool, rng
        self.order = rng.permutation(pool)
        self.pos = 0

    def take(self, n: int) -> np.ndarray:
        out = []
        while n > 0:
            if self.pos == len(self.order):
                self.order, self.pos = self.rng.permutation(self.pool), 0
            chunk = self.order[self.pos : self.pos + n]
            self.pos += len(chunk)
            n -= len(chunk)
            out.append(chunk)
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def budget_steps(epochs: float, pool_size: int, batch_size: int) -> int:
    """Optimizer steps for `epochs` passes over `pool_size` samples."""
    return max(1, math.ceil(epochs * pool_size / batch_size))


def stage_steps(stages: Sequence[Stage], total: int) -> list[int]:
    """Split `total` steps by stage fractions; rounding error goes to the last stage."""
    steps = [int(round(s.fraction * total)) for s in stages[:-1]]
    steps.append(total - sum(steps))
    if min(steps) < 0:
        raise ValueError(f"stage fractions {[s.fraction for s in stages]} do not fit {total} steps")
    return steps


def plan_schedule(
    subset: np.ndarray,
    others: np.ndarray,
    stages: Sequence[Stage],
    total_steps: int,
    batch_size: int,
    seed: int,
    routed: np.ndarray | None = None,
) -> np.ndarray:
    """The (total_steps, batch_size) plan for a schedule.

    In a stage with `subset_share = s`, each batch holds round(s·batch) subset
    samples and the rest from `others` (or from `routed`, the out-of-subset
    samples the router sends to this expert, in stages with `others: routed`,
    when there are at least a batch of them); `None` samples the union uniformly.
    """
    rng = np.random.default_rng(seed)
    union = np.concatenate([subset, others])
    use_routed = routed is not None and len(routed) >= batch_size
    streams = {
        "subset": _Stream(subset, rng),
        "others": _Stream(others, rng),
        "union": _Stream(union, rng),
        "routed": _Stream(routed if use_routed and routed is not None else others, rng),
    }
    batch_size = min(batch_size, len(union))
    plan = np.empty((total_steps, batch_size), dtype=np.int64)
    row = 0
    for stage, n_steps in zip(stages, stage_steps(stages, total_steps), strict=True):
        share = stage.subset_share
        if share is not None and len(others) == 0:
            share = 1.0
        for _ in range(n_steps):
            if share is None:
                plan[row] = streams["union"].take(batch_size)
            else:
                n_in = int(round(share * batch_size))
                plan[row, :n_in] = streams["subset"].take(n_in)
                pool = "routed" if stage.others == "routed" and use_routed else "others"
                plan[row, n_in:] = streams[pool].take(batch_size - n_in)
            row += 1
    return plan


def expert_targets(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Global labels → expert outputs: position in `classes`, or len(classes) for "other"."""
    lookup = np.full(int(max(labels.max(initial=0), max(classes)) + 1), len(classes), dtype=np.int64)
    lookup[np.asarray(classes)] = np.arange(len(classes))
    return lookup[labels]
