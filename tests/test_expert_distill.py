"""A schedule's `distill`: experts trained against stage 1's logits folded onto subset + "other"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from askexpert.config import Schedule, Stage, SystemConfig
from askexpert.errors import CheckpointError, ConfigError


def test_fold_teacher_keeps_the_subset_and_merges_the_rest_into_other() -> None:
    from askexpert.training.experts import fold_teacher

    # one teacher row with probabilities 0.5 / 0.2 / 0.3 / 0.0 over four classes (log-probabilities as logits)
    probs = np.array([[0.5, 0.2, 0.3, 1e-12]], np.float32)
    folded = fold_teacher(np.log(probs), (2, 0))
    # the expert's outputs: class 2, class 0, then "other" = classes 1 and 3 together
    assert torch.from_numpy(folded).softmax(1).numpy() == pytest.approx(np.array([[0.3, 0.5, 0.2]]), abs=1e-6)
    everything = torch.from_numpy(fold_teacher(np.log(probs), (0, 1, 2, 3))).softmax(1).numpy()
    assert everything[0, -1] == pytest.approx(0.0, abs=1e-9)  # nothing outside the subset: "other" gets no mass
    with pytest.raises(CheckpointError, match="do not cover subset class 4"):
        fold_teacher(np.log(probs), (0, 4))


def test_schedule_distill_is_left_out_of_dumps_while_off() -> None:
    plain = Schedule(init="shared", stages=[Stage(fraction=1.0)])
    assert "distill" not in plain.model_dump()  # experts trained before the option stay current
    taught = Schedule.model_validate(plain.model_dump() | {"distill": {"teacher": "stage1", "alpha": 0.5}})
    assert taught.distills and taught.model_dump()["distill"]["teacher"] == "stage1"
    off = Schedule(init="shared", stages=[Stage(fraction=1.0)], distill={"teacher": "stage1", "alpha": 0.0})
    assert not off.distills and "distill" not in off.model_dump()  # alpha 0 is no teacher at all


def test_schedule_distill_cannot_be_combined_with_mixup() -> None:
    raw = {
        "expert_training": {
            "epochs": 1,
            "mixup": 0.2,
            "schedules": {
                "progressive": {
                    "init": "shared",
                    "stages": [{"fraction": 1.0}],
                    "distill": {"teacher": "stage1"},
                }
            },
        }
    }
    with pytest.raises(ConfigError, match="distill of schedule.s. progressive"):
        SystemConfig.from_dict(raw)
    generalist = {"generalist_training": {"epochs": 1, "mixup": 0.2}}
    with pytest.raises(ConfigError, match="generalist_training: mixup/cutmix cannot be combined with distill"):
        SystemConfig.from_dict(generalist | {"distill": {"teacher": "stage1", "alpha": 0.5}})
    assert not SystemConfig.from_dict(generalist | {"distill": {"teacher": "stage1", "alpha": 0.0}}).distill.active


def _kl_to_folded_teacher(system_root: Path, schedule: str, teacher: np.ndarray) -> float:
    from askexpert.models import load_checkpoint, predict_logits
    from askexpert.system import SystemDir
    from askexpert.training.experts import fold_teacher

    system = SystemDir.open(system_root)
    part, train = system.partition(), system.splits().train
    kls = []
    for eid, subset in zip(part.expert_ids, part.subsets, strict=True):
        model, _ = load_checkpoint(system.expert_path(schedule, eid))
        student = torch.from_numpy(predict_logits(model, train.images)).log_softmax(1)
        target = torch.from_numpy(fold_teacher(teacher, subset)).log_softmax(1)
        kls.append(float(torch.nn.functional.kl_div(student, target, reduction="batchmean", log_target=True)))
    return float(np.mean(kls))


@pytest.mark.slow
def test_micro_system_distills_its_experts_from_stage1(tmp_path: Path) -> None:
    from askexpert.models import load_checkpoint, predict_logits
    from askexpert.system import SystemDir
    from askexpert.training.experts import train_experts
    from askexpert.training.generalist import train_generalist
    from askexpert.training.partition_stage import build_partition
    from conftest import MICRO

    # two schedules alike but for the teacher (no "other" correction: it would move the logits after training)
    plain = {"init": "shared", "stages": [{"fraction": 1.0, "subset_share": 0.5}]}
    taught = {**plain, "distill": {"teacher": "stage1", "mode": "soft", "alpha": 0.9, "temperature": 1.0}}
    raw = dict(MICRO, expert_training={**MICRO["expert_training"], "epochs": 8, "schedules": {"plain": plain}})
    system = SystemDir.create(tmp_path / "sys", SystemConfig.from_dict(raw))
    train_generalist(system)
    build_partition(system)
    plain_metas = train_experts(system, "plain")
    stage1, stage1_meta = load_checkpoint(system.stage1_path)
    teacher = predict_logits(stage1, system.splits().train.images)

    system.update_config("test", expert_training={"schedules": {"plain": plain, "taught": taught}})
    assert [m.sha256 for m in train_experts(system, "plain")] == [m.sha256 for m in plain_metas]  # still current
    taught_metas = train_experts(system, "taught")
    assert load_checkpoint(system.stage1_path)[1].sha256 == stage1_meta.sha256  # the teacher was reused
    assert all(m.extra["schedule"]["distill"]["alpha"] == 0.9 for m in taught_metas)
    kl_plain = _kl_to_folded_teacher(system.root, "plain", teacher)
    kl_taught = _kl_to_folded_teacher(system.root, "taught", teacher)
    assert kl_taught < 0.7 * kl_plain, (kl_taught, kl_plain)
