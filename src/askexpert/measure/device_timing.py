"""Measured device profiles: time the system's models on the machine this runs on (`askexpert profile measure`).

A profile's `slowdown` is a guess of how much slower another device is than this
machine. Run this on the device itself (a Raspberry Pi, a Jetson, the near-edge
server) and copy the YAML back: the testbed then uses the measured times for
those presets and batch sizes, and the guess only where none was measured.
"""

from __future__ import annotations

import datetime as dt
import platform
import statistics
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml

from askexpert.data import input_size
from askexpert.errors import ConfigError
from askexpert.measure.profiles import DeviceProfile, MeasuredTimes
from askexpert.models import load_checkpoint, predict_logits
from askexpert.partition import Partition
from askexpert.system import SystemDir

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def time_model(model: torch.nn.Module, size: int, batch: int, repeats: int, device: torch.device) -> float:
    """Median milliseconds of one forward pass on a batch (after a warm-up)."""
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    for _ in range(2):
        predict_logits(model, images, device, batch_size=batch)  # type: ignore[arg-type]
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        predict_logits(model, images, device, batch_size=batch)  # type: ignore[arg-type]
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return float(statistics.median(times))


def measure_profile(
    system: SystemDir,
    name: str,
    tier: Literal["edge", "near-edge"],
    idle_w: float,
    active_w: float,
    threads: int = 0,
    batches: tuple[int, ...] = DEFAULT_BATCHES,
    repeats: int = 5,
    device: str = "cpu",
) -> DeviceProfile:
    """Time the generalist and one expert of `system` over `batches`; a profile with the measured times."""
    if any(b < 1 for b in batches):
        raise ConfigError(f"batch sizes must be ≥ 1, got {list(batches)}")
    cfg = system.config()
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    size = input_size(cfg.data)
    part = Partition.from_json(system.partition_path)
    generalist, gmeta = load_checkpoint(system.generalist_path, dev)
    expert, emeta = load_checkpoint(system.expert_path(cfg.serving.schedule, part.expert_ids[0]), dev)
    measured = MeasuredTimes(
        presets={"generalist": gmeta.preset, "expert": emeta.preset},
        image_size=size,
        device=str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        date=dt.date.today().isoformat(),
        ms={
            role: {b: time_model(model, size, b, repeats, dev) for b in batches}
            for role, model in (("generalist", generalist), ("expert", expert))
        },
    )
    return DeviceProfile(
        name=name,
        tier=tier,
        idle_w=idle_w,
        active_w=active_w,
        threads=torch.get_num_threads(),
        slowdown=1.0,
        sources=[
            f"Times measured by `askexpert profile measure` on {platform.node()} ({platform.machine()}, "
            f"{torch.get_num_threads()} torch threads, {measured.device}) on {measured.date}.",
            f"Power: idle {idle_w:g} W, active {active_w:g} W, as given on the command line.",
        ],
        measured=measured,
    )


def write_profile(profile: DeviceProfile, path: Path) -> None:
    path.write_text(yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False))
