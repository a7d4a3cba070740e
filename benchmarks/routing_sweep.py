"""Benchmark: a 250-setting sweep over 10,000 cached samples, and the router's cost next to the generalist.

    .venv/bin/python benchmarks/routing_sweep.py

Targets (issue "spine, part 2"): sweep < 2 s; router < 1% of the generalist's
forward time for a batch of 256. Synthetic cached outputs stand in for a real cache
(the sweep's cost depends on shapes, not values).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from askexpert.config import RoutingConfig
from askexpert.evaluate.cache import LogitCache, ScheduleOutputs
from askexpert.evaluate.metrics import sweep
from askexpert.models import create_model
from askexpert.partition import random_partition
from askexpert.routing import Router


def fake_cache(n: int = 10_000, classes: int = 100, experts: int = 5, seed: int = 0) -> LogitCache:
    rng = np.random.default_rng(seed)
    part = random_partition(classes, experts, seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes)) + 4.0 * np.eye(classes)[labels]
    probs = torch.from_numpy(logits).softmax(1).numpy().astype(np.float32)
    pairs = list(zip(part.expert_ids, part.subsets, strict=True))
    exp_logits = {e: rng.normal(size=(n, len(s) + 1)).astype(np.float32) for e, s in pairs}
    exp_labels = np.stack([np.asarray([*s, -1])[exp_logits[e].argmax(1)] for e, s in pairs])
    outputs = ScheduleOutputs(exp_logits, exp_labels, np.ones_like(exp_labels, dtype=np.float32))
    return LogitCache(labels, probs, part, {"static": outputs}, "bench")


def main() -> None:
    torch.set_num_threads(2)
    cache = fake_cache()
    taus = np.linspace(0, 1, 50)
    sweep(cache, taus[:2], [1], ["max_prob"])  # warm-up
    start = time.perf_counter()
    rows = sweep(cache, taus, [1, 2, 3, 4, 5], ["max_prob"])
    elapsed = time.perf_counter() - start
    print(f"sweep: {len(rows)} settings over {len(cache.labels)} cached samples in {elapsed:.3f} s (target < 2 s)")

    generalist = create_model("cpu-generalist", 100).eval()
    router = Router(cache.partition.membership(), RoutingConfig(gate="max_prob", tau=0.6, top_k=3))
    images = torch.randint(0, 256, (256, 32, 32, 3), dtype=torch.uint8)
    with torch.inference_mode():
        for _ in range(3):
            probs = generalist(images).softmax(1)
            router(probs)
        reps = 20
        t0 = time.perf_counter()
        for _ in range(reps):
            probs = generalist(images).softmax(1)
        t_gen = (time.perf_counter() - t0) / reps
        t0 = time.perf_counter()
        for _ in range(reps * 10):
            router(probs)
        t_route = (time.perf_counter() - t0) / (reps * 10)
    print(f"generalist forward (cpu-generalist, batch 256): {t_gen * 1e3:.2f} ms")
    print(
        f"router (max_prob gate + top-3 weighted scoring, batch 256): {t_route * 1e3:.3f} ms "
        f"= {100 * t_route / t_gen:.2f}% of the forward (target < 1%)"
    )


if __name__ == "__main__":
    main()
