"""Shared fixtures: a micro-scale system directory that trains in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

MICRO = {
    "name": "micro",
    "data": {"synth": {"num_groups": 4, "classes_per_group": 3, "train_per_class": 24, "test_per_class": 8}},
    "generalist": {"preset": "micro-generalist"},
    "expert": {"preset": "micro-expert"},
    "partition": {"strategy": "confusion", "num_experts": 2},
    "generalist_training": {"epochs": 3, "batch_size": 32, "lr": 3e-3},
    "expert_training": {"epochs": 3, "batch_size": 32, "lr": 3e-3},
    "routing": {"tau": 0.5, "top_k": 2},
    "evaluate": {"taus": 11, "max_k": 3},
}


@pytest.fixture
def micro_config():
    from askexpert.config import SystemConfig

    return SystemConfig.from_dict(MICRO)


@pytest.fixture(scope="session")
def trained_system(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A micro system run through every stage once per test session."""
    from askexpert.config import SystemConfig
    from askexpert.pipeline import run_pipeline
    from askexpert.system import SystemDir

    root = tmp_path_factory.mktemp("system")
    system = SystemDir.create(root, SystemConfig.from_dict(MICRO))
    run_pipeline(system, log=lambda _msg: None)
    return root
