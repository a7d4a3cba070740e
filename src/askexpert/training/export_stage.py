"""Leave the generalist in the system directory as ONNX, for the torch-free edge (`askexpert export onnx`).

Each file gets a sidecar naming the checkpoint it came from; a current export
is kept, so the demo's rerun costs nothing and an edge never runs a stale one.
"""

from __future__ import annotations

from pathlib import Path

from askexpert.data import input_size
from askexpert.models import load_checkpoint
from askexpert.models.onnx_export import export_onnx, quantize_int8
from askexpert.models.onnx_runtime import is_current, mark_exported
from askexpert.system import SystemDir


def export_generalist(system: SystemDir, int8: bool = True, force: bool = False) -> list[Path]:
    """The generalist as `generalist.onnx` (and `generalist.int8.onnx`); returns the paths written or kept."""
    sha = system.generalist_meta().sha256
    runtimes = ["onnx", "onnx-int8"] if int8 else ["onnx"]
    paths = [system.onnx_path(r) for r in runtimes]
    if not force and all(is_current(p, sha) for p in paths):
        return paths
    model, _ = load_checkpoint(system.generalist_path)
    fp32 = export_onnx(model, paths[0], input_size(system.config().data))
    if int8:
        quantize_int8(fp32, paths[1])
    for path in paths:  # the sidecars last: a crash before them leaves an export the edge refuses
        mark_exported(path, sha, system.generalist_path.name)
    return paths
