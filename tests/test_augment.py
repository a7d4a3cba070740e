"""The stronger augmentation options: what they do to a batch, how they are configured, and
that they leave earlier checkpoints' fingerprints alone."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from askexpert.config import ExpertTrainConfig, SystemConfig, TrainConfig
from askexpert.errors import ConfigError
from askexpert.models import create_model
from askexpert.system import SystemDir
from askexpert.training.augment import RANDAUGMENT_GROUP, Augmenter, stochastic_depth, token_dropout
from askexpert.training.loop import train_model
from askexpert.training.shared import shared_stage_fingerprint, stage1_training


def _batch(n: int = 6) -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8))


def test_randaugment_changes_pixels_and_repeats_from_the_seed() -> None:
    cfg = TrainConfig(epochs=1, augment=False, randaugment_ops=2, randaugment_magnitude=9)
    x = _batch()
    first = Augmenter(cfg, 10, seed=3).images(x)
    again = Augmenter(cfg, 10, seed=3).images(x)
    assert first.shape == x.shape and first.dtype == torch.uint8
    assert not torch.equal(first, x)
    assert torch.equal(first, again)


def test_randaugment_draws_its_ops_per_group_of_images() -> None:
    # identical images, no crop/flip: members of one group come out alike, the groups do not all agree
    cfg = TrainConfig(epochs=1, augment=False, randaugment_ops=2, randaugment_magnitude=9)
    x = _batch(1).expand(8 * RANDAUGMENT_GROUP, -1, -1, -1).contiguous()
    out = Augmenter(cfg, 10, seed=0).images(x)
    groups = out.split(RANDAUGMENT_GROUP)
    assert all(torch.equal(image, group[0]) for group in groups for image in group)
    assert len({g[0].numpy().tobytes() for g in groups}) > 1


def test_mixup_gives_float_images_and_soft_targets_that_sum_to_one() -> None:
    cfg = TrainConfig(epochs=1, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    aug = Augmenter(cfg, 4, seed=0)
    x, labels = _batch(7), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    mixed, soft = aug.mix(x, labels)
    assert mixed.shape == x.shape and mixed.dtype == torch.float32
    assert soft.shape == (7, 4)
    assert torch.allclose(soft.sum(1), torch.ones(7))
    assert (soft[:6].max(1).values < 0.95).any()  # at least one pair mixed two labels
    # the odd batch's last image is left as it was, with its smoothed one-hot target
    assert torch.equal(mixed[6], x[6].float())
    assert soft[6].argmax() == 2 and soft[6, 2] == pytest.approx(0.9 + 0.1 / 4)


def test_without_mixing_the_labels_stay_indices() -> None:
    aug = Augmenter(TrainConfig(epochs=1), 4, seed=0)
    x, labels = _batch(), torch.arange(6) % 4
    assert aug.mix(x, labels) == (x, labels)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"randaugment_ops": 9}, "randaugment_ops"),
        ({"mixup": -1.0}, "mixup"),
        ({"token_drop": 1.0}, "token_drop"),
        ({"drop_path": -0.1}, "drop_path"),
        ({"shared_augment": {"randaugment_ops": 2, "rotate": 10}}, "rotate"),
    ],
)
def test_bad_augmentation_options_fail_in_one_line(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        SystemConfig.from_dict({"expert_training": {"epochs": 1, **changes}})
    assert "\n" not in str(err.value)


def test_mixing_the_distilled_generalist_is_refused() -> None:
    with pytest.raises(ConfigError, match="mixup/cutmix cannot be combined with distill.teacher 'stage1'"):
        SystemConfig.from_dict({"distill": {"teacher": "stage1"}, "generalist_training": {"epochs": 1, "mixup": 0.2}})


def test_options_that_are_off_leave_dumps_and_fingerprints_as_they_were() -> None:
    plain = ExpertTrainConfig(epochs=1).model_dump()
    off = {"randaugment_ops", "randaugment_magnitude", "mixup", "cutmix", "token_drop", "drop_path", "shared_augment"}
    assert not off & set(plain)
    on = ExpertTrainConfig(epochs=1, randaugment_ops=1, cutmix=1.0)
    assert {"randaugment_ops": 1, "randaugment_magnitude": 5, "cutmix": 1.0}.items() <= on.model_dump().items()
    # the experts' own augmentation does not reach stage 1 unless shared_augment says so
    assert stage1_training(on).model_dump() == stage1_training(ExpertTrainConfig(epochs=1)).model_dump()
    assert stage1_training(on.model_copy(update={"shared_augment": True})).cutmix == 1.0


def test_stage1_can_have_augmentation_of_its_own(tmp_path: Path) -> None:
    """`shared_augment: {...}` gives stage 1 its settings and keeps the experts' own out of it, and
    stage 1's fingerprint follows them (so a stage 1 trained without them is retrained)."""
    raw = {"expert_training": {"epochs": 1, "cutmix": 1.0, "shared_augment": {"randaugment_ops": 2}}}
    cfg = SystemConfig.from_dict(raw)
    stage1 = stage1_training(cfg.expert_training)
    assert (stage1.randaugment_ops, stage1.randaugment_magnitude, stage1.cutmix) == (2, 5, 0.0)
    assert cfg.expert_training.cutmix == 1.0 and cfg.expert_training.randaugment_ops == 0

    def key(shared_augment: object) -> str:
        changed = SystemConfig.from_dict(
            {"expert_training": {**raw["expert_training"], "shared_augment": shared_augment}}
        )
        return shared_stage_fingerprint(SystemDir.create(tmp_path / "system", changed, overwrite=True), changed)

    keys = {
        key(False),
        key(True),
        key({"randaugment_ops": 2}),
        key({"randaugment_ops": 2, "randaugment_magnitude": 9}),
        key({"randaugment_ops": 2, "token_drop": 0.5}),
        key({"randaugment_ops": 2, "drop_path": 0.1}),
    }
    assert len(keys) == 6
    assert key(False) == key(False)


