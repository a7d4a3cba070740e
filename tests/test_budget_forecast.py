"""The budget forecast (`askexpert.training.forecast`) counts the work the pipeline really does, and the
epoch factor that fits a budget leaves the budget's untrained part alone.

Its projection is only as good as its counts: the optimizer steps it multiplies must be the steps the
pipeline ran, which the checkpoints record.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import askexpert.training.forecast as forecast
from askexpert.config import SystemConfig
from askexpert.errors import ConfigError
from askexpert.models import read_meta
from askexpert.system import SystemDir
from askexpert.training.forecast import Job, fit_factor, folder_counts, refit_factor
from conftest import load_benchmark


def _sizes(system: SystemDir) -> tuple[int, int, int]:
    splits = system.splits()
    return len(splits.train) + len(splits.val), len(splits.test), splits.train.num_classes


def test_forecast_counts_the_optimizer_steps_the_checkpoints_record(trained_system: Path) -> None:
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


def test_forecast_times_every_job_in_the_real_training_loop(
    trained_system: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    system = SystemDir.open(trained_system)
    capsys.readouterr()
    jobs = forecast.forecast(system.config(), 1, *_sizes(system), (0, 0), steps=2, warmup=1)
    assert [j.stage for j in jobs] == [p[0] for p in forecast.planned_work(system.config(), 1, *_sizes(system), (0, 0))]
    assert all(j.seconds_per_unit > 0 and j.seconds == j.count * j.seconds_per_unit for j in jobs)
    bars = capsys.readouterr().err
    assert "timing" in bars and "step/s" not in bars  # one bar over the jobs; the timed loops draw none


def _jobs(training_s: float, inference_s: float) -> list[Job]:
    return [
        Job("stage 1", "steps", 100, training_s / 100, trains=True),
        Job("evaluate", "images", 1000, inference_s / 1000, trains=False),
    ]


def test_the_fit_scales_only_the_training_to_what_the_budget_leaves() -> None:
    jobs = _jobs(training_s=200.0, inference_s=20.0)
    # 100 s budget: 20 s inference, 10 s spent, 10 % untimed -> 60 s for 200 s of training
    assert fit_factor(jobs, 100.0, spent_s=10.0, untimed_share=0.1) == pytest.approx(0.3)
    assert fit_factor(jobs, 1000.0, untimed_share=0.1) == 1.0  # a fast enough host trains the config as written
    with pytest.raises(ConfigError, match="leaves no time to train on this machine: inference 0.3 min"):
        fit_factor(jobs, 25.0, spent_s=5.0, untimed_share=0.0)
    with pytest.raises(ConfigError, match="budget must be positive"):
        fit_factor(jobs, 0.0)


def _staged_jobs() -> list[Job]:
    return [
        Job("pretrain backbones", "steps", 100, 1.0, trains=True),
        Job("stage 1", "steps", 600, 1.0, trains=True),
        Job("train generalist", "steps", 200, 1.0, trains=True),
        Job("train experts", "steps", 100, 1.0, trains=True),
        Job("evaluate", "images", 60, 1.0, trains=False),
    ]


def test_the_fit_corrected_for_the_first_stages_pace_shrinks_only_what_is_left() -> None:
    jobs, done = _staged_jobs(), ("pretrain backbones", "stage 1")
    # 1000 s budget, 10 s spent, 10 % untimed: 830 s for 1000 s of training
    factor = fit_factor(jobs, 1000.0, spent_s=10.0, untimed_share=0.1)
    assert factor == pytest.approx(0.83)

    def refit(pace: float, untimed_done: float = 20.0) -> float:
        measured = pace * 700 * factor
        elapsed = 10.0 + measured + untimed_done
        fixed = refit_factor(jobs, factor, done, measured, 1000.0, elapsed, untimed_share=0.1)
        assert fixed.pace == pytest.approx(pace) and fixed.done == done
        return fixed.factor

    assert refit(1.0) == factor  # at the forecast's pace, untimed work within its share: no change
    assert refit(0.9) == factor  # a fast run keeps the fitted epochs
    # 10 % slower: 669.1 s elapsed, 90 % of the 330.9 s left for the rest at that pace, 1.1 x (300 x f + 60 s)
    assert refit(1.1) == pytest.approx(((1000.0 - 669.1) * 0.9 / 1.1 - 60.0) / 300.0)
    assert refit(1.1, untimed_done=120.0) < refit(1.1)  # untimed work past its share is made up too
    with pytest.raises(ConfigError, match=r"at 1.60x the forecast's time, the .* cannot cover the remaining inference"):
        refit(1.6)


def test_the_benchmark_corrects_its_fit_once_and_keeps_the_correction(
    tmp_path: Path, micro_config: SystemConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = load_benchmark("cifar100_cpu")
    factor = fit_factor(_staged_jobs(), 1000.0, spent_s=10.0, untimed_share=0.06)
    fit = {"factor": factor, "budget_min": 1000.0 / 60, "projected_min": 1060.0 / 60, "spent_before_training_s": 10.0}
    fit |= {"jobs": [j.record() for j in _staged_jobs()]}
    cfg = micro_config.with_epochs_scaled(factor)
    out = tmp_path / "out"
    ran = []

    def first_stages(system: SystemDir, log: object) -> dict[str, float]:
        ran.append(system.root)
        return {"data": 1.0, "pretrain backbones": 1.1 * 100 * factor, bench.STAGE1: 1.1 * 600 * factor}

    monkeypatch.setattr(bench, "run_first_stages", first_stages)
    elapsed = 10.0 + 1.1 * 700 * factor + 20.0
    fixed, timings = bench.refit_to_pace(cfg, out, 0, fit, lambda: elapsed)
    assert ran == [out / "seed0"] and timings["pretrain backbones"] == pytest.approx(110 * factor)
    refit = json.loads((out / "fit.json").read_text())["refit"]
    assert refit["done"] == ["pretrain backbones", "stage 1"] and refit["stages"] == ["generalist", "experts"]
    assert refit["pace"] == pytest.approx(1.1) and refit["factor"] < factor
    shrink = refit["factor"] / factor
    assert fixed.generalist_training.epochs == pytest.approx(cfg.generalist_training.epochs * shrink)
    assert fixed.expert_training.epochs == pytest.approx(cfg.expert_training.epochs * shrink)
    assert fixed.expert_training.shared_epochs == cfg.expert_training.shared_epochs  # stage 1 has run
    assert fixed.backbone.training.epochs == cfg.backbone.training.epochs
    # a resumed run takes the kept correction without timing anything again
    again, timings = bench.refit_to_pace(cfg, out, 0, json.loads((out / "fit.json").read_text()), lambda: 1e9)
    assert again == fixed and timings == {} and len(ran) == 1
    assert f"trained epochs x {refit['factor']:.3f}" in bench.fit_line({"fit": {**fit, "refit": refit}})


def test_epochs_scaled_is_a_validated_copy_of_every_epoch_count(micro_config: SystemConfig) -> None:
    half = micro_config.with_epochs_scaled(0.5)
    assert half.generalist_training.epochs == micro_config.generalist_training.epochs / 2
    assert half.expert_training.epochs == micro_config.expert_training.epochs / 2
    assert half.expert_training.shared_epochs == micro_config.expert_training.shared_epochs / 2
    assert half.backbone.training.epochs == micro_config.backbone.training.epochs / 2
    assert half.model_dump(exclude={"generalist_training", "expert_training", "backbone"}) == micro_config.model_dump(
        exclude={"generalist_training", "expert_training", "backbone"}
    )
    assert micro_config.generalist_training.epochs == 3  # the original is untouched
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="epoch factor must be a positive number"):
            micro_config.with_epochs_scaled(bad)
    late = micro_config.with_epochs_scaled(0.5, ("generalist", "experts"))
    assert late.generalist_training.epochs == micro_config.generalist_training.epochs / 2
    assert late.expert_training.epochs == micro_config.expert_training.epochs / 2
    assert late.expert_training.shared_epochs == micro_config.expert_training.shared_epochs
    assert late.backbone.training.epochs == micro_config.backbone.training.epochs
    with pytest.raises(ConfigError, match="unknown stage.s. stage2: the epoch counts are backbone, stage1"):
        micro_config.with_epochs_scaled(0.5, ("stage2",))


def test_folder_counts_read_the_listing(tmp_path: Path) -> None:
    for split, per_class in (("train", 3), ("test", 2)):
        for name in ("apple", "bear"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"{i}.png").write_bytes(b"not decoded")
    (tmp_path / "train" / "apple" / "notes.txt").write_text("not an image: the loader skips it")
    assert folder_counts(tmp_path) == (6, 4, 2)
    with pytest.raises(ConfigError, match="no class folders under train/"):
        folder_counts(tmp_path / "missing")


def test_the_benchmark_reuses_its_fit_while_nothing_it_depends_on_changed(
    tmp_path: Path, micro_config: SystemConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = load_benchmark("cifar100_cpu")
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            (tmp_path / "data" / split / name / "0.png").write_bytes(b"x")
    cfg = micro_config.model_copy(
        update={"data": micro_config.data.model_copy(update={"root": str(tmp_path / "data")})}
    )
    calls = []

    def timed(cfg_: SystemConfig, seeds: int, train: int, test: int, classes: int, *_: object, **__: object):
        calls.append((seeds, train, test, classes))
        return _jobs(training_s=600.0, inference_s=60.0)

    monkeypatch.setattr(forecast, "forecast", timed)
    out = tmp_path / "out"
    first = bench.fit_to_budget(cfg, out, 2, 10.0, spent_s=0.0)
    assert calls == [(2, 2, 2, 2)]  # counted from the listing
    assert first["factor"] == pytest.approx(fit_factor(_jobs(600.0, 60.0), 600.0, first["spent_before_training_s"]))
    assert first["factor"] < 1 and (out / "fit.json").is_file()
    kept = json.loads((out / "fit.json").read_text())["jobs"]
    assert kept == [j.record() for j in _jobs(600.0, 60.0)]  # the same shape as budget_forecast.py --out's
    assert [Job.from_record(r) for r in kept] == _jobs(600.0, 60.0)  # and read back as the jobs they were
    assert kept[0] == {
        "stage": "stage 1",
        "what": "steps",
        "count": 100,
        "seconds_per_unit": 6.0,
        "trains": True,
        "seconds": 600.0,
    }
    again = bench.fit_to_budget(cfg, out, 2, 10.0, spent_s=0.0)
    assert again["factor"] == first["factor"] and len(calls) == 1  # a resumed run trains the same epochs
    bench.fit_to_budget(cfg, out, 2, 12.0, spent_s=0.0)
    bench.fit_to_budget(cfg.with_epochs_scaled(2.0), out, 2, 12.0, spent_s=0.0)
    assert len(calls) == 3  # another budget or config is fitted anew
    line = bench.fit_line({"fit": first})
    assert f"Epochs x {first['factor']:.3f}" in line and "projected 11.0 min" in line


def test_a_budget_too_small_for_the_inference_alone_stops_the_benchmark_in_one_line(
    tmp_path: Path, micro_config: SystemConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = load_benchmark("cifar100_cpu")
    for split in ("train", "test"):
        (tmp_path / "data" / split / "a").mkdir(parents=True)
        (tmp_path / "data" / split / "a" / "0.png").write_bytes(b"x")
    micro_config.to_yaml(tmp_path / "config.yaml")
    monkeypatch.setattr(forecast, "forecast", lambda *_, **__: _jobs(training_s=60.0, inference_s=3600.0))
    argv = ["cifar100_cpu.py", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    monkeypatch.setattr("sys.argv", [*argv, "--config", str(tmp_path / "config.yaml"), "--fit-minutes", "30"])
    with pytest.raises(SystemExit, match=r"^--fit-minutes 30: the 30.0-minute budget leaves no time to train"):
        bench.main()
    assert not (tmp_path / "out" / "seed0").exists()  # nothing trained


def test_the_timing_rounds_are_interleaved_and_a_spell_of_the_host_is_set_aside() -> None:
    calls: list[str] = []
    # the host runs twice as slow during the second round: every kind meets that spell once
    base = {"stage 1": 0.2, "experts": 0.4}

    def measure(kind: str) -> float:
        calls.append(kind)
        return base[kind] * (2.0 if 2 < len(calls) <= 4 else 1.0)

    assert forecast.interleaved_median(["stage 1", "experts"], 3, measure) == {"stage 1": 0.2, "experts": 0.4}
    assert calls == ["stage 1", "experts"] * 3  # round-robin, not three in a row of one kind
    with pytest.raises(ConfigError, match="at least one round"):
        forecast.interleaved_median(["stage 1"], 0, measure)
