"""The served experts run by ONNX Runtime (`serving.model_runtime: onnx`): one call per batch, float32, on the CPU.

Why: an eager torch forward pass takes Python's GIL back after every operator, and
the server's event loop holds it for a quarter of the time under overload (parsing,
admitting, refusing). Each collision stalls the model call: a probe measured torch
+10-39 % slower per call beside such a loop, ONNX Runtime 0-10 %, at equal speed alone
(README "Serving"). ONNX Runtime's `run` releases the GIL once for the whole graph.

Each expert is exported beside its checkpoint (`experts/<schedule>/<id>.onnx`, with a
sidecar naming the checkpoint's SHA-256) the first time it is served, and again
whenever the checkpoint changes. The mirror image of `serving.test_time_flip` goes
through the same call, as in torch, and the two halves' logits are averaged.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from askexpert.errors import RoutingError
from askexpert.models.local_experts import LocalExpertBackend
from askexpert.models.onnx_export import export_onnx
from askexpert.models.onnx_runtime import OnnxGeneralist, is_current, mark_exported
from askexpert.protocol.backend import check_images

if TYPE_CHECKING:
    from askexpert.system import SystemDir


def exported_expert(backend: LocalExpertBackend, expert_id: str, path: Path, image_size: int) -> Path:
    """`path` holding `expert_id` as ONNX, exported now unless a current export is already there."""
    model, meta = backend.experts[expert_id]
    if not is_current(path, meta.sha256, role="expert"):
        export_onnx(model, path, image_size)
        mark_exported(path, meta.sha256, f"{expert_id} ({meta.schedule})", role="expert")
    return path


def export_experts(backend: LocalExpertBackend, system: SystemDir, schedule: str, image_size: int) -> dict[str, Path]:
    """Every expert of `backend` as ONNX beside its checkpoint (`experts/<schedule>/<id>.onnx`), exported now where
    no current export is there: what both engines' servers run."""
    return {
        eid: exported_expert(backend, eid, system.expert_path(schedule, eid).with_suffix(".onnx"), image_size)
        for eid in backend.experts
    }


class OnnxExperts:
    """`logits(expert_id, images)` as `LocalExpertBackend` gives them (within float rounding), from ONNX Runtime."""

    def __init__(self, runners: dict[str, OnnxGeneralist], flip: bool) -> None:
        self.runners = runners
        self.flip = flip

    @classmethod
    def of_backend(
        cls, backend: LocalExpertBackend, system: SystemDir, schedule: str, image_size: int, threads: int = 0
    ) -> OnnxExperts:
        """Every expert of `backend` (exported where needed: `export_experts`); `threads` per call (0: ORT's)."""
        exports = export_experts(backend, system, schedule, image_size)
        return cls({eid: OnnxGeneralist(path, threads) for eid, path in exports.items()}, backend.flip)

    def logits(self, expert_id: str, images: np.ndarray) -> np.ndarray:
        runner = self.runners.get(expert_id)
        if runner is None:
            raise RoutingError(f"unknown expert {expert_id!r}; known: {', '.join(self.runners)}")
        check_images(images)
        if not self.flip:
            return runner(images)
        both = runner(np.concatenate([images, images[:, :, ::-1]]))  # NHWC: the width mirrored
        return (both[: len(images)] + both[len(images) :]) / 2
