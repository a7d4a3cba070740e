"""Shared fixtures: a micro-scale system directory that trains in seconds."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from askexpert.serving.process import ServerProcess as _Server

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("ASKEXPERT_TEST_THREADS", "2")))

MICRO = {
    "name": "micro",
    "data": {"synth": {"num_groups": 4, "classes_per_group": 3, "train_per_class": 24, "test_per_class": 8}},
    "generalist": {"preset": "micro-generalist"},
    "expert": {"preset": "micro-expert"},
    "partition": {"strategy": "confusion", "num_experts": 2},
    "generalist_training": {"epochs": 3, "batch_size": 32, "lr": 3e-3},
    "expert_training": {"epochs": 3, "shared_epochs": 2, "batch_size": 32, "lr": 3e-3},
    "routing": {"tau": 0.5, "top_k": 2},
    "evaluate": {"taus": 21, "max_k": 3},
}


def load_benchmark(name: str) -> ModuleType:
    """A script of benchmarks/ as a module (they are scripts, not a package)."""
    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def micro_config():
    from askexpert.config import SystemConfig

    return SystemConfig.from_dict(MICRO)


@pytest.fixture(scope="session")
def trained_system(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A micro system run through every stage once per test session."""
    import numpy as np

    from askexpert.config import SystemConfig
    from askexpert.evaluate.cache import build_cache
    from askexpert.pipeline import run_pipeline
    from askexpert.system import SystemDir

    root = tmp_path_factory.mktemp("system")
    system = SystemDir.create(root, SystemConfig.from_dict(MICRO))
    run_pipeline(system, log=lambda _msg: None)
    # Put τ at the median confidence so that about half the test samples are offloaded
    # (the micro generalist is barely trained), then report again from the same cache.
    cache = build_cache(system)
    raw = system.config().model_dump(mode="json")
    raw["routing"]["tau"] = float(np.median(cache.gen_probs.max(axis=1)))
    SystemConfig.from_dict(raw).to_yaml(system.config_path)
    run_pipeline(system, log=lambda _msg: None)
    return root


class ServerProcess(_Server):
    """`askexpert serve` on a free loopback port, ready when constructed."""

    def __init__(self, system: Path, *extra: str, ready_s: float = 60, **kwargs: object) -> None:
        super().__init__(system, *extra, **kwargs)  # type: ignore[arg-type]
        self.wait_ready(seconds=ready_s)


@pytest.fixture(autouse=True)
def _torch_threads_kept():
    """A served system sets torch's threads for its model calls (one per call on a CPU left on 'auto'): the
    next test gets the session's count back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def server(trained_system: Path):
    proc = ServerProcess(trained_system)
    yield proc
    proc.stop()


class StepMeter:
    """A fake energy counter: every pair of reads (before, after one model call) spans `joules_per_call`."""

    def __init__(self, joules_per_call: float, source: str = "fake") -> None:
        self.joules_per_call, self.source, self.reads = joules_per_call, source, 0

    def read_j(self) -> float:
        self.reads += 1
        return self.joules_per_call * (self.reads // 2)
