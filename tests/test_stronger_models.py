"""The convolutional-tokenizer presets, distillation from a teacher, and the fixes/breaks measure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from askexpert.config import DistillConfig, RoutingConfig, SystemConfig, TrainConfig
from askexpert.errors import ConfigError
from askexpert.evaluate.cache import LogitCache, _schedule_outputs
from askexpert.evaluate.metrics import fixes_and_breaks
from askexpert.models import CheckpointMeta, create_model, load_checkpoint, predict_logits, save_checkpoint
from askexpert.models.onnx_export import export_onnx
from askexpert.models.onnx_runtime import OnnxGeneralist
from askexpert.models.registry import ConvTokenizer, conv_vit, model_cost
from askexpert.partition import Partition
from askexpert.protocol import OTHER
from askexpert.training.loop import train_model, training_loss


def test_conv_tokenizer_preset_builds_exports_and_round_trips(tmp_path: Path) -> None:
    model = create_model("micro-cct-generalist", 5)
    backbone = model.backbone
    assert isinstance(backbone.patch_embed, ConvTokenizer)
    assert backbone.cls_token is None and backbone.global_pool == "avg"  # pooled tokens, no class token
    conv = backbone.patch_embed.stem[0]
    fan_in = conv.weight[0].numel()  # He-normal: std sqrt(2 / fan_in), not PyTorch's smaller default
    assert float(conv.weight.detach().std()) == pytest.approx((2 / fan_in) ** 0.5, rel=0.25)
    assert backbone.pos_embed.shape[1] == 64  # 32 px through two stride-2 pools: 8 × 8 tokens
    images = np.random.default_rng(0).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    ref = predict_logits(model, images)
    assert ref.shape == (9, 5)

    path = tmp_path / "g.safetensors"
    save_checkpoint(
        model, path, CheckpointMeta(role="generalist", preset="micro-cct-generalist", classes=list(range(5)))
    )
    loaded, meta = load_checkpoint(path)
    assert meta.preset == "micro-cct-generalist"
    assert np.array_equal(predict_logits(loaded, images), ref)

    onnx = OnnxGeneralist(export_onnx(loaded, tmp_path / "g.onnx", 32))
    assert np.allclose(onnx(images, batch_size=4), ref, atol=1e-4)


def test_conv_tokenizer_pools_before_relu_with_conv_relu_pool_values_and_gradients() -> None:
    """The stem pools before its ReLU for speed: outputs and gradients must be those of conv → ReLU → pool,
    and the weights keep their state-dict keys, so checkpoints written before the reorder load unchanged."""
    torch.manual_seed(0)
    tokenizer = ConvTokenizer(embed_dim=16)
    assert list(tokenizer.state_dict()) == ["stem.0.weight", "stem.3.weight"]
    x = torch.randn(4, 3, 32, 32)
    out = tokenizer(x)
    out.square().sum().backward()
    got = [tokenizer.stem[i].weight.grad.clone() for i in (0, 3)]

    weights = [tokenizer.stem[i].weight.detach().clone().requires_grad_(True) for i in (0, 3)]
    y = x
    for w in weights:
        y = F.max_pool2d(F.relu(F.conv2d(y, w, padding=1)), 3, stride=2, padding=1)
    ref = y.flatten(2).transpose(1, 2)
    ref.square().sum().backward()
    assert torch.equal(out, ref)
    for g, w in zip(got, weights, strict=True):
        assert w.grad is not None and torch.allclose(g, w.grad, rtol=1e-5, atol=1e-6)


def test_cct_pair_keeps_the_papers_proportion() -> None:
    gen, exp = model_cost("cpu-cct-generalist"), model_cost("cpu-cct-expert")
    assert 3.5 < exp["flops"] / gen["flops"] < 4.5  # DeiT-S / DeiT-T is 3.95
    old = model_cost("cpu-generalist")
    assert old["flops"] < gen["flops"] < 2 * old["flops"]  # the tokenizer costs well under 2x


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pool": "cls"}, "pool 'cls' is not one of map, avg, token"),
        ({"tokenizer_layers": 0}, "tokenizer_layers=0 is outside 1..4"),
        ({"img_size": 36, "tokenizer_layers": 3}, "img_size=36 is not divisible by 2**tokenizer_layers=8"),
    ],
)
def test_bad_preset_option_fails_in_one_line(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        conv_vit("bad", "generalist", 16, 1, 2, "", **options)  # type: ignore[arg-type]
    assert message in str(err.value) and "\n" not in str(err.value)


def test_training_loss_modes() -> None:
    torch.manual_seed(0)
    logits, teacher = torch.randn(8, 5), torch.randn(8, 5)
    labels = torch.randint(0, 5, (8,))
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.allclose(training_loss(logits, labels, 0.0), ce)
    assert torch.allclose(training_loss(logits, labels, 0.0, teacher, DistillConfig(teacher="none")), ce)
    hard = DistillConfig(teacher="stage1", mode="hard", alpha=1.0)
    target = torch.nn.functional.cross_entropy(logits, teacher.argmax(1))
    assert torch.allclose(training_loss(logits, labels, 0.0, teacher, hard), target)
    soft = DistillConfig(teacher="stage1", mode="soft", alpha=1.0, temperature=3.0)
    assert float(training_loss(teacher, labels, 0.0, teacher, soft)) == pytest.approx(0.0, abs=1e-6)
    assert float(training_loss(logits, labels, 0.0, teacher, soft)) > 0.01


def _kl_to_teacher(model: torch.nn.Module, images: np.ndarray, teacher: np.ndarray) -> float:
    student = torch.from_numpy(predict_logits(model, images))  # type: ignore[arg-type]
    t = torch.from_numpy(teacher)
    return float(
        torch.nn.functional.kl_div(student.log_softmax(1), t.log_softmax(1), reduction="batchmean", log_target=True)
    )


def test_distillation_pulls_the_student_toward_its_teacher() -> None:
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 4, 64)  # four flat colours; the teacher reads the colour, the labels are noise
    palette = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250], [250, 250, 10]], np.uint8)
    images = np.broadcast_to(palette[colour][:, None, None, :], (64, 32, 32, 3)).copy()
    labels = rng.integers(0, 4, 64)
    teacher = (np.eye(4, dtype=np.float32)[colour] * 4.0)[:, [1, 2, 3, 0]]  # confident, and not the labels
    plan = np.stack([rng.permutation(64)[:32] for _ in range(80)])
    tc = TrainConfig(epochs=1, batch_size=32, lr=3e-3, augment=False, label_smoothing=0.0)
    kl = {}
    distilled = DistillConfig(teacher="stage1", alpha=0.9, temperature=1.0)
    for name, distill in (("labels only", None), ("distilled", distilled)):
        torch.manual_seed(0)
        model = create_model("micro-cct-generalist", 4)
        train_model(model, images, labels, plan, tc, torch.device("cpu"), 0, None, name, teacher, distill)
        kl[name] = _kl_to_teacher(model, images, teacher)
    assert kl["distilled"] < 0.5 * kl["labels only"], kl


def _colour_task(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """64 flat-colour images labelled by their colour, and 60 steps of 32 of them."""
    rng = np.random.default_rng(seed)
    colour = rng.integers(0, 4, 64)
    palette = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250], [250, 250, 10]], np.uint8)
    images = np.broadcast_to(palette[colour][:, None, None, :], (64, 32, 32, 3)).copy()
    return images, colour, np.stack([rng.permutation(64)[:32] for _ in range(60)])


def _train_colours(cpu_bfloat16: bool) -> torch.nn.Module:
    images, labels, plan = _colour_task()
    tc = TrainConfig(epochs=1, batch_size=32, lr=3e-3, augment=False, cpu_bfloat16=cpu_bfloat16)
    torch.manual_seed(0)
    model = create_model("micro-cct-generalist", 4)
    train_model(model, images, labels, plan, tc, torch.device("cpu"), 0, desc="colours")
    return model


def test_cpu_bfloat16_is_left_out_of_fingerprints_while_off() -> None:
    assert "cpu_bfloat16" not in TrainConfig(epochs=1).model_dump()  # stages trained before it stay current
    assert TrainConfig(epochs=1, cpu_bfloat16=True).model_dump()["cpu_bfloat16"] is True


def test_cpu_bfloat16_training_without_native_support_runs_float32_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from askexpert.models import predict

    exact = _train_colours(cpu_bfloat16=False)
    monkeypatch.setattr(predict, "native_cpu_bfloat16", lambda: False)
    with pytest.warns(UserWarning, match="colours: cpu_bfloat16 is set, but this CPU has no native bfloat16"):
        fallback = _train_colours(cpu_bfloat16=True)
    for (name, a), b in zip(exact.state_dict().items(), fallback.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.skipif(
    not __import__("askexpert.models.predict", fromlist=["x"]).native_cpu_bfloat16(), reason="no native bfloat16"
)
def test_cpu_bfloat16_training_learns_and_keeps_float32_weights() -> None:
    images, labels, _ = _colour_task()
    exact, fast = _train_colours(cpu_bfloat16=False), _train_colours(cpu_bfloat16=True)
    assert all(p.dtype == torch.float32 for p in fast.parameters())  # autocast: the weights stay float32
    assert any(not torch.equal(a, b) for a, b in zip(exact.parameters(), fast.parameters(), strict=True))
    for model in (exact, fast):
        assert (predict_logits(model, images).argmax(1) == labels).mean() == 1.0  # type: ignore[arg-type]


def test_teacher_rows_must_match_the_images() -> None:
    model = create_model("micro-cct-generalist", 4)
    images = np.zeros((8, 32, 32, 3), np.uint8)
    tc = TrainConfig(epochs=1, batch_size=4)
    with pytest.raises(ValueError, match="7 teacher rows for 8 images"):
        train_model(
            model,
            images,
            np.zeros(8, np.int64),
            np.zeros((1, 4), np.int64),
            tc,
            torch.device("cpu"),
            0,
            teacher_logits=np.zeros((7, 4), np.float32),
            distill=DistillConfig(teacher="stage1"),
        )


@pytest.mark.slow
def test_micro_system_distills_its_generalist_from_stage1(tmp_path: Path) -> None:
    from askexpert.system import SystemDir
    from askexpert.training.generalist import generalist_fingerprint, train_generalist
    from conftest import MICRO

    raw = dict(MICRO, generalist={"preset": "micro-cct-generalist"}, expert={"preset": "micro-cct-expert"})
    raw["distill"] = {"teacher": "stage1", "mode": "soft", "alpha": 0.5}
    system = SystemDir.create(tmp_path / "sys", SystemConfig.from_dict(raw))
    meta = train_generalist(system)
    assert system.stage1_path.is_file()  # the teacher was trained first
    assert meta.extra["distill"]["teacher"] == "stage1"
    key = generalist_fingerprint(system)
    system.update_config("test", distill={"teacher": "stage1", "mode": "hard", "alpha": 0.5})
    assert generalist_fingerprint(system) != key  # another distillation setting retrains the generalist
    system.update_config("test", distill={"teacher": "none"})
    untaught = generalist_fingerprint(system)
    system.update_config("test", distill={"teacher": "stage1", "mode": "soft", "alpha": 0.0})
    assert generalist_fingerprint(system) == untaught  # alpha 0 is no teacher: no retraining, no stage 1 to wait for


def test_fixes_and_breaks_on_a_hand_built_cache() -> None:
    part = Partition("random", 4, ("e0", "e1"), ((0, 1), (2, 3)))
    y = np.array([0, 1, 2, 3, 0, 3])
    top = np.array([1, 1, 2, 2, 3, 3])  # the generalist: wrong, right, right, wrong, wrong, right
    gen_probs = np.full((6, 4), 0.1, np.float32)
    gen_probs[np.arange(6), top] = 0.7
    # what each expert answers per sample (output index: subset position, 2 = "other")
    e0 = np.array([0, 0, 0, 0, 0, 0])  # class 0 everywhere: fixes s0, breaks s1
    e1 = np.array([0, 0, 0, 2, 1, 2])  # s2 right (class 2), s3 "other", s4 class 3 (wrong), s5 "other"
    logits = {eid: np.eye(3, dtype=np.float32)[a] * 5 for eid, a in (("e0", e0), ("e1", e1))}
    outputs = _schedule_outputs(logits, part)
    assert outputs.labels[1, 3] == OTHER
    cache = LogitCache(y, gen_probs, part, {"s": outputs}, "k")
    rows = fixes_and_breaks(cache, outputs, RoutingConfig(gate="max_prob", tau=0.5, top_k=1), "test", "s")
    by = {r["expert"]: r for r in rows}
    assert (by["e0"]["routed"], by["e0"]["fixes"], by["e0"]["breaks"]) == (2, 1, 1)
    assert (by["e1"]["routed"], by["e1"]["fixes"], by["e1"]["breaks"]) == (4, 0, 0)  # "other" never breaks
    assert (by["all"]["fixes"], by["all"]["breaks"], by["all"]["generalist_wrong"]) == (1, 1, 3)
    assert by["all"]["generalist_accuracy"] == pytest.approx(0.5)
    assert by["all"]["oracle_gate_accuracy"] == pytest.approx(0.5 + 1 / 6)
    assert by["e1"]["routing_hit_rate"] == pytest.approx(3 / 4)  # s4 (class 0) went to e1


def test_batch1_latency_times_both_runtimes() -> None:
    from askexpert.measure.device_timing import batch1_latency

    timing = batch1_latency("micro-cct-generalist", repeats=3)
    assert set(timing) == {"torch_ms", "onnx_ms"} and all(v > 0 for v in timing.values())
    assert set(batch1_latency("micro-cct-generalist", repeats=1, onnx=False)) == {"torch_ms"}


def test_presets_command_lists_the_new_pair(capsys: pytest.CaptureFixture[str]) -> None:
    from askexpert.cli import main

    main(["presets", "--no-latency"])
    out = capsys.readouterr().out
    assert "cpu-cct-generalist" in out and "cpu-cct-expert" in out and "torch_ms" not in out
