"""The real-data benchmark's record of what an invocation did not train itself (`benchmarks/cifar100_cpu.py`).

Its wall time is only the benchmark's "from nothing" figure when every stage ran from its first step; a run
that found finished checkpoints or a stopped stage's saved point must say so in its table.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("cifar100_cpu")


def _touch(path: Path, mtime: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    os.utime(path, (mtime, mtime))


def test_found_checkpoints_and_saved_points_are_listed(bench: ModuleType, tmp_path: Path) -> None:
    start = 1_000_000.0
    _touch(tmp_path / "seed0/generalist.safetensors", start - 10)  # trained before: listed
    _touch(tmp_path / "seed0/experts/static/e0.safetensors", start + 10)  # trained by this invocation
    _touch(tmp_path / "seed1/generalist.safetensors", start - 10)  # a copied shared stage: not the seed's own
    _touch(tmp_path / "seed1/experts/static/e1.safetensors", start - 5)
    _touch(tmp_path / "seed1/experts/progressive/e0.resume.pt", start - 5)
    _touch(tmp_path / "seed2/experts/static/e0.resume.pt", start - 5)  # a seed not asked for

    assert bench.trained_before(tmp_path, [0, 1], start) == [
        "seed0/generalist.safetensors",
        "seed1/experts/static/e1.safetensors",
    ]
    assert bench.resumed_at_start(tmp_path, [0, 1]) == ["seed1/experts/progressive/e0.resume.pt"]


def test_the_wall_time_line_says_what_was_not_trained_here(bench: ModuleType) -> None:
    timed = {"wall_s": 600.0, "machine": "x86_64, 2 torch threads, CPU only"}
    assert bench.wall_line(timed) == "10.0 min on x86_64, 2 torch threads, CPU only"
    both = bench.wall_line({**timed, "trained_before": ["a", "b"], "resumed": ["c"]})
    assert both.endswith(
        "(this invocation's: it found 2 checkpoint(s) already trained (benchmark.json's `trained_before`)"
        " and 1 stage(s) stopped part-way and resumed (`resumed`))"
    )
    assert "1 stage(s) stopped part-way" in bench.wall_line({**timed, "resumed": ["c"]})
    assert "already trained" not in bench.wall_line({**timed, "resumed": ["c"]})
    assert bench.wall_line({"wall_s": None}).startswith("not timed")
    scripted = bench.wall_line({**timed, "wall_from_budget_start_s": 660.0})  # the script's setup counts
    assert (
        scripted == "10.0 min on x86_64, 2 torch threads, CPU only (11.0 min from the budget's start: setup included)"
    )


def test_the_tables_name_the_data_set_the_run_read(bench: ModuleType, tmp_path: Path) -> None:
    cifar, other = tmp_path / "cifar100", tmp_path / "tin-other100"
    for root in (cifar, other):
        (root / "train").mkdir(parents=True)
    (cifar / "classes.json").write_text("[]")  # shared/data's CIFAR-100 tree carries its label list
    record = bench.data_record(cifar)
    title, test_split = bench.data_names({"data": record})
    assert title == "real CIFAR-100" and "re-drawn 100-per-class split" in test_split
    (cifar / "classes.json").unlink()  # --report-only after the extracted tree is gone: the record decides
    assert bench.data_names({"data": record}) == (title, test_split)
    assert bench.data_names({}) == (title, test_split)  # a record from before `data` was CIFAR-100's
    title, test_split = bench.data_names({"data": bench.data_record(other)})
    assert title == "the image folder `tin-other100`" and test_split == f"the `test/` folder of `{other}`"
    assert "CIFAR" not in title + test_split
