import numpy as np
import pytest
import torch

from askexpert.config import Stage, SystemConfig
from askexpert.errors import ConfigError
from askexpert.training.augment import crop_flip
from askexpert.training.experts import expert_plan
from askexpert.training.loop import lr_factor
from askexpert.training.plans import budget_steps, expert_targets, plan_schedule, stage_steps


def test_static_and_progressive_get_the_same_budget() -> None:
    cfg = SystemConfig()
    labels = np.repeat(np.arange(100), 30)
    subset = tuple(range(0, 100, 5))
    static = expert_plan(cfg, labels, subset, "static", seed=0)
    progressive = expert_plan(cfg, labels, subset, "progressive", seed=0)
    assert static.shape == progressive.shape
    assert static.shape[0] == budget_steps(cfg.expert_training.epochs, 600, cfg.expert_training.batch_size)
    assert np.isin(labels[static], subset).all()  # static never sees another class
    with pytest.raises(ConfigError, match="unknown schedule 'warp'"):
        expert_plan(cfg, labels, subset, "warp", seed=0)


def test_edge_error_repeats_draw_the_generalists_errors_more_often_in_the_same_steps() -> None:
    raw = SystemConfig().model_dump(mode="json")
    plain = SystemConfig.from_dict(raw)
    raw["expert_training"]["schedules"]["static"]["edge_error_repeats"] = 2
    cfg = SystemConfig.from_dict(raw)
    labels = np.repeat(np.arange(10), 60)
    subset = (0, 1, 2, 3, 4)
    wrong = np.zeros(len(labels), dtype=bool)
    wrong[np.flatnonzero(labels < 5)[::4]] = True  # a quarter of the subset's images are the edge's errors
    plan = expert_plan(cfg, labels, subset, "static", seed=0, edge_wrong=wrong)
    assert plan.shape == expert_plan(plain, labels, subset, "static", seed=0).shape  # the budget is the images'
    seen = np.bincount(plan.ravel(), minlength=len(labels))
    ratio = seen[wrong].mean() / seen[np.isin(labels, subset) & ~wrong].mean()
    assert 2.5 < ratio < 3.5  # each error 1 + 2 times per pass
    with pytest.raises(ConfigError, match="repeats the generalist's errors"):
        expert_plan(cfg, labels, subset, "static", seed=0)
    # off, the option is left out of the schedule's dump: checkpoints trained before it stay current
    assert "edge_error_repeats" not in plain.expert_training.schedules["static"].model_dump()
    assert cfg.expert_training.schedules["static"].needs_routing
    assert not plain.expert_training.schedules["static"].needs_routing
    raw["expert_training"]["schedules"]["static"]["edge_error_repeats"] = -1
    with pytest.raises(ConfigError, match="edge_error_repeats"):
        SystemConfig.from_dict(raw)


def test_progressive_share_of_subset_rises_stage_by_stage() -> None:
    labels = np.repeat(np.arange(10), 100)
    inside = np.flatnonzero(labels < 2)
    outside = np.flatnonzero(labels >= 2)
    stages = [
        Stage(fraction=0.5, subset_share=None),
        Stage(fraction=0.25, subset_share=0.5),
        Stage(fraction=0.25, subset_share=1.0),
    ]
    plan = plan_schedule(inside, outside, stages, 40, 50, seed=0)
    share = np.isin(plan, inside).mean(axis=1)
    assert stage_steps(stages, 40) == [20, 10, 10]
    assert 0.1 < share[:20].mean() < 0.3  # natural share is 0.2
    assert np.allclose(share[20:30], 0.5) and np.allclose(share[30:], 1.0)


def test_plan_samples_without_replacement_within_a_pass() -> None:
    plan = plan_schedule(np.arange(100), np.empty(0, np.int64), [Stage(fraction=1.0)], 4, 25, seed=3)
    assert sorted(plan.ravel().tolist()) == list(range(100))


def test_expert_targets_map_subset_and_other() -> None:
    labels = np.array([5, 2, 9, 7, 2])
    assert expert_targets(labels, (2, 7)).tolist() == [2, 0, 2, 1, 0]


def test_augment_keeps_shape_and_pixels() -> None:
    x = torch.arange(2 * 8 * 8 * 3, dtype=torch.int64).remainder(250).add(1).to(torch.uint8).view(2, 8, 8, 3)
    out = crop_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    nonzero = out[out > 0]
    assert torch.isin(nonzero, x).all()  # only shifted/flipped source pixels or zero padding


def test_lr_schedule_warms_up_then_decays() -> None:
    values = [lr_factor(s, 100, 10) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False)) and values[-1] < 0.01


def test_training_is_reproducible_from_the_seed(tmp_path) -> None:
    import safetensors.torch

    from askexpert.system import SystemDir
    from askexpert.training.generalist import train_generalist
    from conftest import MICRO

    weights = []
    for i in range(2):
        system = SystemDir.create(tmp_path / str(i), SystemConfig.from_dict(MICRO))
        train_generalist(system)
        weights.append(safetensors.torch.load_file(str(system.generalist_path)))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
