"""A schedule's `average_start`: the trained expert's body averaged with the weights it started from."""

from __future__ import annotations

import pytest
import torch

from askexpert.config import Schedule, Stage, SynthConfig, SystemConfig
from askexpert.data import synth
from askexpert.errors import CheckpointError, ConfigError
from askexpert.models import create_model
from askexpert.training.experts import average_with_start, body_weights, head_swap, train_expert


def _head_names(model: torch.nn.Module) -> set[str]:
    return {n for n, _ in model.backbone.named_parameters() if n.startswith("head.")}


def test_average_start_is_left_out_of_dumps_while_off_and_validated() -> None:
    plain = Schedule(init="shared", stages=[Stage(fraction=1.0)])
    assert "average_start" not in plain.model_dump()  # experts trained before the option stay current
    on = Schedule.model_validate(plain.model_dump() | {"average_start": 0.3})
    assert on.model_dump()["average_start"] == 0.3
    raw = SystemConfig().model_dump(mode="json")
    for bad in (-0.1, 1.0):
        raw["expert_training"]["schedules"]["progressive"]["average_start"] = bad
        with pytest.raises(ConfigError, match="average_start"):
            SystemConfig.from_dict(raw)


def test_average_with_start_mixes_the_body_and_keeps_the_trained_head() -> None:
    torch.manual_seed(0)
    start_model = create_model("micro-cct-expert", 5)
    start = body_weights(start_model)
    assert start and not (set(start) & _head_names(start_model))  # the body only
    trained = create_model("micro-cct-expert", 5)  # other random weights stand in for the trained ones
    before = {n: p.detach().clone() for n, p in trained.backbone.named_parameters()}
    average_with_start(trained, start, 0.25)
    for name, param in trained.backbone.named_parameters():
        if name in start:
            assert torch.allclose(param, 0.75 * before[name] + 0.25 * start[name], atol=1e-6), name
        else:
            assert torch.equal(param, before[name]), name  # the head is untouched
    assert _head_names(trained) == {"head.weight", "head.bias"}
    with pytest.raises(ConfigError, match="average_start must be in"):
        average_with_start(trained, start, 1.0)
    other_body = body_weights(create_model("micro-expert", 5))  # another preset: shapes differ
    with pytest.raises(CheckpointError, match="cannot average with the start"):
        average_with_start(trained, other_body, 0.5)


def test_an_expert_trained_with_average_start_is_the_average_of_the_same_run_and_its_start() -> None:
    """Training is deterministic at a fixed seed, so the option's expert is exactly (1 − s)·trained + s·start."""

    def config(share: float) -> SystemConfig:
        return SystemConfig.from_dict(
            {
                "expert": {"preset": "micro-cct-expert"},
                "expert_training": {
                    "epochs": 2,
                    "batch_size": 8,
                    "shared_epochs": 1,
                    "schedules": {
                        "progressive": {"init": "shared", "stages": [{"fraction": 1.0}], "average_start": share}
                    },
                },
            }
        )

    splits = synth.generate(SynthConfig(num_groups=2, classes_per_group=2, train_per_class=12, test_per_class=4))
    train, val = splits["train"], splits["test"]  # 4 classes; the test split stands in for validation
    torch.manual_seed(1)
    stage1 = create_model("micro-cct-expert", 4)
    subset = (1, 3)
    runs = {
        share: train_expert(config(share), train, val, subset, 0, "progressive", torch.device("cpu"), stage1=stage1)
        for share in (0.0, 0.4)
    }
    start = body_weights(head_swap(stage1, subset, "micro-cct-expert"))
    plain, averaged = (dict(runs[s].model.backbone.named_parameters()) for s in (0.0, 0.4))
    moved = 0
    for name, param in averaged.items():
        if name in start:
            assert torch.allclose(param, 0.6 * plain[name] + 0.4 * start[name], atol=1e-5), name
            moved += int(not torch.allclose(plain[name], start[name]))
        else:
            assert torch.equal(param, plain[name]), name  # the head as trained
    assert moved > 0  # training moved the body, so the average differs from both
