"""Export the generalist as ONNX for an edge runtime (ONNX Runtime), optionally INT8.

The exported graph takes the same uint8 NHWC batch as `ImageClassifier` (the
resize/normalise is inside), with a dynamic batch dimension. INT8 uses ONNX
Runtime's dynamic quantization (weights to int8, activations quantised on the fly).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from askexpert.models.registry import ImageClassifier


def export_onnx(model: ImageClassifier, path: str | Path, image_size: int) -> Path:
    path = Path(path)
    model = model.cpu().eval()
    example = torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes={"images": {0: batch}},
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    return path


def quantize_int8(source: str | Path, target: str | Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer warns on root about the uint8 input it leaves alone
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return Path(target)


def compare_runtimes(
    runtimes: dict[str, Any], images: np.ndarray, labels: np.ndarray, repeats: int = 3
) -> list[dict[str, Any]]:
    """Accuracy, agreement with the first runtime, and latency per runtime on the same images."""
    rows = []
    reference = None
    for name, fn in runtimes.items():
        fn(images[:8])  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            logits = fn(images)
            best = min(best, time.perf_counter() - start)
        pred = logits.argmax(1)
        if reference is None:
            reference = pred
        rows.append(
            {
                "runtime": name,
                "accuracy": float((pred == labels).mean()),
                "agreement": float((pred == reference).mean()),
                "ms_per_image": best / len(images) * 1e3,
            }
        )
    return rows