def test_stage1_key_follows_the_learning_rate_and_seed_it_trains_with(tmp_path: Path) -> None:
    """With `shared_lr` set, the experts' `lr` does not reach stage 1, so changing it must not retrain stage 1
    (nor the generalist it teaches); without `shared_lr`, stage 1 trains at `lr`, and its key follows it."""

    def key(**tc: float) -> str:
        cfg = SystemConfig.from_dict({"expert_training": {"epochs": 1, **tc}})
        assert stage1_training(cfg.expert_training).lr == tc.get("shared_lr", tc["lr"])
        return shared_stage_fingerprint(SystemDir.create(tmp_path / "system", cfg, overwrite=True), cfg)

    assert key(lr=1e-3, shared_lr=4e-3) == key(lr=2e-3, shared_lr=4e-3)
    assert key(lr=2e-3, shared_lr=4e-3) != key(lr=2e-3, shared_lr=3e-3)
    assert key(lr=1e-3) != key(lr=2e-3)
    # and the seed: the expert stage's, unless shared_seed pins stage 1's
    assert key(lr=2e-3, seed=1) != key(lr=2e-3, seed=0)
    assert key(lr=2e-3, seed=1, shared_seed=0) == key(lr=2e-3, seed=0)


def _train_on_colours(cfg: TrainConfig, steps: int, desc: str) -> tuple[float, float, torch.nn.Module]:
    """A micro model trained `steps` steps on four flat colours: its loss before, after, and the model."""
    rng = np.random.default_rng(0)
    palette = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250], [250, 250, 10]], np.uint8)
    labels = rng.integers(0, 4, 64)
    images = np.broadcast_to(palette[labels][:, None, None, :], (64, 32, 32, 3)).copy()
    plan = np.stack([rng.permutation(64)[:16] for _ in range(steps)])
    torch.manual_seed(0)
    model = create_model("micro-cct-generalist", 4)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(model(x), y).item()
    train_model(model, images, labels, plan, cfg, torch.device("cpu"), 0, None, desc)
    with torch.no_grad():
        after = torch.nn.functional.cross_entropy(model(x), y).item()
    return before, after, model


