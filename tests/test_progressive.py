"""Progressive specialists: head swap, plan composition, the "other" correction, pretrained starts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from askexpert.config import Schedule, Stage, SystemConfig
from askexpert.errors import CheckpointError, ConfigError
from askexpert.models import create_model
from askexpert.protocol import softmax
from askexpert.training.experts import head_swap, other_logit_correction
from askexpert.training.plans import plan_schedule


def _random_head(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    head = model.backbone.get_classifier()
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g))
        head.bias.copy_(torch.randn(head.bias.shape, generator=g))


def test_head_swap_keeps_body_and_subset_rows_and_builds_other_from_the_rest() -> None:
    torch.manual_seed(0)
    source = create_model("micro-expert", 12)
    _random_head(source)
    subset = (7, 1, 4)
    expert = head_swap(source, subset, "micro-expert")
    assert expert.num_outputs == 4
    src, dst = source.backbone.state_dict(), expert.backbone.state_dict()
    for key in src:
        if not key.startswith("head."):
            assert torch.equal(src[key], dst[key]), key
    rest = [c for c in range(12) if c not in subset]
    w, b = src["head.weight"], src["head.bias"]
    assert torch.equal(dst["head.weight"][:3], w[list(subset)])
    assert torch.allclose(dst["head.weight"][3], w[rest].mean(0))
    assert dst["head.bias"][3].item() == pytest.approx(b[rest].mean().item() + math.log(len(rest)), abs=1e-5)
    # The subset logits are the all-class model's logits for those classes, in subset order.
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(expert.eval()(images)[:, :3], source.eval()(images)[:, list(subset)], atol=1e-5)


def test_head_swap_rejects_a_subset_outside_the_stage1_classes() -> None:
    with pytest.raises(CheckpointError, match="reaches class 12"):
        head_swap(create_model("micro-expert", 12), (0, 12), "micro-expert")


def test_plan_composition_narrows_and_draws_routed_others() -> None:
    labels = np.repeat(np.arange(10), 100)
    inside = np.flatnonzero(labels < 2)
    outside = np.flatnonzero(labels >= 2)
    routed = outside[labels[outside] == 3]  # pretend the router only confuses class 3 with this expert
    stages = [Stage(fraction=0.4, subset_share=0.5), Stage(fraction=0.6, subset_share=0.75, others="routed")]
    plan = plan_schedule(inside, outside, stages, 50, 40, seed=0, routed=routed)
    share = np.isin(plan, inside).mean(axis=1)
    assert np.allclose(share[:20], 0.5) and np.allclose(share[20:], 0.75)
    first_others = plan[:20][~np.isin(plan[:20], inside)]
    late_others = plan[20:][~np.isin(plan[20:], inside)]
    assert len(np.unique(labels[first_others])) > 3  # `all`: every other class shows up
    assert set(labels[late_others].tolist()) == {3}  # `routed`: only the confusable class
    # Fewer routed samples than a batch: the stage falls back to every out-of-subset sample.
    small = plan_schedule(inside, outside, stages, 50, 40, seed=0, routed=routed[:5])
    assert len(np.unique(labels[small[20:][~np.isin(small[20:], inside)]])) > 3


def test_other_correction_turns_the_trained_prior_into_the_deployed_one() -> None:
    assert other_logit_correction(0.25, 0.25) == pytest.approx(0.0)
    assert other_logit_correction(0.25, 0.6) > 0 > other_logit_correction(0.6, 0.25)
    # Odds of "other" against the subset as a whole change by exactly the ratio of prior odds.
    logits = np.array([[1.0, 0.5, -0.2, 0.3]])
    shift = other_logit_correction(0.25, 0.5)
    corrected = logits.copy()
    corrected[0, -1] += shift
    p, q = softmax(logits)[0], softmax(corrected)[0]
    odds_before, odds_after = p[-1] / p[:-1].sum(), q[-1] / q[:-1].sum()
    assert odds_after / odds_before == pytest.approx((0.5 / 0.5) / (0.25 / 0.75))


def test_schedules_are_data_and_bare_lists_still_load() -> None:
    cfg = SystemConfig.from_dict({"expert_training": {"epochs": 1, "schedules": {"old": [{"fraction": 1.0}]}}})
    assert cfg.expert_training.schedules["old"] == Schedule(init="pretrained", stages=[Stage(fraction=1.0)])
    with pytest.raises(ConfigError, match=r"schedules.x.init"):
        SystemConfig.from_dict(
            {"expert_training": {"epochs": 1, "schedules": {"x": {"init": "magic", "stages": [{"fraction": 1.0}]}}}}
        )


def test_pretrained_file_must_match_the_body(tmp_path: Path) -> None:
    import safetensors.torch

    empty = tmp_path / "empty.safetensors"
    safetensors.torch.save_file({}, str(empty))
    with pytest.raises(CheckpointError, match="holds no tensors"):
        create_model("micro-generalist", 3, pretrained_file=empty)
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file(create_model("micro-expert", 3).backbone.state_dict(), str(other))
    with pytest.raises(CheckpointError, match="has shape"):
        create_model("micro-generalist", 3, pretrained_file=other)
    partial = {k: v for k, v in create_model("micro-generalist", 7).backbone.state_dict().items() if "blocks" not in k}
    safetensors.torch.save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensors missing \(blocks\.0"):
        create_model("micro-generalist", 3, pretrained_file=tmp_path / "partial.safetensors")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not weights at all")
    with pytest.raises(CheckpointError, match="junk.bin: not a readable weights file"):
        create_model("micro-generalist", 3, pretrained_file=junk)


def test_pretrained_file_reports_what_it_loaded(tmp_path: Path) -> None:
    import safetensors.torch

    donor = create_model("micro-generalist", 7)
    file = tmp_path / "donor.pt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in donor.backbone.state_dict().items()}}, file)
    model = create_model("micro-generalist", 3, pretrained_file=file)
    report = model.init_report
    assert report is not None
    total = len(model.backbone.state_dict())
    assert (report.loaded, report.total, report.head_left_out) == (total - 2, total, ("head.weight", "head.bias"))
    assert f"loaded {total - 2} of {total} tensors" in report.describe()
    same = tmp_path / "same.safetensors"
    safetensors.torch.save_file(donor.backbone.state_dict(), str(same))
    assert create_model("micro-generalist", 7, pretrained_file=same).init_report.loaded == total  # type: ignore[union-attr]


def test_presets_have_the_papers_cost_ratio() -> None:
    from askexpert.models.registry import model_cost

    gen, exp = model_cost("cpu-generalist"), model_cost("cpu-expert")
    ratio = exp["flops"] / gen["flops"]
    deit = model_cost("deit-small")["flops"] / model_cost("deit-tiny")["flops"]
    assert abs(ratio - deit) / deit < 0.1  # the paper's pair, at CPU scale
    assert exp["params"] > 3 * gen["params"]
