"""SystemConfig: every knob of a system directory, as validated data.

One YAML file (`config.yaml` in the system directory) holds the models, the
data source, the partition, the training budgets and schedules, and the
routing operating point, so that any stage can be rerun alone and every
number has a single source of truth.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from askexpert.errors import ConfigError

# the stages whose epoch counts `SystemConfig.with_epochs_scaled` multiplies, in the order they train: each one's
# section of the config (a path of keys) and the key that holds its epochs
EPOCH_FIELDS: dict[str, tuple[tuple[str, ...], str]] = {
    "backbone": (("backbone", "training"), "epochs"),
    "stage1": (("expert_training",), "shared_epochs"),
    "generalist": (("generalist_training",), "epochs"),
    "experts": (("expert_training",), "epochs"),
}
EPOCH_STAGES: tuple[str, ...] = tuple(EPOCH_FIELDS)


class _Strict(BaseModel):
    """Unknown keys are typos, not extensions: reject them."""

    model_config = ConfigDict(extra="forbid")


class SynthConfig(_Strict):
    """Shape of the generated data set (see `askexpert.data.synth`)."""

    num_groups: int = Field(20, ge=1, le=100)
    classes_per_group: int = Field(5, ge=1, le=20)
    train_per_class: int = Field(100, ge=2)
    test_per_class: int = Field(20, ge=1)
    image_size: int = Field(32, ge=8, le=256)
    seed: int = 0
    class_strength: float = Field(0.4, gt=0.0, le=2.0)
    noise: float = Field(0.15, ge=0.0, le=1.0)


class DataConfig(_Strict):
    """Where images come from. `root` is relative to the system directory when not absolute."""

    source: Literal["synth", "cifar100", "folder"] = "synth"
    root: str = "data"
    download: bool = False
    verify_checksums: bool = True
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    split_seed: int = 0
    synth: SynthConfig = SynthConfig()


class ModelConfig(_Strict):
    """A model preset name from the registry and optional local pretrained weights."""

    preset: str
    pretrained_file: str | None = None


class _OmitsUnused(_Strict):
    """Options left out of dumps while they are off: `_omit_when_off` maps each such field to the
    switch whose off value (0, 0.0, False) omits it (its own name, or the option it qualifies).

    Dumps are the stages' fingerprints: checkpoints and partitions made before such an option
    existed stay current, and a config that does not use it reads as it did.
    """

    _omit_when_off: ClassVar[dict[str, str]] = {}

    @model_serializer(mode="wrap")
    def _omit_unused(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        data: dict[str, object] = handler(self)
        for key, switch in self._omit_when_off.items():
            if key in data and not getattr(self, switch):
                del data[key]
        return data


class DistillConfig(_Strict):
    """Train a model against a stronger all-class model as well as the labels (after DeiT).

    `teacher: stage1` is the expert preset trained on all classes (the progressive
    schedule's stage 1, trained first and reused). Its logits on the un-augmented
    training images are computed once; the student sees them beside its crop/flip
    augmented copies. Loss: (1 − alpha)·CE(labels) + alpha·distillation, where
    `soft` is T²·KL(teacher_T ‖ student_T) and `hard` is CE against the teacher's argmax.
    The top-level `distill` teaches the generalist; a schedule's `distill` teaches its
    experts, the teacher's logits folded onto subset + "other" (`training.experts`).
    """

    teacher: Literal["none", "stage1"] = "none"
    mode: Literal["soft", "hard"] = "soft"
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    temperature: float = Field(2.0, gt=0.0)

    @property
    def active(self) -> bool:
        """A teacher with a weight: alpha 0 is no distillation at all."""
        return self.teacher != "none" and self.alpha > 0.0


class Stage(_Strict):
    """One stage of an expert schedule.

    `fraction`: share of the expert's optimizer steps spent in this stage.
    `subset_share`: probability that a training sample is drawn from the
    expert's own classes; the rest are out-of-subset samples labelled "other".
    `null` means the natural share (sample uniformly from the whole training set).
    `others`: where the out-of-subset samples come from: `all` of them, or
    `routed`, those the generalist's Top-k router would send to this expert
    (the confusable ones it will really be asked about; `all` when too few).
    """

    fraction: float = Field(gt=0.0, le=1.0)
    subset_share: float | None = Field(None, gt=0.0, le=1.0)
    others: Literal["all", "routed"] = "all"


class Schedule(_OmitsUnused):
    """How one expert set is trained: where it starts and which stages follow.

    `init`: `pretrained` (the expert preset's `pretrained_file`, head replaced:
    the paper's static baseline) or `shared` (the shared all-class stage 1
    model, head swapped to subset + "other": Hinton et al. 2015's specialists).
    `correct_other`: after training, shift the "other" logit by the log-odds
    between the "other" share the last stage trained with and the share the
    expert meets when the generalist routes validation samples to it.
    `distill`: train the experts against stage 1's logits as well as their labels
    (stage 1's classes outside the subset folded into "other"); off by default.
    `edge_error_repeats`: each subset training image the generalist gets wrong is drawn
    1 + this many times per pass (the same steps in all): an expert is asked about the
    samples the edge is unsure of, and only its answers there can fix anything; 0 (off)
    by default.
    `average_start`: after its stages, the expert's body (every weight but the classifier head) is
    averaged with the weights it started from, this share of the start (weight-space ensembling,
    WiSE-FT: Wortsman et al., CVPR 2022): narrowing forgets some of what the start knew about the
    expert's own classes, and the average keeps it at no training cost. The head stays the
    trained one (it was trained for the trained body); 0 (off) by default.
    """

    init: Literal["pretrained", "shared"] = "pretrained"
    stages: list[Stage]
    correct_other: bool = False
    distill: DistillConfig = DistillConfig()
    edge_error_repeats: int = Field(0, ge=0, le=10)
    average_start: float = Field(0.0, ge=0.0, lt=1.0)
    _omit_when_off: ClassVar[dict[str, str]] = {
        "distill": "distills",
        "edge_error_repeats": "edge_error_repeats",
        "average_start": "average_start",
    }

    @property
    def needs_routing(self) -> bool:
        """Whether training needs the generalist's outputs on the training split (its routing or its errors)."""
        return self.correct_other or self.edge_error_repeats > 0 or any(s.others == "routed" for s in self.stages)

    @property
    def distills(self) -> bool:
        return self.distill.active

    @field_validator("stages")
    @classmethod
    def _fractions_sum_to_one(cls, stages: list[Stage]) -> list[Stage]:
        if not stages:
            raise ValueError("a schedule needs at least one stage")
        total = sum(s.fraction for s in stages)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"stage fractions sum to {total:g}, not 1")
        return stages


class StrongAugmentation(_OmitsUnused):
    """Augmentation beyond crop/flip, each off by default (askexpert.training.augment): RandAugment's
    ops per image and magnitude (torchvision), the Beta(alpha, alpha) of mixup / cutmix (timm's
    Mixup; with both set, each batch uses one of them at random), and `token_drop`, the share of
    its tokens each training image drops after the tokenizer (timm's PatchDropout; every token
    is kept at inference): a regulariser that also makes each step cheaper; and `drop_path`, stochastic
    depth's rate at the last block (timm's DropPath, rising linearly from 0 at the first; every branch runs
    at inference): a regulariser at no cost per step."""

    randaugment_ops: int = Field(0, ge=0, le=4)
    randaugment_magnitude: int = Field(5, ge=0, le=30)
    mixup: float = Field(0.0, ge=0.0)
    cutmix: float = Field(0.0, ge=0.0)
    token_drop: float = Field(0.0, ge=0.0, lt=1.0)
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)
    _omit_when_off: ClassVar[dict[str, str]] = {
        "randaugment_ops": "randaugment_ops",
        "randaugment_magnitude": "randaugment_ops",  # means nothing without RandAugment
        "mixup": "mixup",
        "cutmix": "cutmix",
        "token_drop": "token_drop",
        "drop_path": "drop_path",
    }


# the augmentation beyond crop/flip (TrainConfig's fields): off by default, kept from stage 1 unless asked
STRONG_AUGMENTATION = tuple(StrongAugmentation.model_fields)


class TrainConfig(StrongAugmentation):
    """Optimiser and budget for one training job."""

    epochs: float = Field(gt=0.0)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    warmup_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    augment: bool = True  # random crop + horizontal flip
    # bfloat16 autocast on a CPU with native bfloat16 (AVX512-BF16, AMX), weights and optimiser in float32:
    # the expert preset's step 8-15 % faster on this project's CPU, the small generalist's slower, and stage 1
    # ≈ 0.5 points weaker at equal epochs (README "Training precision"). Elsewhere float32 and a warning. On
    # CUDA training always uses bf16.
    cpu_bfloat16: bool = False
    _omit_when_off: ClassVar[dict[str, str]] = {**StrongAugmentation._omit_when_off, "cpu_bfloat16": "cpu_bfloat16"}

    @property
    def mixes(self) -> bool:
        return self.mixup > 0.0 or self.cutmix > 0.0


def _default_schedules() -> dict[str, Schedule]:
    return {
        "static": Schedule(init="pretrained", stages=[Stage(fraction=1.0, subset_share=1.0)]),
        "progressive": Schedule(
            init="shared",
            stages=[
                Stage(fraction=0.3, subset_share=0.5),
                Stage(fraction=0.7, subset_share=0.75, others="routed"),
            ],
            correct_other=True,
        ),
    }


LEGACY_PROGRESSIVE = Schedule(
    init="pretrained",
    stages=[
        Stage(fraction=0.25, subset_share=None),
        Stage(fraction=0.25, subset_share=0.5),
        Stage(fraction=0.5, subset_share=1.0),
    ],
)
"""The schedule askexpert 0.1 called `progressive`: no shared stage, "other" dropped at the end."""


class ExpertTrainConfig(TrainConfig):
    """Expert budget: `epochs` counts passes over the expert's *subset*, the same for every schedule.

    `shared_epochs` is the shared stage 1 (all classes, full labels, passes over
    the whole training split) that `init: shared` schedules start from; it is
    trained once for all experts and reported both amortised and charged to each.
    """

    shared_epochs: float = Field(5.0, gt=0.0)
    seed: int = 0  # the expert stage's own seed (stage 1 and experts), so it can be repeated alone
    # stage 1's seed when it must not follow `seed`: set it when stage 1 also teaches the generalist
    # (`distill.teacher: stage1`), so that repeating the expert stage keeps teacher, generalist and partition
    shared_seed: int | None = None
    # stage 1's learning rate when it should differ from the experts' fine-tuning `lr` (None: `lr`):
    # stage 1 trains a whole model on all classes, the experts fine-tune it on a subset
    shared_lr: float | None = Field(None, gt=0.0)
    # stage 1's augmentation beyond crop/flip: false (crop/flip only; the experts' own stages keep theirs),
    # true (the same as the experts' stages), or its own settings, e.g. {randaugment_ops: 2}: stage 1
    # trains a whole model for many epochs and overfits where the experts' short fine-tuning does not (README)
    shared_augment: bool | StrongAugmentation = False
    _omit_when_off: ClassVar[dict[str, str]] = {**TrainConfig._omit_when_off, "shared_augment": "shared_augment"}

    @property
    def stage1_seed(self) -> int:
        return self.seed if self.shared_seed is None else self.shared_seed

    schedules: dict[str, Schedule] = Field(default_factory=_default_schedules)

    @field_validator("schedules", mode="before")
    @classmethod
    def _bare_stage_lists(cls, value: object) -> object:
        """A bare list of stages (askexpert 0.1's form) is a schedule that starts from `pretrained`."""
        if isinstance(value, dict):
            return {k: {"stages": v} if isinstance(v, list) else v for k, v in value.items()}
        return value

    @field_validator("schedules")
    @classmethod
    def _some_schedule(cls, value: dict[str, Schedule]) -> dict[str, Schedule]:
        if not value:
            raise ValueError("define at least one schedule")
        return value


class BackboneConfig(_Strict):
    """`askexpert train backbone`: pretraining on another data set, for `pretrained_file`."""

    data: DataConfig | None = None  # None: no pretraining stage in `demo`/the benchmark
    training: TrainConfig = TrainConfig(epochs=5, lr=2e-3)


class PartitionConfig(_OmitsUnused):
    strategy: Literal["superclass", "confusion", "random"] = "confusion"
    num_experts: int = Field(5, ge=1)
    seed: int = 0
    # `confusion` only: each expert also takes the `overlap` outside classes most confused with its own,
    # so that a sample near a boundary finds an expert holding its class (README "Partitions")
    overlap: int = Field(0, ge=0)
    _omit_when_off: ClassVar[dict[str, str]] = {"overlap": "overlap"}

    @model_validator(mode="after")
    def _overlap_needs_confusion(self) -> PartitionConfig:
        if self.overlap and self.strategy != "confusion":
            raise ValueError(f"overlap={self.overlap} needs strategy 'confusion' (got {self.strategy!r})")
        return self


class RoutingConfig(_Strict):
    """The operating point: the one validated value the router, the live classifier, the cached
    evaluation (every row of the report), the testbed and `calibrate` take (see `askexpert.routing`).
    Change it with `updated(...)` (a validated `model_copy`), never by setting attributes."""

    gate: Literal["max_prob", "margin", "entropy", "learned"] = "max_prob"  # learned: deferral_gate.json
    tau: float = 0.6
    top_k: int = Field(3, ge=1)
    scoring: Literal["weighted", "count"] = "weighted"
    combine: Literal["replace", "mix", "logmix"] = "replace"
    mix_weight: float = Field(0.5, ge=0.0, le=1.0)  # generalist's share under `combine: mix` / `logmix`
    # also ask the runner-up expert when its routing score is within this share of the best's
    # (score_2 ≥ (1 − second_within)·score_1 > 0): two requests; 0 asks one expert (the paper)
    second_within: float = Field(0.0, ge=0.0, le=1.0)

    @field_validator("tau")
    @classmethod
    def _tau_in_range(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"tau={value} is out of range: every gate compares against 0 ≤ τ ≤ 1")
        return value

    def describe(self) -> str:
        rule = self.combine if self.combine == "replace" else f"{self.combine} w={self.mix_weight:g}"
        second = f", 2nd within {self.second_within:g}" if self.second_within > 0 else ""
        return f"{self.gate} τ={self.tau:.3g}, k={self.top_k}, {rule}{second}"

    def updated(self, **changes: object) -> RoutingConfig:
        """A validated copy with `changes` (pydantic's model_copy does not validate)."""
        return RoutingConfig.model_validate({**self.model_dump(), **changes})


Auto = Literal["auto"]
# What `auto` picks for the serving settings that depend on the hardware (README "Serving: settings that follow
# the hardware"; measured on a 2-core CPU with the overload benchmark, benchmarks/serve_overload.py):
# - a CPU, plain engine, experts in float32: ONNX Runtime, 8-image calls, a 30 ms queue-delay target, one model
#   call per core the server may use (each on one thread): goodput ≥ 0.9 of capacity at 1×, 2× and 4× load and
#   the p99 within 1.9× of half load's with the server on its own core; torch's per-call overhead in Python
#   wants bigger batches (64) and a looser target (100 ms);
# - a CPU, Ray engine: ONNX Runtime in each replica on one thread (float32; torch with bfloat16 experts),
#   64-image calls (a handle call's overhead wants them), a 70 ms target (at 100 ms the p99 reached 3.1× half
#   load's); ONNX Runtime there served 1-23 % more than torch at 2× and 4× load (3 interleaved runs);
# - a GPU (either engine): torch in bfloat16, 64-image calls, a 100 ms target, one call at a time.
AUTO_CPU_SMALL_BATCH, AUTO_CPU_SMALL_TARGET_MS = 8, 30.0
# ...and that target is counted in full batches too: at least this many times a full batch's time on the host
# that serves, as timed alone at warm-up (`ResolvedServing.with_batch_time`; under load, beside the event loop,
# a batch takes longer). 30 ms was about three 8-image batches on the host that chose it; on a host half as
# fast it was one and a half, and the server refused 6-9 % of the requests at half load and served 0.65-0.79
# of capacity at 1×; two batches still refused 15 % at 1×, three put the p99 at 4× load over 3× half load's
# (docs/serving-log.md, "The target in batches")
AUTO_CPU_SMALL_TARGET_BATCHES = 2.5
AUTO_BATCH, AUTO_TARGET_MS, AUTO_RAY_CPU_TARGET_MS = 64, 100.0, 70.0
AUTO_SETTINGS = ("max_batch_size", "queue_delay_target_ms", "model_workers", "model_runtime")


class ServingConfig(_Strict):
    """The near-edge expert server and the edge client's link to it."""

    schedule: str = "progressive"  # the set `serve` hosts; progressive measured better on both data sets (README)
    # 'auto' (the default) for the four settings that depend on the hardware: max_batch_size,
    # queue_delay_target_ms, model_workers, model_runtime; `resolve` picks them for the device and engine
    # (the table above); a number or a runtime here is used as given, on any hardware
    max_batch_size: Annotated[int, Field(ge=1)] | Auto = "auto"
    max_wait_ms: float = Field(5.0, ge=0.0)
    max_queue_images: int = Field(256, ge=1)  # per expert, admitted and not yet answered: a memory cap (429 beyond)
    # the longest estimated queue wait a request is admitted into (429 beyond; a budget header can only shorten
    # it): the p99 of accepted requests follows from it (serving/admission.py, README "Serving")
    queue_delay_target_ms: Annotated[float, Field(gt=0.0)] | Auto = "auto"
    max_inflight_requests: int = Field(512, ge=1)  # admitted requests at once, all experts (429 beyond)
    max_connections: int = Field(2048, ge=1)  # open connections uvicorn serves at once (503 beyond: a last resort)
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    # 0: torch's default (with model_workers > 1: the cores this process may use ÷ model_workers); on a
    # small box shared with other work, cores - 1 leaves the event loop a core (README "Serving")
    torch_threads: int = Field(0, ge=0)
    # model calls at once on the plain engine, each on its own thread (any expert's batch); on a CPU, calls
    # on one thread each serve more images per second than one call on every core (README "Serving";
    # with --engine ray, ray_replicas plays this part); auto: one per core this process may use, on a CPU
    model_workers: Annotated[int, Field(ge=1)] | Auto = "auto"
    client_batch_size: int = Field(64, ge=1)
    timeout_s: float = Field(5.0, gt=0.0)
    retries: int = Field(2, ge=0)
    backoff_s: float = Field(0.05, ge=0.0)
    breaker_failures: int = Field(3, ge=1)
    breaker_cooldown_s: float = Field(5.0, ge=0.0)
    handshake_retry_s: float = Field(5.0, gt=0.0)  # server unreachable at start: edge-only, handshake retried
    # How the experts run, on both engines and in the evaluation and the testbed alike (one answer per image).
    # test_time_flip: each expert's logits averaged over the image and its mirror image (the classes are
    # mirror-invariant, as training's crop/flip assumes), at twice the expert's compute at the near-edge and
    # none at the edge: +1.0 / +0.3-0.4 points on the demo's / CIFAR-100's validation (README "Serving").
    # cpu_bfloat16: bfloat16 autocast on a CPU with native bfloat16 (AVX512-BF16, AMX; about half the time
    # there, float32 with a warning elsewhere; off by default, as the last bits then depend on the CPU); on
    # CUDA the experts always run in bfloat16. Neither reaches the edge's generalist.
    test_time_flip: bool = True
    cpu_bfloat16: bool = False
    # what runs the experts' model calls: torch, or ONNX Runtime on each expert exported beside its checkpoint
    # (CPU, float32; one call that does not come back to Python between operators, so an event loop busy with
    # refusals does not stall it: README "Serving"; in a Ray replica on torch_threads threads, else one);
    # auto: onnx for float32 experts on a CPU, on either engine
    model_runtime: Literal["auto", "torch", "onnx"] = "auto"
    ray_replicas: int = Field(1, ge=1)  # per expert, with --engine ray
    ray_num_cpus: float = Field(0.0, ge=0.0)  # CPUs Ray reserves per expert replica (0: no reservation)
    ray_num_gpus: float = Field(0.0, ge=0.0)  # GPUs per expert replica; > 0 runs the expert on CUDA

    @field_validator("max_batch_size", "model_workers", "queue_delay_target_ms", mode="before")
    @classmethod
    def _number_or_auto(cls, value: object, info: ValidationInfo) -> object:
        """One message for a bad value, instead of one per branch of the union."""
        if value == "auto":
            return value
        whole = info.field_name != "queue_delay_target_ms"
        want = "a whole number ≥ 1" if whole else "a number of milliseconds > 0"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected {want} or 'auto', got {value!r}")
        if (whole and not (float(value).is_integer() and value >= 1)) or value <= 0:
            raise ValueError(f"expected {want} or 'auto', got {value!r}")
        return int(value) if whole else value

    @model_validator(mode="after")
    def _onnx_is_float32(self) -> ServingConfig:
        if self.model_runtime == "onnx" and self.cpu_bfloat16:
            raise ValueError("model_runtime 'onnx' runs the experts in float32: set cpu_bfloat16: false, or use torch")
        return self

    def expert_runtime(self, bfloat16_honoured: bool = True) -> list[dict[str, bool]]:
        """How the experts run, for the fingerprints of their outputs (the evaluation's cache, the deferral
        gate): empty when they run plainly, so that outputs computed before these settings existed stay
        current for a config that turns both off. `bfloat16_honoured`: whether the machine that computes
        the outputs runs `cpu_bfloat16` (the cache's key passes it; the gate's fingerprint, checked by a
        torch-free edge that cannot know the server's CPU, keeps the setting)."""
        runtime = {"test_time_flip": self.test_time_flip, "cpu_bfloat16": self.cpu_bfloat16 and bfloat16_honoured}
        return [runtime] if any(runtime.values()) else []

    def resolve(
        self,
        device_type: str,
        engine: Literal["plain", "ray"] = "plain",
        cores: int = 1,
        bfloat16_honoured: bool = True,
    ) -> ResolvedServing:
        """A copy with every 'auto' replaced by what measured best for experts on `device_type` ("cpu",
        "cuda") under `engine`, with `cores` the CPU cores the server may use (the table above); settings
        given as values stay. A resolved copy resolves to itself. `bfloat16_honoured`: whether this CPU runs
        `cpu_bfloat16` (native bfloat16); where it does not, the experts are float32 experts, so the copy says
        `cpu_bfloat16: false` and 'auto' picks what measured best for float32 (ONNX Runtime on the plain engine)."""
        cpu = device_type == "cpu"
        bfloat16 = self.cpu_bfloat16 and (bfloat16_honoured or not cpu)
        runtime = self.model_runtime
        if runtime == "auto":
            runtime = "onnx" if cpu and not bfloat16 else "torch"
        batches = 0.0  # the target as milliseconds alone: the big presets' batches are caps, seldom full
        if cpu and engine == "ray":
            batch, target = AUTO_BATCH, AUTO_RAY_CPU_TARGET_MS
        elif cpu and runtime == "onnx":
            batch, target, batches = AUTO_CPU_SMALL_BATCH, AUTO_CPU_SMALL_TARGET_MS, AUTO_CPU_SMALL_TARGET_BATCHES
        else:
            batch, target = AUTO_BATCH, AUTO_TARGET_MS
        chosen = {
            "max_batch_size": batch,
            "queue_delay_target_ms": target,
            "model_workers": max(1, cores) if cpu and engine == "plain" else 1,
            "model_runtime": runtime,
        }
        values = {k: v for k, v in chosen.items() if getattr(self, k) == "auto"}
        # an auto small-batch target is also a number of its auto 8-image batches, once the server has timed one
        # (warm-up); with a batch size given, the target stays in milliseconds (2.5 batches of 64 images: 0.4 s)
        batches = batches if {"queue_delay_target_ms", "max_batch_size"} <= values.keys() else 0.0
        return ResolvedServing.model_validate(
            {**self.model_dump(), **values, "cpu_bfloat16": bfloat16, "auto": sorted(values), "target_batches": batches}
        )


class ResolvedServing(ServingConfig):
    """Serving settings for one device and engine: no 'auto' left (`ServingConfig.resolve`). The server's parts
    take this type, so a setting still 'auto' cannot reach them."""

    max_batch_size: int = Field(ge=1)
    queue_delay_target_ms: float = Field(gt=0.0)
    model_workers: int = Field(ge=1)
    model_runtime: Literal["torch", "onnx"]
    auto: list[str] = Field(default_factory=list)  # the settings `resolve` picked (for the start-up line)
    # > 0: the queue-delay target is also at least this many full batches' time, once timed (`with_batch_time`)
    target_batches: float = Field(0.0, ge=0.0)
    full_batch_ms: float | None = Field(None, gt=0.0)  # the full batch's time the target was counted in

    def resolve(self, *_: Any, **__: Any) -> ResolvedServing:
        """Already resolved, for the hardware it runs on: itself (whatever hardware is named)."""
        return self

    def with_batch_time(self, seconds: float) -> ResolvedServing:
        """A copy whose queue-delay target is at least `target_batches` full batches of `seconds` (one model call
        on a full batch, timed on the host that serves); itself where the target is not counted in batches, or
        already was.

        Why: a target of a fixed number of milliseconds, chosen on one host, is about one batch on a host or a
        model twice as slow, and then refuses requests at half load (docs/serving-log.md)."""
        if not self.target_batches or self.full_batch_ms is not None:
            return self
        if not seconds > 0:
            raise ValueError(f"a full batch's time must be > 0 seconds, got {seconds!r}")
        target = max(self.queue_delay_target_ms, self.target_batches * seconds * 1e3)
        update = {"queue_delay_target_ms": round(target, 1), "full_batch_ms": seconds * 1e3}
        return ResolvedServing.model_validate({**self.model_dump(), **update})

    def describe(self) -> str:
        """One line for the start-up message: the hardware-dependent settings, marked where 'auto' chose them."""
        mark = {k: " (auto)" if k in self.auto else "" for k in AUTO_SETTINGS}
        if self.full_batch_ms is not None and "queue_delay_target_ms" in self.auto:
            mark["queue_delay_target_ms"] = (
                f" (auto: at least {self.target_batches:g} full batches of {self.full_batch_ms:.1f} ms)"
            )
        return (
            f"{self.model_runtime}{mark['model_runtime']}, "
            f"{self.max_batch_size}-image batches{mark['max_batch_size']}, "
            f"{self.queue_delay_target_ms:g} ms queue-delay target{mark['queue_delay_target_ms']}, "
            f"{self.model_workers} model call(s) at once{mark['model_workers']}"
        )


class EvaluateConfig(_Strict):
    taus: int = Field(50, ge=2, le=1000)
    max_k: int = Field(5, ge=1)
    mix_weights: list[float] = Field(default_factory=lambda: [0.2, 0.35, 0.5, 0.65, 0.8])
    # routing.second_within values the choice tries (0: one expert); each offloaded sample that asks a
    # second expert counts as two offloads
    second_withins: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5])
    choose_on_validation: bool = True  # pick gate, τ, k and combination per schedule on the validation split

    @field_validator("mix_weights", "second_withins")
    @classmethod
    def _shares(cls, values: list[float]) -> list[float]:
        if any(not 0.0 <= v <= 1.0 for v in values):
            raise ValueError(f"every value must lie between 0 and 1; got {values}")
        return values


