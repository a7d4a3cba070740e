"""Batch-1 latency of a preset on this machine, for torch and ONNX Runtime.

A bigger model must not slow the edge path unnoticed: `askexpert presets` prints
these beside the FLOPs, since at batch 1 small models are bound by per-op
overhead, not arithmetic, and FLOPs alone mislead.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from askexpert.models.onnx_export import OnnxGeneralist, export_onnx
from askexpert.models.predict import predict_logits
from askexpert.models.registry import create_model, get_preset


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median wall time of `fn` in milliseconds, after a few warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def batch1_latency(preset_name: str, repeats: int = 30, onnx: bool = True) -> dict[str, float]:
    """ms per image at batch 1: torch (eval, inference mode) and, with `onnx`, ONNX Runtime on the export."""
    preset = get_preset(preset_name)
    model = create_model(preset_name, 100).eval()
    image = np.zeros((1, preset.img_size, preset.img_size, 3), dtype=np.uint8)
    out = {"torch_ms": median_ms(lambda: predict_logits(model, image), repeats)}
    if onnx:
        with tempfile.TemporaryDirectory() as tmp:
            runner = OnnxGeneralist(export_onnx(model, Path(tmp) / "model.onnx", preset.img_size))
            out["onnx_ms"] = median_ms(lambda: runner(image), repeats)
    return out
