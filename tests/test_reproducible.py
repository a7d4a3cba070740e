"""Training twice, in two processes, writes byte-identical checkpoints (same machine, same seed)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from conftest import MICRO

TRAIN = """
import sys
from askexpert.config import SystemConfig
from askexpert.system import SystemDir
from askexpert.training.experts import train_experts
from askexpert.training.generalist import train_generalist
from askexpert.training.partition_stage import build_partition
import json
cfg = SystemConfig.from_dict(json.loads(sys.argv[2]))
system = SystemDir.create(sys.argv[1], cfg)
train_generalist(system)
build_partition(system)
for schedule in ("static", "progressive"):
    train_experts(system, schedule)
"""


def _train(root: Path, hash_seed: str) -> dict[str, str]:
    import json

    cfg = dict(MICRO, generalist_training={"epochs": 1, "batch_size": 32, "lr": 3e-3})
    cfg["expert_training"] = {"epochs": 1, "shared_epochs": 1, "batch_size": 32, "lr": 3e-3}
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", TRAIN, str(root), json.dumps(cfg)], check=True, env=env, capture_output=True)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.safetensors")}


def test_two_processes_write_identical_checkpoints(tmp_path: Path) -> None:
    # different string-hash seeds: nothing may depend on set or dict order, nor on the process
    first, second = _train(tmp_path / "a", "1"), _train(tmp_path / "b", "2")
    assert len(first) == 6  # generalist, stage 1, 2 static and 2 progressive experts
    assert first == second