def test_training_with_every_option_on_lowers_the_loss() -> None:
    cfg = TrainConfig(epochs=1, batch_size=16, lr=3e-3, randaugment_ops=1, mixup=0.4, cutmix=1.0)
    before, after, _ = _train_on_colours(cfg, 60, "mixed")
    assert after < 0.7 * before, (before, after)


def _tokens_seen(model: torch.nn.Module, images: torch.Tensor) -> int:
    seen: list[int] = []
    hook = model.backbone.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(out.shape[1]))
    with torch.no_grad():
        model(images)
    hook.remove()
    return seen[0]


def test_token_drop_thins_the_tokens_in_training_only_and_is_put_back() -> None:
    torch.manual_seed(0)
    model = create_model("micro-cct-generalist", 4).train()
    images = _batch(3).repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # 32 px: 8×8 = 64 tokens
    assert _tokens_seen(model, images) == 64
    with token_dropout(model, 0.75):
        assert _tokens_seen(model, images) == 16
        model.eval()  # inference inside the block still sees every token
        assert _tokens_seen(model, images) == 64
        model.train()
    assert isinstance(model.backbone.patch_drop, torch.nn.Identity)
    assert _tokens_seen(model, images) == 64
    # the weights are those of the model without it: the state dict has the same keys
    assert set(model.state_dict()) == set(create_model("micro-cct-generalist", 4).state_dict())


def test_training_with_token_drop_lowers_the_loss_and_leaves_the_model_whole() -> None:
    cfg = TrainConfig(epochs=1, batch_size=16, lr=3e-3, token_drop=0.5)
    before, after, model = _train_on_colours(cfg, 40, "token drop")
    assert after < 0.7 * before, (before, after)
    assert isinstance(model.backbone.patch_drop, torch.nn.Identity) and not model.training


def test_token_drop_on_a_model_without_tokens_fails_in_one_line() -> None:
    with pytest.raises(ConfigError, match="token_drop needs a timm VisionTransformer") as err:
        with token_dropout(torch.nn.Linear(2, 2), 0.5, "stage 1"):
            pass
    assert "\n" not in str(err.value)


def test_stochastic_depth_skips_branches_in_training_only_and_is_put_back() -> None:
    """Rates rise over depth from 0 to `drop_path`; in training a deep block's branches are skipped for
    some images (the same input gives different outputs), in eval mode never; afterwards the blocks
    are as built, with the same weights."""
    torch.manual_seed(0)
    model = create_model("micro-cct-expert", 4)
    model.backbone.blocks.append(copy.deepcopy(model.backbone.blocks[0]))  # two blocks: rates 0 and `rate`
    before = [type(b.drop_path1) for b in model.backbone.blocks]
    keys = set(model.state_dict())
    images = _batch(8).repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    with stochastic_depth(model, 0.5):
        rates = [(b.drop_path1.drop_prob, b.drop_path2.drop_prob) for b in model.backbone.blocks]
        assert rates == [(0.0, 0.0), (0.5, 0.5)]
        model.train()
        with torch.no_grad():
            assert not torch.equal(model(images), model(images))
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(images), model(images))
    assert [type(b.drop_path1) for b in model.backbone.blocks] == before
    assert set(model.state_dict()) == keys


def test_training_with_stochastic_depth_lowers_the_loss_and_leaves_the_model_whole() -> None:
    cfg = TrainConfig(epochs=1, batch_size=16, lr=3e-3, drop_path=0.2)
    before, after, model = _train_on_colours(cfg, 40, "drop path")
    assert after < 0.7 * before, (before, after)
    assert all(isinstance(b.drop_path1, torch.nn.Identity) for b in model.backbone.blocks) and not model.training


def test_stochastic_depth_on_a_model_without_blocks_fails_in_one_line() -> None:
    with pytest.raises(ConfigError, match="drop_path needs a timm VisionTransformer") as err:
        with stochastic_depth(torch.nn.Linear(2, 2), 0.1, "stage 1"):
            pass
    assert "\n" not in str(err.value)
