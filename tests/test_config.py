import re
from pathlib import Path

import pytest

from askexpert.config import SystemConfig
from askexpert.errors import ConfigError


def test_default_config_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = SystemConfig()
    cfg.to_yaml(tmp_path / "c.yaml")
    assert SystemConfig.from_yaml(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"routing": {"top_k": 0}}, "routing.top_k"),
        ({"routing": {"tau": 1.5}}, "tau=1.5 is out of range"),
        ({"routing": {"tau": -0.1}}, "out of range"),
        ({"routing": {"gate": "vibes"}}, "routing.gate"),
        ({"routing": {"top_k": 4}, "evaluate": {"max_k": 3}}, "max_k=3 is below routing.top_k=4"),
        ({"partition": {"num_experts": 0}}, "partition.num_experts"),
        ({"partition": {"strategy": "astrology"}}, "partition.strategy"),
        ({"routing": {"tua": 0.5}}, "routing.tua"),
        ({"expert_training": {"epochs": 1, "schedules": {"x": [{"fraction": 0.5}]}}}, "sum to 0.5"),
        ({"data": {"source": "imagenet"}}, "data.source"),
        ({"serving": {"model_workers": 0}}, "serving.model_workers"),
        ({"serving": {"model_runtime": "tensorrt"}}, "serving.model_runtime"),
        ({"serving": {"model_runtime": "onnx", "cpu_bfloat16": True}}, "runs the experts in float32"),
    ],
)
def test_bad_values_name_the_field(raw: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match="invalid config") as info:
        SystemConfig.from_dict(raw)
    assert fragment in str(info.value)


