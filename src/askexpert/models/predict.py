"""Batched inference over uint8 arrays: the one place that turns images into logits."""

from __future__ import annotations

import platform
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from askexpert.errors import ConfigError
from askexpert.models.registry import ImageClassifier
from askexpert.progress import progress


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' picks CUDA when present; anything else is checked and passed to torch as given.

    A device torch cannot name, or CUDA on a machine without it, is a ConfigError saying so
    (torch's own error comes from deep inside the first tensor move).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA GPU on this machine")
    return device


# Images per forward pass. On a CPU small batches keep the activations in cache: a `cpu-cct-expert` pass
# took 0.63 ms per image at 32-128 images against 0.97 ms at 512 (2 cores, float32; the logits bit-identical).
CPU_BATCH = 64
CUDA_BATCH = 512


def native_cpu_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (AVX512-BF16 or AMX); elsewhere
    torch emulates them, slower than float32.

    Asked of the CPU's instruction sets, not of oneDNN: `torch.ops.mkldnn._is_mkldnn_bf16_supported()`
    also says yes on AVX-512 without BF16, where oneDNN converts, and a `cpu-cct-expert` pass with
    the mirror took 4.9-5.0 ms per image in bfloat16 against 2.8 ms in float32 (an Ice Lake-class Xeon,
    2 cores, docs/cifar100-log.md)."""
    if not torch.backends.mkldnn.is_available():
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cpu_description() -> str:
    """The CPU in one line, for benchmark records: its model name (from /proc/cpuinfo where there is one),
    torch's vector capability and whether bfloat16 is native. Why: the same configuration ran 85.5 to ~156
    minutes on four 2-core hosts, and `x86_64` alone did not say which one a record came from."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    native = "native" if native_cpu_bfloat16() else "not native"
    return f"{name} ({torch.backends.cpu.get_cpu_capability()}, bfloat16 {native})"


def cpu_bfloat16_usable(requested: bool, device: torch.device, setting: str = "serving.cpu_bfloat16") -> bool:
    """A `cpu_bfloat16` setting (`serving.` or a training budget's) as it can be honoured here: on a CPU
    without native bfloat16 it would be slower than float32, so the work runs in float32 and a warning
    names the setting."""
    if not requested or device.type != "cpu":
        return False
    if native_cpu_bfloat16():
        return True
    # stacklevel 1: the warning's location is this line, so the default filter shows it once per setting
    # and process (a command asks at several call sites: the cache key, the engine, the predictions)
    warnings.warn(
        f"{setting} is set, but this CPU has no native bfloat16 (AVX512-BF16 or AMX): it runs in float32",
        stacklevel=1,
    )
    return False


def bfloat16_honoured(requested: bool, device: torch.device) -> bool:
    """Whether a `cpu_bfloat16` setting stands on `device` (the flag `ServingConfig.resolve` and
    `expert_runtime` take): CUDA runs bfloat16 anyway; a CPU only with native bfloat16 (`cpu_bfloat16_usable`,
    which warns where it asks for float32 instead)."""
    return device.type != "cpu" or cpu_bfloat16_usable(requested, device)


@torch.inference_mode()
def predict_logits(
    model: ImageClassifier,
    images: np.ndarray,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    desc: str | None = None,
    flip: bool = False,
    cpu_bfloat16: bool = False,
) -> np.ndarray:
    """Logits (N, outputs) as float32, computed in eval mode in batches (default: `CPU_BATCH` images on a CPU,
    `CUDA_BATCH` on a GPU).

    `flip`: the mean of the logits of each image and of its mirror image (test-time
    augmentation; both halves in one forward pass, so a batch's images share its cost).
    `cpu_bfloat16`: bfloat16 autocast on a CPU too (CUDA always uses it); callers check
    `cpu_bfloat16_usable` first.
    """
    device = torch.device(device)
    model.eval()
    if model.mean.device != device:  # moving is not free; serving calls this per batch
        model.to(device)
    if batch_size is None:
        batch_size = CUDA_BATCH if device.type == "cuda" else CPU_BATCH
    out = np.empty((len(images), model.num_outputs), dtype=np.float32)
    starts: Iterable[int] = range(0, len(images), batch_size)
    if desc is not None:
        starts = progress(starts, desc=desc, unit="batch", leave=False)
    bf16 = device.type == "cuda" or (cpu_bfloat16 and device.type == "cpu")
    for start in starts:
        chunk = images[start : start + batch_size]
        # torch wants writable memory; a server's decoded body is a read-only view (copying it is cheap)
        batch = torch.from_numpy(chunk if chunk.flags.writeable else chunk.copy()).to(device)
        if flip:  # images are (N, H, W, C): mirror the width
            batch = torch.cat([batch, batch.flip(2)])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch).float()
        if flip:
            logits = (logits[: len(chunk)] + logits[len(chunk) :]) / 2
        out[start : start + len(chunk)] = logits.cpu().numpy()
    return out


class TorchGeneralist:
    """A checkpoint's model behind the edge's generalist interface (`num_outputs`, images → logits).

    The edge's other runtime is `models.onnx_runtime.OnnxGeneralist`; the classifier takes either.
    """

    def __init__(self, model: ImageClassifier, device: str | torch.device = "cpu", threads: int = 0) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.model = model
        self.device = resolve_device(device)
        self.num_outputs = model.num_outputs

    def __call__(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        return predict_logits(self.model, images, self.device, batch_size)
