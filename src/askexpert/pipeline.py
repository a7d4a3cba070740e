"""The demo: every stage in order on one system directory, reusing finished stages.

generate data → [pretrain backbones] → [shared stage 1, when it teaches the generalist] →
train generalist → export it as ONNX (the torch-free edge's model) → partition → [shared stage 1] →
one expert set per schedule → evaluate → report.
Each stage checks whether its output already exists for the same settings and skips itself if so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from askexpert.config import SystemConfig
from askexpert.evaluate.run import evaluate_system
from askexpert.system import SystemDir
from askexpert.training.experts import train_experts
from askexpert.training.export_stage import export_generalist
from askexpert.training.generalist import train_generalist
from askexpert.training.partition_stage import build_partition
from askexpert.training.shared import train_backbones, train_shared_stage


def open_or_create(root: str | Path, config: SystemConfig | None = None) -> SystemDir:
    """Open `root`, creating it with `config` (default: the CPU demo config) if it has none."""
    if (Path(root) / "config.yaml").is_file():
        return SystemDir.open(root)
    return SystemDir.create(root, config or SystemConfig())


def run_pipeline(system: SystemDir, log: Callable[[str], None] = print) -> dict[str, Any]:
    cfg = system.config()
    timings: dict[str, float] = {}

    def stage(name: str, fn: Callable[[], object]) -> None:
        log(f"askexpert: {name} ...")
        start = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - start
        log(f"askexpert: {name}: done in {timings[name]:.1f} s")

    stage("data", lambda: system.splits())
    if cfg.backbone.data is not None:
        stage("pretrain backbones", lambda: train_backbones(system))
    stage1 = "train stage 1 (all classes, shared by the experts)"
    teaches = cfg.distill.active
    if teaches:  # stage 1 teaches the generalist: trained first
        stage(stage1, lambda: train_shared_stage(system))
    stage("train generalist", lambda: train_generalist(system))
    stage("export generalist (ONNX, for the edge)", lambda: export_generalist(system))
    stage(f"partition ({cfg.partition.strategy})", lambda: build_partition(system))
    if not teaches and any(s.init == "shared" for s in cfg.expert_training.schedules.values()):
        stage(stage1, lambda: train_shared_stage(system))
    for schedule in cfg.expert_training.schedules:
        stage(f"train experts ({schedule})", lambda s=schedule: train_experts(system, s))  # type: ignore[misc]
    summary: dict[str, Any] = {}
    stage("evaluate", lambda: summary.update(evaluate_system(system)))
    summary["timings_s"] = timings
    return summary
