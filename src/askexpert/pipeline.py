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


STAGE1 = "train stage 1 (all classes, shared by the experts)"


class _Timed:
    """Runs named stages in order, logging each and keeping its seconds."""

    def __init__(self, log: Callable[[str], None], timings: dict[str, float] | None = None) -> None:
        self.log, self.timings = log, {} if timings is None else timings

    def __call__(self, name: str, fn: Callable[[], object]) -> None:
        self.log(f"askexpert: {name} ...")
        start = time.perf_counter()
        fn()
        self.timings[name] = time.perf_counter() - start
        self.log(f"askexpert: {name}: done in {self.timings[name]:.1f} s")


def run_first_stages(system: SystemDir, log: Callable[[str], None] = print) -> dict[str, float]:
    """The stages before the generalist, timed: data, backbone pretraining (when configured) and stage 1 when it
    teaches the generalist. Why apart: the real-data benchmark times them to correct its budget fit for the
    host's pace before the rest runs; `run_pipeline` starts with them."""
    cfg = system.config()
    stage = _Timed(log)
    stage("data", lambda: system.splits())
    if cfg.backbone.data is not None:
        stage("pretrain backbones", lambda: train_backbones(system))
    if cfg.distill.active:  # stage 1 teaches the generalist: trained first
        stage(STAGE1, lambda: train_shared_stage(system))
    return stage.timings


def run_pipeline(system: SystemDir, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every stage in order (above), reusing finished ones: the evaluation's summary and each stage's seconds."""
    cfg = system.config()
    stage = _Timed(log, run_first_stages(system, log))
    stage("train generalist", lambda: train_generalist(system))
    stage("export generalist (ONNX, for the edge)", lambda: export_generalist(system))
    stage(f"partition ({cfg.partition.strategy})", lambda: build_partition(system))
    if not cfg.distill.active and any(s.init == "shared" for s in cfg.expert_training.schedules.values()):
        stage(STAGE1, lambda: train_shared_stage(system))
    for schedule in cfg.expert_training.schedules:
        stage(f"train experts ({schedule})", lambda s=schedule: train_experts(system, s))  # type: ignore[misc]
    summary: dict[str, Any] = {}
    stage("evaluate", lambda: summary.update(evaluate_system(system)))
    summary["timings_s"] = stage.timings
    return summary