def test_malformed_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("routing: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        SystemConfig.from_yaml(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        SystemConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="not found"):
        SystemConfig.from_yaml(tmp_path / "missing.yaml")


def test_paper_config_is_valid() -> None:
    cfg = SystemConfig.from_yaml(Path(__file__).parents[1] / "configs" / "paper-cifar100.yaml")
    assert cfg.data.source == "cifar100" and cfg.generalist.preset == "deit-tiny"
    assert cfg.expert.preset == "deit-small"


@pytest.mark.parametrize("name", ["cifar100-cpu", "cifar100-gpu"])
def test_the_benchmark_configs_token_dropout_fits_their_presets(name: str) -> None:
    """Every training section that drops tokens must name a preset with tokens to drop: the
    GPU config is never trained here, so a wrong preset would only show on the lent GPU."""
    import torch

    from askexpert.models.registry import create_model
    from askexpert.training.augment import token_dropout

    cfg = SystemConfig.from_yaml(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    shared = cfg.expert_training.shared_augment
    pretraining = cfg.backbone.training.token_drop
    sections = [
        ("backbone", cfg.generalist.preset, pretraining),
        ("backbone", cfg.expert.preset, pretraining),
        ("generalist", cfg.generalist.preset, cfg.generalist_training.token_drop),
        ("stage 1", cfg.expert.preset, shared.token_drop if not isinstance(shared, bool) else 0.0),
    ]
    dropping = [section for section in sections if section[2] > 0.0]
    assert {"generalist", "stage 1"} <= {desc for desc, _, _ in dropping}
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    for desc, preset, rate in dropping:
        model = create_model(preset, num_outputs=7).train()
        seen: list[int] = []  # tokens reaching the first block, per forward pass
        first_block = model.backbone.blocks[0]
        hook = first_block.register_forward_pre_hook(lambda _m, args, seen=seen: seen.append(args[0].shape[1]))
        with token_dropout(model, rate, desc):
            assert model(images).shape == (2, 7)
        model(images)
        hook.remove()
        assert seen[0] == round(seen[1] * (1.0 - rate)), (desc, preset, seen)


def test_a_system_directory_parses_its_files_once_and_again_when_they_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from askexpert.partition import Partition, random_partition
    from askexpert.system import SystemDir

    system = SystemDir.create(tmp_path / "s", SystemConfig())
    parses = {"config": 0, "partition": 0}
    real_yaml, real_json = SystemConfig.from_yaml, Partition.from_json

    def count_yaml(path: Path) -> SystemConfig:
        parses["config"] += 1
        return real_yaml(path)

    def count_json(path: Path) -> Partition:
        parses["partition"] += 1
        return real_json(path)

    monkeypatch.setattr(SystemConfig, "from_yaml", staticmethod(count_yaml))
    monkeypatch.setattr(Partition, "from_json", staticmethod(count_json))
    assert len({system.config().routing.tau for _ in range(5)}) == 1 and parses["config"] == 1
    tau = system.config().routing.tau
    system.update_config("test", routing={"tau": round(1 - tau, 3)})  # same size on disk: the bytes tell it changed
    assert system.config().routing.tau == round(1 - tau, 3) and parses["config"] == 2
    random_partition(10, 2).to_json(system.partition_path)
    assert system.partition().subsets == system.partition().subsets and parses["partition"] == 1
    random_partition(10, 2, seed=1).to_json(system.partition_path)  # a stage rewrote it
    assert system.partition().subsets == real_json(system.partition_path).subsets and parses["partition"] == 2


def test_model_workers_share_the_cores_unless_torch_threads_is_set() -> None:
    import os

    from askexpert.config import ServingConfig
    from askexpert.serving.server import compute_threads

    cores = len(os.sched_getaffinity(0))

    def threads(**serving: object) -> int:
        return compute_threads(ServingConfig.model_validate(serving).resolve("cpu", "plain", cores))

    assert threads(model_workers=1) == 0  # one worker: torch's own default
    assert threads(model_workers=2) == max(1, cores // 2)
    assert threads(model_workers=4 * cores) == 1  # never below one thread
    assert threads(model_workers=2, torch_threads=3) == 3  # an explicit count wins
    assert threads() == (0 if cores == 1 else 1)  # auto on a CPU: one single-threaded call per core


@pytest.mark.parametrize(
    ("device", "engine", "cores", "bf16", "expected"),
    [
        # a float32 CPU server: ONNX Runtime, 8-image calls, 30 ms, one single-threaded call per core
        ("cpu", "plain", 2, False, (8, 30.0, 2, "onnx")),
        ("cpu", "plain", 1, False, (8, 30.0, 1, "onnx")),
        # bfloat16 experts need torch, whose per-call overhead wants 64-image calls and 100 ms
        ("cpu", "plain", 2, True, (64, 100.0, 2, "torch")),
        # Ray's replicas run ONNX Runtime (torch for bfloat16), one call each, 64 images: a handle call's
        # overhead wants big calls, and the tighter 70 ms
        ("cpu", "ray", 2, False, (64, 70.0, 1, "onnx")),
        ("cpu", "ray", 2, True, (64, 70.0, 1, "torch")),
        ("cuda", "plain", 16, False, (64, 100.0, 1, "torch")),
        ("cuda", "ray", 16, True, (64, 100.0, 1, "torch")),
    ],
)
def test_auto_serving_settings_follow_the_hardware(
    device: str, engine: str, cores: int, bf16: bool, expected: tuple[object, ...]
) -> None:
    from askexpert.config import ServingConfig

    sc = ServingConfig(cpu_bfloat16=bf16).resolve(device, engine, cores)  # type: ignore[arg-type]
    assert (sc.max_batch_size, sc.queue_delay_target_ms, sc.model_workers, sc.model_runtime) == expected
    assert sorted(sc.auto) == sorted(["max_batch_size", "queue_delay_target_ms", "model_workers", "model_runtime"])
    assert "(auto)" in sc.describe() and f"{expected[0]}-image batches" in sc.describe()
    assert sc.resolve("cuda" if device == "cpu" else "cpu") is sc  # resolved once, for the hardware it runs on


@pytest.mark.parametrize("engine", ["plain", "ray"])
def test_bfloat16_not_honoured_by_the_cpu_serves_float32_experts_as_float32(engine: str) -> None:
    """Where the CPU has no native bfloat16 the experts run in float32 whatever `cpu_bfloat16` says: 'auto' then
    picks float32's best (ONNX Runtime), and the resolved copy says float32; on CUDA the setting does not matter."""
    from askexpert.config import ServingConfig

    asked = ServingConfig(cpu_bfloat16=True)
    plain = ServingConfig(cpu_bfloat16=False).resolve("cpu", engine, 2)  # type: ignore[arg-type]
    emulated = asked.resolve("cpu", engine, 2, bfloat16_honoured=False)  # type: ignore[arg-type]
    assert (emulated.model_runtime, emulated.max_batch_size, emulated.queue_delay_target_ms) == (
        plain.model_runtime,
        plain.max_batch_size,
        plain.queue_delay_target_ms,
    )
    assert emulated.model_runtime == "onnx" and not emulated.cpu_bfloat16
    native = asked.resolve("cpu", engine, 2, bfloat16_honoured=True)  # type: ignore[arg-type]
    assert native.model_runtime == "torch" and native.cpu_bfloat16
    on_gpu = asked.resolve("cuda", engine, 2, bfloat16_honoured=False)  # type: ignore[arg-type]
    assert on_gpu.model_runtime == "torch" and on_gpu.cpu_bfloat16


def test_serving_values_given_are_kept_on_any_hardware_and_bad_ones_are_named() -> None:
    from askexpert.config import ServingConfig, SystemConfig

    given = ServingConfig(max_batch_size=16, model_runtime="torch")
    sc = given.resolve("cpu", "plain", 2)
    # the batch and runtime as given; the target follows the runtime that runs (torch: 100 ms)
    assert (sc.max_batch_size, sc.model_runtime, sc.queue_delay_target_ms, sc.model_workers) == (16, "torch", 100.0, 2)
    assert sc.auto == ["model_workers", "queue_delay_target_ms"]
    assert "16-image batches," in sc.describe() and "torch," in sc.describe()
    assert given.max_batch_size == 16 and ServingConfig().max_batch_size == "auto"  # resolve copies
    # 'auto' survives config.yaml: a system written today follows the hardware it is served on
    assert SystemConfig.from_dict({}).model_dump(mode="json")["serving"]["queue_delay_target_ms"] == "auto"
    for key, value, fragment in [
        ("max_batch_size", 0, "whole number ≥ 1 or 'auto', got 0"),
        ("model_workers", "many", "whole number ≥ 1 or 'auto', got 'many'"),
        ("queue_delay_target_ms", -5, "milliseconds > 0 or 'auto', got -5"),
        ("model_runtime", "tensorrt", "model_runtime"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            SystemConfig.from_dict({"serving": {key: value}})
