"""Class → expert partitions, and the `partition.json` format.

Strategies:
* `superclass`: pack coarse groups (CIFAR-100's 20 superclasses) into E experts;
* `confusion`: cluster the generalist's held-out confusion matrix so that
  classes it mixes up share an expert (what makes Top-k routing work):
  spectral embedding of the symmetrised confusion graph (scikit-learn), then a
  *balanced* assignment of classes to cluster centres (scipy's Hungarian solver
  over capacity slots), refined a few rounds like k-means;
* `random`: a control.

`with_overlap` then lets a `confusion` partition's subsets overlap: each expert
also takes the outside classes most confused with its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from askexpert.errors import PartitionError
from askexpert.protocol import OTHER

FORMAT = "askexpert.partition/1"


@dataclass(frozen=True)
class Partition:
    """Expert `expert_ids[e]` holds global classes `subsets[e]` (ordered: output i ↔ subsets[e][i])."""

    strategy: str
    num_classes: int
    expert_ids: tuple[str, ...]
    subsets: tuple[tuple[int, ...], ...]
    seed: int = 0
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_experts(self) -> int:
        return len(self.subsets)

    def validate(self, origin: str = "partition") -> None:
        if len(self.expert_ids) != len(self.subsets):
            raise PartitionError(f"{origin}: {len(self.expert_ids)} expert ids for {len(self.subsets)} subsets")
        if len(set(self.expert_ids)) != len(self.expert_ids):
            raise PartitionError(f"{origin}: expert ids are not unique: {self.expert_ids}")
        covered = np.zeros(self.num_classes, dtype=int)
        for eid, subset in zip(self.expert_ids, self.subsets, strict=True):
            if not subset:
                raise PartitionError(f"{origin}: expert {eid!r} has no classes")
            if len(set(subset)) != len(subset):
                raise PartitionError(f"{origin}: expert {eid!r} lists a class twice")
            bad = [c for c in subset if not 0 <= c < self.num_classes]
            if bad:
                raise PartitionError(f"{origin}: expert {eid!r} has classes {bad} outside 0..{self.num_classes - 1}")
            covered[list(subset)] += 1
        missing = np.flatnonzero(covered == 0)
        if len(missing):
            raise PartitionError(f"{origin}: classes {missing.tolist()[:10]} belong to no expert")

    def membership(self) -> np.ndarray:
        """Boolean (E, C) matrix: membership[e, c] is True when expert e holds class c."""
        m = np.zeros((self.num_experts, self.num_classes), dtype=bool)
        for e, subset in enumerate(self.subsets):
            m[e, list(subset)] = True
        return m

    def output_classes(self) -> list[np.ndarray]:
        """Per expert, the global class of each output: its subset in order, then OTHER for "other"."""
        return [np.asarray([*subset, OTHER], dtype=np.int64) for subset in self.subsets]

    def index(self, expert_id: str) -> int:
        try:
            return self.expert_ids.index(expert_id)
        except ValueError:
            raise PartitionError(f"unknown expert {expert_id!r}; known: {', '.join(self.expert_ids)}") from None

    # ---- file format -------------------------------------------------------------------
    def to_json(self, path: str | Path) -> None:
        doc = {
            "format": FORMAT,
            "strategy": self.strategy,
            "num_classes": self.num_classes,
            "seed": self.seed,
            "experts": [{"id": e, "classes": list(s)} for e, s in zip(self.expert_ids, self.subsets, strict=True)],
            "stats": self.stats,
        }
        Path(path).write_text(json.dumps(doc, indent=1))

    @classmethod
    def from_json(cls, path: str | Path) -> Partition:
        path = Path(path)
        if not path.is_file():
            raise PartitionError(f"{path}: partition file not found (run `askexpert partition` first)")
        try:
            doc = json.loads(path.read_text())
            if doc.get("format") != FORMAT:
                raise PartitionError(f"{path}: format {doc.get('format')!r}, expected {FORMAT!r}")
            return cls(
                strategy=str(doc["strategy"]),
                num_classes=int(doc["num_classes"]),
                expert_ids=tuple(str(e["id"]) for e in doc["experts"]),
                subsets=tuple(tuple(int(c) for c in e["classes"]) for e in doc["experts"]),
                seed=int(doc.get("seed", 0)),
                stats=dict(doc.get("stats", {})),
            )
        except PartitionError as exc:
            raise PartitionError(str(exc).replace("partition:", f"{path}:", 1)) from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PartitionError(f"{path}: malformed partition file: {exc!r}") from None


def _ids(n: int) -> tuple[str, ...]:
    return tuple(f"e{i}" for i in range(n))


def _check_sizes(num_classes: int, num_experts: int) -> None:
    if not 1 <= num_experts <= num_classes:
        raise PartitionError(f"cannot split {num_classes} classes into {num_experts} experts")


def superclass_partition(groups: np.ndarray, num_experts: int, seed: int = 0) -> Partition:
    """Pack whole coarse groups into experts, largest first onto the least loaded expert."""
    num_classes = len(groups)
    _check_sizes(num_classes, num_experts)
    group_ids = np.unique(groups)
    if len(group_ids) < num_experts:
        raise PartitionError(f"only {len(group_ids)} coarse groups for {num_experts} experts")
    members = {int(g): np.flatnonzero(groups == g).tolist() for g in group_ids}
    order = sorted(members, key=lambda g: (-len(members[g]), g))
    bins: list[list[int]] = [[] for _ in range(num_experts)]
    for g in order:
        target = min(range(num_experts), key=lambda e: (len(bins[e]), e))
        bins[target].extend(members[g])
    return Partition("superclass", num_classes, _ids(num_experts), tuple(tuple(sorted(b)) for b in bins), seed)


def random_partition(num_classes: int, num_experts: int, seed: int = 0) -> Partition:
    _check_sizes(num_classes, num_experts)
    perm = np.random.default_rng(seed).permutation(num_classes)
    parts = np.array_split(perm, num_experts)
    return Partition("random", num_classes, _ids(num_experts), tuple(tuple(sorted(p.tolist())) for p in parts), seed)


def _balanced_assign(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Assign points to centres with sizes differing by at most one (min total squared distance)."""
    n, k = len(points), len(centres)
    capacity = [n // k + (1 if e < n % k else 0) for e in range(k)]
    slot_owner = np.repeat(np.arange(k), capacity)
    dist = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    from scipy.optimize import linear_sum_assignment  # the training stack: the edge only reads partitions

    rows, cols = linear_sum_assignment(dist[:, slot_owner])
    labels = np.empty(n, dtype=np.int64)
    labels[rows] = slot_owner[cols]
    return labels


def confusion_affinity(confusion: np.ndarray) -> np.ndarray:
    """Symmetric affinity from a (true × predicted) count matrix: how often i and j are mixed up."""
    conf = np.asarray(confusion, dtype=np.float64)
    rates = conf / np.maximum(conf.sum(1, keepdims=True), 1.0)
    affinity = (rates + rates.T) / 2.0
    np.fill_diagonal(affinity, 0.0)
    return affinity + 1e-6  # keeps the graph connected


def confusion_partition(confusion: np.ndarray, num_experts: int, seed: int = 0, rounds: int = 10) -> Partition:
    num_classes = confusion.shape[0]
    if confusion.shape != (num_classes, num_classes):
        raise PartitionError(f"confusion matrix must be square, got {confusion.shape}")
    _check_sizes(num_classes, num_experts)
    from sklearn.cluster import KMeans  # the training stack: the edge only reads partitions
    from sklearn.manifold import spectral_embedding

    affinity = confusion_affinity(confusion)
    if num_experts == 1:
        labels = np.zeros(num_classes, dtype=np.int64)
    else:
        dims = min(num_experts, num_classes - 1)
        emb = spectral_embedding(affinity, n_components=dims, random_state=seed, drop_first=False)
        centres = KMeans(num_experts, n_init=10, random_state=seed).fit(emb).cluster_centers_
        labels = _balanced_assign(emb, centres)
        for _ in range(rounds):
            centres = np.stack([emb[labels == e].mean(0) for e in range(num_experts)])
            new = _balanced_assign(emb, centres)
            if np.array_equal(new, labels):
                break
            labels = new
    subsets = tuple(tuple(np.flatnonzero(labels == e).tolist()) for e in range(num_experts))
    part = Partition("confusion", num_classes, _ids(num_experts), subsets, seed)
    part.stats["confusion_kept"] = confusion_kept(confusion, part)
    return part


def with_overlap(partition: Partition, confusion: np.ndarray, extra: int) -> Partition:
    """Each expert also takes the `extra` outside classes most confused with its own classes.

    Disjoint subsets cap the routing hit rate: a sample the generalist places near a
    boundary is routed to the neighbour that does not hold its class (the specialist
    literature lets subsets overlap for this; Hinton et al. 2015). A class's pull
    towards expert e is its symmetric confusion rate with e's classes, summed; the
    added classes follow the expert's own, strongest pull first.
    """
    if extra <= 0:
        return partition
    affinity = confusion_affinity(confusion)
    membership = partition.membership()
    pull = affinity @ membership.T  # (C, E): confusion of each class with each expert's classes
    subsets = []
    for e, subset in enumerate(partition.subsets):
        outside = np.flatnonzero(~membership[e])
        ranked = outside[np.argsort(-pull[outside, e], kind="stable")]
        subsets.append((*subset, *ranked[:extra].tolist()))
    out = Partition(partition.strategy, partition.num_classes, partition.expert_ids, tuple(subsets), partition.seed)
    out.stats.update(partition.stats, overlap=extra)
    return out


def confusion_kept(confusion: np.ndarray, partition: Partition) -> float:
    """Share of the generalist's errors whose true and predicted classes share an expert."""
    conf = np.asarray(confusion, dtype=np.float64).copy()
    np.fill_diagonal(conf, 0.0)
    total = conf.sum()
    if total == 0:
        return 1.0
    m = partition.membership().astype(np.float64)
    together = (m.T @ m) > 0  # (C, C): classes that share at least one expert
    return float(conf[together].sum() / total)
