import shutil
from pathlib import Path

import numpy as np
import pytest

from askexpert.errors import CheckpointError, ConfigError
from askexpert.inference.backend import LocalExpertBackend
from askexpert.inference.edge import edge_classifier, onnx_path
from askexpert.models import load_checkpoint, predict_logits
from askexpert.models.onnx_export import OnnxGeneralist, compare_runtimes, export_onnx, quantize_int8
from askexpert.partition import Partition
from askexpert.system import SystemDir


def test_onnx_and_int8_match_pytorch(trained_system: Path, tmp_path: Path) -> None:
    root = tmp_path / "sys"
    shutil.copytree(trained_system, root)
    system = SystemDir.open(root)
    model, _ = load_checkpoint(system.generalist_path)
    fp32 = export_onnx(model, onnx_path(system, "onnx"), 32)
    int8 = quantize_int8(fp32, onnx_path(system, "onnx-int8"))
    images = np.random.default_rng(0).integers(0, 256, (37, 32, 32, 3), dtype=np.uint8)
    ref = predict_logits(model, images)
    assert np.allclose(OnnxGeneralist(fp32)(images, batch_size=16), ref, atol=1e-4)
    assert np.abs(OnnxGeneralist(int8)(images) - ref).max() < 0.1
    labels = ref.argmax(1)
    labels[:10] = (labels[:10] + 1) % ref.shape[1]  # 10 of the 37 labels disagree with every runtime
    rows = compare_runtimes(
        {"torch": lambda x: predict_logits(model, x), "onnx": OnnxGeneralist(fp32)}, images, labels, repeats=1
    )
    assert rows[0]["accuracy"] == pytest.approx(27 / 37) and rows[1]["accuracy"] == pytest.approx(27 / 37)
    assert rows[1]["agreement"] == 1.0
    part = Partition.from_json(system.partition_path)
    backend = LocalExpertBackend.from_dir(root / "experts" / "static", part)
    a = edge_classifier(system, backend, runtime="torch")(images)
    b = edge_classifier(system, backend, runtime="onnx")(images)
    assert a.labels.tolist() == b.labels.tolist()


def test_missing_or_unknown_runtime(trained_system: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="askexpert export onnx"):
        OnnxGeneralist(tmp_path / "none.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a loadable ONNX model"):
        OnnxGeneralist(tmp_path / "bad.onnx")
    with pytest.raises(ConfigError, match="unknown edge runtime 'tflite'"):
        edge_classifier(SystemDir.open(trained_system), LocalExpertBackend({}), runtime="tflite")
