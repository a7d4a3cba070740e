"""The budget forecast (`benchmarks/budget_forecast.py`) counts the work the pipeline really does.

Its projection is only as good as its counts: the optimizer steps it multiplies must be the steps the
pipeline ran, which the checkpoints record.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from askexpert.models import read_meta
from askexpert.system import SystemDir
from conftest import load_benchmark


@pytest.fixture(scope="module")
def forecast() -> ModuleType:
    return load_benchmark("budget_forecast")


def _sizes(system: SystemDir) -> tuple[int, int, int]:
    splits = system.splits()
    return len(splits.train) + len(splits.val), len(splits.test), splits.train.num_classes


def test_forecast_counts_the_optimizer_steps_the_checkpoints_record(forecast: ModuleType, trained_system: Path) -> None:
    system = SystemDir.open(trained_system)
    cfg = system.config()
    planned = forecast.planned_work(cfg, 1, *_sizes(system), (0, 0))
    steps = {stage: count for stage, _, count, work in planned if work.budget is not None}
    assert "pretrain backbones" not in steps  # the micro config has no pretraining data
    assert steps["stage 1"] == read_meta(system.stage1_path).extra["steps"]
    assert steps["train generalist"] == system.generalist_meta().extra["steps"]
    part = system.partition()
    ran = [
        read_meta(system.expert_path(s, e)).extra["steps"]
        for s in cfg.expert_training.schedules
        for e in part.expert_ids
    ]
    assert steps["train experts"] == sum(ran)
    # a second seed repeats the experts and the evaluation, not stage 1 or the generalist
    twice = {(stage, work): count for stage, _, count, work in forecast.planned_work(cfg, 2, *_sizes(system), (0, 0))}
    once = {(stage, work): count for stage, _, count, work in planned}
    assert twice.keys() == once.keys()
    for (stage, work), count in once.items():
        assert twice[(stage, work)] == count * (2 if stage in ("train experts", "evaluate") else 1)


def test_forecast_times_every_job_in_the_real_training_loop(forecast: ModuleType, trained_system: Path) -> None:
    system = SystemDir.open(trained_system)
    jobs = forecast.forecast(system.config(), 1, *_sizes(system), (0, 0), steps=2, warmup=1)
    assert [j.stage for j in jobs] == [p[0] for p in forecast.planned_work(system.config(), 1, *_sizes(system), (0, 0))]
    assert all(j.seconds_per_unit > 0 and j.seconds == j.count * j.seconds_per_unit for j in jobs)