class SystemConfig(_Strict):
    """The whole system: written to and read from `config.yaml`."""

    name: str = "askexpert-demo"
    seed: int = 0
    device: str = "auto"
    data: DataConfig = DataConfig()
    generalist: ModelConfig = ModelConfig(preset="cpu-generalist")
    expert: ModelConfig = ModelConfig(preset="cpu-expert")
    partition: PartitionConfig = PartitionConfig()
    generalist_training: TrainConfig = TrainConfig(epochs=15, lr=2e-3)
    expert_training: ExpertTrainConfig = ExpertTrainConfig(epochs=12, shared_epochs=10, batch_size=64, lr=2e-3)
    backbone: BackboneConfig = BackboneConfig()
    distill: DistillConfig = DistillConfig()
    routing: RoutingConfig = RoutingConfig()
    serving: ServingConfig = ServingConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @model_validator(mode="after")
    def _check_k(self) -> SystemConfig:
        if self.evaluate.max_k < self.routing.top_k:
            raise ValueError(f"evaluate.max_k={self.evaluate.max_k} is below routing.top_k={self.routing.top_k}")
        return self

    @model_validator(mode="after")
    def _check_mixing_without_teacher(self) -> SystemConfig:
        if self.distill.active and self.generalist_training.mixes:
            raise ValueError(
                "generalist_training: mixup/cutmix cannot be combined with distill.teacher "
                f"{self.distill.teacher!r} (the teacher's logits are computed once, on unmixed images)"
            )
        taught = [name for name, sched in self.expert_training.schedules.items() if sched.distills]
        if taught and self.expert_training.mixes:
            raise ValueError(
                "expert_training: mixup/cutmix cannot be combined with the distill of schedule(s) "
                f"{', '.join(taught)} (the teacher's logits are computed once, on unmixed images)"
            )
        return self

    # ---- YAML in/out -------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> SystemConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
        return cls.from_dict(raw, origin=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, object], origin: str = "config") -> SystemConfig:
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
            )
            raise ConfigError(f"{origin}: invalid config: {problems}") from None

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))

    def with_epochs_scaled(self, factor: float, stages: Collection[str] = EPOCH_STAGES) -> SystemConfig:
        """A validated copy with the epoch counts of `stages` (default all: backbone pretraining, stage 1, the
        generalist, the experts) multiplied by `factor`: one knob for a smoke run or for a budget on a slower
        host, which keeps the split of the budget between the stages that validation chose. The benchmark's
        budget fit names the stages still to run when it corrects for a host's drift."""
        if not (math.isfinite(factor) and factor > 0):
            raise ConfigError(f"the epoch factor must be a positive number, got {factor}")
        unknown = sorted(set(stages) - set(EPOCH_STAGES))
        if unknown:
            raise ConfigError(f"unknown stage(s) {', '.join(unknown)}: the epoch counts are {', '.join(EPOCH_STAGES)}")
        raw = self.model_dump(mode="json")
        for stage in stages:
            path, key = EPOCH_FIELDS[stage]
            section = raw
            for name in path:
                section = section[name]
            section[key] *= factor
        scaled = "epochs" if set(stages) == set(EPOCH_STAGES) else f"epochs of {', '.join(stages)}"
        return SystemConfig.from_dict(raw, origin=f"{self.name} with {scaled} x {factor:g}")

    def with_serving(self, changes: dict[str, object], origin: str = "this run's serving settings") -> SystemConfig:
        """A validated copy whose serving section has `changes` (a command line's: config.yaml is unchanged);
        a bad key or value is a ConfigError naming it."""
        if not changes:
            return self
        raw = self.model_dump(mode="json")
        raw["serving"] = {**raw["serving"], **changes}
        return SystemConfig.from_dict(raw, origin=origin)
