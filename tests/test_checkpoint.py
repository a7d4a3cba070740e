import json
import warnings
from pathlib import Path

import pytest
import torch

from askexpert.errors import CheckpointError, ConfigError
from askexpert.models import CheckpointMeta, create_model, load_checkpoint, save_checkpoint


def _saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = create_model("micro-expert", 5)
    path = tmp_path / "e0.safetensors"
    save_checkpoint(model, path, CheckpointMeta(role="expert", preset="micro-expert", classes=[3, 1, 4, 9, -1]))
    return path, model


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    path, model = _saved(tmp_path)
    loaded, meta = load_checkpoint(path)
    ref, got = model.backbone.state_dict(), loaded.backbone.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert meta.classes == [3, 1, 4, 9, -1] and meta.sha256 and meta.versions["torch"] == torch.__version__
    x = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    model.eval()
    assert torch.equal(model(x), loaded(x))


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope.safetensors: checkpoint not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    path, _ = _saved(tmp_path)
    path.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError, match="metadata missing"):
        load_checkpoint(path)


def test_corrupt_weights_are_caught(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match the SHA-256"):
        load_checkpoint(path)
    # without a recorded hash, the safetensors reader itself must fail cleanly on garbage
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["sha256"] = ""
    path.with_suffix(".json").write_text(json.dumps(meta))
    path.write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(path)


def test_mismatched_metadata_is_caught(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    meta_file = path.with_suffix(".json")
    meta = json.loads(meta_file.read_text())
    meta["classes"] = [0, 1, -1]  # says 3 outputs, weights have 5
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"head.weight has shape \(5, 24\).*needs \(3, 24\)"):
        load_checkpoint(path)
    meta["classes"], meta["preset"] = [3, 1, 4, 9, -1], "micro-generalist"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="micro-generalist"):
        load_checkpoint(path)
    meta["preset"] = "no-such-preset"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="unknown model preset 'no-such-preset'"):
        load_checkpoint(path)
    meta_file.write_text("{not json")
    with pytest.raises(CheckpointError, match="malformed checkpoint metadata"):
        load_checkpoint(path)


def test_pretrained_weights_come_from_a_local_file(tmp_path: Path) -> None:
    import safetensors.torch

    donor = create_model("micro-generalist", 7)
    weights = tmp_path / "pre.safetensors"
    safetensors.torch.save_file(donor.backbone.state_dict(), str(weights))
    model = create_model("micro-generalist", 3, pretrained_file=weights)
    assert torch.equal(model.backbone.blocks[0].attn.qkv.weight, donor.backbone.blocks[0].attn.qkv.weight)
    assert model.num_outputs == 3
    with pytest.raises(CheckpointError, match="pretrained weights not found"):
        create_model("micro-generalist", 3, pretrained_file=tmp_path / "missing.safetensors")


def test_versions_are_checked(tmp_path: Path) -> None:
    from askexpert.errors import CheckpointVersionWarning

    path, _ = _saved(tmp_path)
    meta_file = path.with_suffix(".json")
    meta = json.loads(meta_file.read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the releases that wrote it load silently
        load_checkpoint(path)
    meta["versions"]["timm"] = "0.9.2"
    meta_file.write_text(json.dumps(meta))
    with pytest.warns(CheckpointVersionWarning, match=r"e0\.json: written under timm 0\.9\.2 \(now "):
        loaded, _ = load_checkpoint(path)
    assert loaded.num_outputs == 5  # a warning, not a refusal
    meta["versions"]["askexpert"] = "99.0.0"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="written by askexpert 99.0.0, newer than this askexpert"):
        load_checkpoint(path)


def test_devices_are_checked_before_use() -> None:
    from askexpert.models import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
