"""Measured device profiles: time the system's models on the machine this runs on (`askexpert profile measure`).

A profile's `slowdown` is a guess of how much slower another device is than this
machine. Run this on the device itself (a Raspberry Pi, a Jetson, the near-edge
server) and copy the YAML back: the testbed then uses the measured times for
those presets and batch sizes, and the guess only where none was measured.
"""

from __future__ import annotations

import datetime as dt
import math
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml

from askexpert.data import input_size
from askexpert.errors import ConfigError
from askexpert.measure.energy import EnergyMeter, meter_for
from askexpert.measure.profiles import DeviceProfile, MeasuredTimes
from askexpert.models import ImageClassifier, load_checkpoint, predict_logits, resolve_device
from askexpert.system import SystemDir

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64)


METER_WINDOW_S = 1.0  # energy counters tick coarsely (NVML every ~10-100 ms): read them around ≥ 1 s of work


def time_model(
    model: ImageClassifier,
    size: int,
    batch: int,
    repeats: int,
    device: torch.device,
    meter: EnergyMeter | None = None,
    meter_window_s: float = METER_WINDOW_S,
) -> tuple[float, float | None]:
    """Median milliseconds of one forward pass on a batch (after a warm-up), and joules per batch from `meter`.

    Energy is read around as many passes as fill `meter_window_s` (at least `repeats`), then divided:
    a millisecond pass alone would fall between two ticks of the counter and read as zero.
    """
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)

    def once() -> None:
        predict_logits(model, images, device, batch_size=batch)
        if device.type == "cuda":
            torch.cuda.synchronize()  # the pass is over when the GPU is, not when the launch returns

    ms = median_ms(once, repeats)
    if meter is None:
        return ms, None
    passes = max(repeats, math.ceil(meter_window_s * 1e3 / max(ms, 1e-3)))
    start_j = meter.read_j()
    for _ in range(passes):
        once()
    return ms, (meter.read_j() - start_j) / passes


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall milliseconds of `fn` over `repeats` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return float(statistics.median(times))


def batch1_latency(preset_name: str, repeats: int = 30, onnx: bool = True) -> dict[str, float]:
    """ms for one image at batch 1 on this CPU: torch and, with `onnx`, ONNX Runtime on the exported graph.

    `askexpert presets` prints these beside the FLOPs: at batch 1 small models are bound by
    per-op overhead, not arithmetic, so a bigger edge model must not slow the edge unnoticed.
    """
    from askexpert.models import create_model, get_preset
    from askexpert.models.onnx_export import export_onnx
    from askexpert.models.onnx_runtime import OnnxGeneralist

    preset = get_preset(preset_name)
    model = create_model(preset_name, 100).eval()
    cpu = torch.device("cpu")
    out = {"torch_ms": time_model(model, preset.img_size, 1, repeats, cpu)[0]}
    if onnx:
        image = np.zeros((1, preset.img_size, preset.img_size, 3), dtype=np.uint8)
        with tempfile.TemporaryDirectory() as tmp:
            runner = OnnxGeneralist(export_onnx(model, Path(tmp) / "model.onnx", preset.img_size))
            out["onnx_ms"] = median_ms(lambda: runner(image), repeats)
    return out


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
    dev = resolve_device(device)
    size = input_size(cfg.data)
    part = system.partition()
    generalist, gmeta = load_checkpoint(system.generalist_path, dev)
    expert, emeta = load_checkpoint(system.expert_path(cfg.serving.schedule, part.expert_ids[0]), dev)
    meter = meter_for(dev.type)
    meter_name = meter.source if meter is not None else None
    results = {
        role: {b: time_model(model, size, b, repeats, dev, meter) for b in batches}
        for role, model in (("generalist", generalist), ("expert", expert))
    }
    measured = MeasuredTimes(
        presets={"generalist": gmeta.preset, "expert": emeta.preset},
        image_size=size,
        device=str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        date=dt.date.today().isoformat(),
        ms={role: {b: r[0] for b, r in per.items()} for role, per in results.items()},
        j={role: {b: float(r[1]) for b, r in per.items() if r[1] is not None} for role, per in results.items()}
        if meter
        else None,
        meter=meter_name,
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
            f"Power: idle {idle_w:g} W, active {active_w:g} W, as given on the command line; "
            + (f"energy per batch read from {meter_name}." if meter_name else "no energy meter readable here."),
        ],
        measured=measured,
    )


def write_profile(profile: DeviceProfile, path: Path) -> None:
    path.write_text(yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False))
