"""The exported generalist run by ONNX Runtime: the edge's model without torch.

`generalist.onnx` sits in the system directory beside a sidecar,
`generalist.onnx.json`, naming the SHA-256 of the checkpoint it was exported
from, so an edge never runs an export older than the generalist it stands for.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from askexpert.errors import CheckpointError


def source_path(onnx: str | Path) -> Path:
    """The sidecar naming the checkpoint an ONNX file was exported from."""
    return Path(f"{onnx}.json")


def exported_from(onnx: str | Path, role: str = "generalist") -> str | None:
    """The SHA-256 of the `role` checkpoint `onnx` was exported from (None without a readable sidecar)."""
    try:
        return str(json.loads(source_path(onnx).read_text())[f"{role}_sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_current(onnx: str | Path, sha256: str, role: str = "generalist") -> bool:
    """`onnx` exists and was exported from the checkpoint with this SHA-256: the one test of freshness."""
    return Path(onnx).is_file() and exported_from(onnx, role) == sha256


def mark_exported(onnx: str | Path, sha256: str, source: str, role: str = "generalist") -> None:
    """Write `onnx`'s sidecar; written last, so that a crash before it leaves an export that is refused."""
    tmp = source_path(onnx).with_suffix(".tmp")
    tmp.write_text(json.dumps({f"{role}_sha256": sha256, "source": source}, indent=1))
    tmp.replace(source_path(onnx))


class OnnxGeneralist:
    """An edge model run by ONNX Runtime; call it with uint8 NHWC images, get logits."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: ONNX model not found; create it with `askexpert export onnx`")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise CheckpointError(f"{path}: not a loadable ONNX model: {exc}") from None
        self.path = path
        self.num_outputs = int(self.session.get_outputs()[0].shape[-1])

    def __call__(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        outs = [
            self.session.run(["logits"], {"images": np.ascontiguousarray(images[i : i + batch_size])})[0]
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(outs).astype(np.float32)
