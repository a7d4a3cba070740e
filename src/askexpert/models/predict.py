"""Batched inference over uint8 arrays: the one place that turns images into logits."""

from __future__ import annotations

from collections.abc import Iterable

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


@torch.inference_mode()
def predict_logits(
    model: ImageClassifier,
    images: np.ndarray,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    desc: str | None = None,
) -> np.ndarray:
    """Logits (N, outputs) as float32, computed in eval mode in batches."""
    device = torch.device(device)
    model.eval()
    if model.mean.device != device:  # moving is not free; serving calls this per batch
        model.to(device)
    out = np.empty((len(images), model.num_outputs), dtype=np.float32)
    starts: Iterable[int] = range(0, len(images), batch_size)
    if desc is not None:
        starts = progress(starts, desc=desc, unit="batch", leave=False)
    for start in starts:
        chunk = images[start : start + batch_size]
        # torch wants writable memory; a server's decoded body is a read-only view (copying it is cheap)
        batch = torch.from_numpy(chunk if chunk.flags.writeable else chunk.copy()).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(batch)
        out[start : start + len(batch)] = logits.float().cpu().numpy()
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

    def __call__(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        return predict_logits(self.model, images, self.device, batch_size)
