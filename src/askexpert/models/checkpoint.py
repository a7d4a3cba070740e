"""Checkpoints: weights as safetensors (no pickle), facts as a JSON sidecar (`models.meta`).

`<name>.safetensors` holds the backbone's state dict; `<name>.json` holds what
the weights mean: the preset, the global class id behind each output (an
expert's last output is "other"), the schedule and seed that made it, its
metrics, library versions, and the SHA-256 of the weights file, so a
truncated or swapped file is caught on load with a message naming it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import safetensors.torch
import timm
import torch
from safetensors import SafetensorError

from askexpert import __version__
from askexpert.errors import CheckpointError
from askexpert.models.meta import FORMAT, CheckpointMeta, file_sha256, meta_path, read_meta
from askexpert.models.registry import ImageClassifier, create_model


def save_checkpoint(model: ImageClassifier, path: str | Path, meta: CheckpointMeta) -> CheckpointMeta:
    """Write weights then metadata (atomically each), returning the completed metadata."""
    path = Path(path)
    if model.num_outputs != meta.num_outputs:
        raise CheckpointError(f"{path}: model has {model.num_outputs} outputs but metadata lists {meta.num_outputs}")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    tmp = path.with_suffix(".safetensors.tmp")
    # One metadata key: safetensors writes its metadata map in a per-process random order (a Rust HashMap),
    # so two keys made identical weights hash differently from one run to the next.
    header = json.dumps({"format": FORMAT, "preset": meta.preset}, sort_keys=True)
    safetensors.torch.save_file(state, str(tmp), metadata={"askexpert": header})
    tmp.replace(path)
    meta.sha256 = file_sha256(path)
    meta.versions = {"askexpert": __version__, "torch": torch.__version__, "timm": timm.__version__}
    side = meta_path(path)
    side.with_suffix(".json.tmp").write_text(json.dumps(asdict(meta), indent=1))
    side.with_suffix(".json.tmp").replace(side)
    return meta


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[ImageClassifier, CheckpointMeta]:
    """Load and validate: files present, hash matches, preset known, every tensor's shape matches."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    meta = read_meta(path)
    actual = file_sha256(path)
    if meta.sha256 and actual != meta.sha256:
        raise CheckpointError(
            f"{path}: contents do not match the SHA-256 in {meta_path(path).name} (file corrupt, truncated or replaced)"
        )
    try:
        state = safetensors.torch.load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from None
    model = create_model(meta.preset, meta.num_outputs)
    expected = model.backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensors do not match preset {meta.preset!r}: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: tensor {key} has shape {tuple(state[key].shape)}, "
                f"preset {meta.preset!r} with {meta.num_outputs} outputs needs {tuple(tensor.shape)}"
            )
    model.backbone.load_state_dict(state)
    model.eval()
    return model.to(device), meta
