"""Run the generalist and every expert over one split (test by default, or validation) once, and keep the outputs.

The cache (`cache/logits-<key>.npz`) is keyed by a hash of the test data, the
partition and every checkpoint's SHA-256, so a changed model or data set can
never be read through a stale cache, and a sweep over τ, k, gates and
schedules reads arrays instead of running models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from askexpert.errors import CheckpointError
from askexpert.fingerprint import fingerprint
from askexpert.models import load_checkpoint, predict_logits, read_meta, resolve_device
from askexpert.models.local_experts import LocalExpertBackend
from askexpert.models.predict import bfloat16_honoured
from askexpert.partition import Partition
from askexpert.progress import progress
from askexpert.protocol import softmax
from askexpert.protocol.backend import reply_from_logits
from askexpert.system import SystemDir


@dataclass(frozen=True)
class ScheduleOutputs:
    """Every expert's answer on every test image, for one schedule."""

    logits: dict[str, np.ndarray]  # expert id -> (N, |S_e| + 1)
    labels: np.ndarray  # (E, N) global label or OTHER ("other")
    confidence: np.ndarray  # (E, N)


@dataclass(frozen=True)
class LogitCache:
    labels: np.ndarray  # (N,) true labels
    gen_probs: np.ndarray  # (N, C) generalist softmax
    partition: Partition
    schedules: dict[str, ScheduleOutputs]
    key: str

    @property
    def gen_pred(self) -> np.ndarray:
        return self.gen_probs.argmax(axis=1)


def _schedule_outputs(logits: dict[str, np.ndarray], partition: Partition) -> ScheduleOutputs:
    labels, conf = [], []
    for eid, classes in zip(partition.expert_ids, partition.output_classes(), strict=True):
        reply = reply_from_logits(logits[eid], classes)
        labels.append(reply.labels)
        conf.append(reply.confidence)
    return ScheduleOutputs(logits, np.stack(labels), np.stack(conf))


def available_schedules(system: SystemDir, partition: Partition) -> list[str]:
    """Schedules whose folder holds a checkpoint for every expert."""
    root = system.root / "experts"
    if not root.is_dir():
        return []
    return sorted(
        d.name
        for d in root.iterdir()
        if d.is_dir() and all(system.expert_path(d.name, e).is_file() for e in partition.expert_ids)
    )


def cache_key(
    system: SystemDir, partition: Partition, schedules: list[str], labels: np.ndarray, images: np.ndarray
) -> str:
    shas = [system.generalist_meta().sha256]
    for schedule in schedules:
        shas += [read_meta(system.expert_path(schedule, e)).sha256 for e in partition.expert_ids]
    return fingerprint("cache/1", shas, schedules, partition.subsets, labels, images, *runtime_here(system))


def runtime_here(system: SystemDir) -> list[dict[str, bool]]:
    """How this machine runs the system's experts, for the keys of their outputs: `cpu_bfloat16` counts only
    where it is honoured (a CPU with native bfloat16, or CUDA), so that a system directory moved between
    machines never reads bfloat16 outputs as this machine's float32 answers, nor the reverse."""
    cfg = system.config()
    device = resolve_device(cfg.device)
    return cfg.serving.expert_runtime(bfloat16_honoured(cfg.serving.cpu_bfloat16, device))


def build_cache(system: SystemDir, schedules: list[str] | None = None, split: str = "test") -> LogitCache:
    """Load the cache for the current checkpoints, computing (and storing) it if absent.

    `split="val"` caches the held-out validation split, for choices (see `calibrate`).
    """
    cfg = system.config()
    partition = system.partition()
    if not system.generalist_path.is_file():
        raise CheckpointError(f"{system.generalist_path}: no generalist; run `askexpert train generalist`")
    schedules = available_schedules(system, partition) if schedules is None else schedules
    if not schedules:
        raise CheckpointError(f"{system.root / 'experts'}: no complete expert set; run `askexpert train experts`")
    splits = system.splits()
    test = splits.val if split == "val" else splits.test
    key = cache_key(system, partition, schedules, test.labels, test.images)
    path = system.cache_dir / f"logits-{key}.npz"
    if path.is_file():
        return load_cache(path, partition, schedules, key)
    device = resolve_device(cfg.device)
    generalist, _ = load_checkpoint(system.generalist_path, device)
    arrays = {"labels": test.labels, "gen_logits": predict_logits(generalist, test.images, device, desc="generalist")}
    for schedule in schedules:
        backend = LocalExpertBackend.of_system(system, schedule, device)
        for eid in progress(partition.expert_ids, desc=f"{schedule} experts", leave=False):
            arrays[f"{schedule}/{eid}"] = backend.logits(eid, test.images)
    _store(path, arrays)
    return load_cache(path, partition, schedules, key)


def _store(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write a cache file whole or not at all (a stopped run leaves no half file under the real name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)  # type: ignore[arg-type]
    tmp.replace(path)


def build_stage1_logits(system: SystemDir, split: str = "test") -> np.ndarray | None:
    """Stage 1's logits (N, C) on one split, run as the experts are served (`serving.test_time_flip`,
    `serving.cpu_bfloat16`), or None for a system without a stage 1.

    Why: every `init: shared` expert starts from stage 1, so stage 1 restricted to an expert's classes is
    the yardstick that says what the expert's own stages added (`metrics.expert_table`). Kept beside the
    cache (`cache/stage1-<key>.npz`), keyed by stage 1's SHA-256, the split and the runtime.
    """
    if not system.stage1_path.is_file():
        return None
    cfg = system.config()
    splits = system.splits()
    data = splits.val if split == "val" else splits.test
    runtime = runtime_here(system)
    key = fingerprint("stage1-logits/1", read_meta(system.stage1_path).sha256, data.labels, data.images, *runtime)
    path = system.cache_dir / f"stage1-{key}.npz"
    if path.is_file():
        with np.load(path) as stored:
            return np.asarray(stored["logits"])
    device = resolve_device(cfg.device)
    # the experts' own runner: the one place that says how `serving` runs a model (mirror, bfloat16)
    runner = LocalExpertBackend(
        {"stage1": load_checkpoint(system.stage1_path, device)},
        device,
        flip=cfg.serving.test_time_flip,
        cpu_bfloat16=cfg.serving.cpu_bfloat16,
    )
    logits = runner.logits("stage1", data.images)
    _store(path, {"logits": logits})
    return logits


def load_cache(path: Path, partition: Partition, schedules: list[str], key: str) -> LogitCache:
    with np.load(path) as data:
        gen_logits = data["gen_logits"]
        outputs = {
            s: _schedule_outputs({e: data[f"{s}/{e}"] for e in partition.expert_ids}, partition) for s in schedules
        }
        labels = data["labels"]
    probs = softmax(gen_logits)  # the live edge's softmax: cached and live decisions agree to the bit
    return LogitCache(labels, probs, partition, outputs, key)
