import shutil
from pathlib import Path

import numpy as np
import pytest

from askexpert.errors import CheckpointError, ConfigError
from askexpert.inference.edge import edge_classifier, edge_runtime
from askexpert.models import load_checkpoint, predict_logits
from askexpert.models.local_experts import LocalExpertBackend
from askexpert.models.onnx_export import compare_runtimes
from askexpert.models.onnx_runtime import OnnxGeneralist, source_path
from askexpert.system import SystemDir
from askexpert.training.export_stage import export_generalist


def test_onnx_and_int8_match_pytorch(trained_system: Path, tmp_path: Path) -> None:
    root = tmp_path / "sys"
    shutil.copytree(trained_system, root)
    system = SystemDir.open(root)
    assert edge_runtime(system) == "onnx"  # the demo pipeline exported it
    for path in root.glob("generalist*.onnx*"):
        path.unlink()
    model, _ = load_checkpoint(system.generalist_path)
    assert edge_runtime(system) == "torch"  # nothing exported
    fp32, int8 = export_generalist(system)
    assert (fp32, int8) == (system.onnx_path("onnx"), system.onnx_path("onnx-int8"))
    images = np.random.default_rng(0).integers(0, 256, (37, 32, 32, 3), dtype=np.uint8)
    ref = predict_logits(model, images)
    assert np.allclose(OnnxGeneralist(fp32)(images, batch_size=16), ref, atol=1e-4)
    assert np.abs(OnnxGeneralist(int8)(images) - ref).max() < 0.1
    assert OnnxGeneralist(fp32, threads=1).session.get_session_options().intra_op_num_threads == 1  # an edge profile's
    labels = ref.argmax(1)
    labels[:10] = (labels[:10] + 1) % ref.shape[1]  # 10 of the 37 labels disagree with every runtime
    rows = compare_runtimes(
        {"torch": lambda x: predict_logits(model, x), "onnx": OnnxGeneralist(fp32)}, images, labels, repeats=1
    )
    assert rows[0]["accuracy"] == pytest.approx(27 / 37) and rows[1]["accuracy"] == pytest.approx(27 / 37)
    assert rows[1]["agreement"] == 1.0
    backend = LocalExpertBackend.of_system(system, "static")
    a = edge_classifier(system, backend, runtime="torch")(images)
    b = edge_classifier(system, backend, runtime="onnx")(images)
    assert a.labels.tolist() == b.labels.tolist()
    assert edge_runtime(system) == "onnx"  # the edge's default once a current export exists


def test_a_stale_export_is_redone_or_refused(trained_system: Path, tmp_path: Path) -> None:
    root = tmp_path / "sys"
    shutil.copytree(trained_system, root)
    system = SystemDir.open(root)
    (fp32,) = export_generalist(system, int8=False)
    written = fp32.stat().st_mtime_ns
    assert export_generalist(system, int8=False) == [fp32] and fp32.stat().st_mtime_ns == written  # current: kept
    source_path(fp32).write_text('{"generalist_sha256": "0123456789abcdef"}')  # as if the generalist was retrained
    with pytest.raises(CheckpointError, match="exported from another generalist.*askexpert export onnx"):
        edge_classifier(system, LocalExpertBackend({}), runtime="onnx")
    assert edge_runtime(system) == "torch"  # auto never runs a stale export
    export_generalist(system, int8=False)  # the stage sees it is stale and exports again
    assert edge_runtime(system) == "onnx" and fp32.stat().st_mtime_ns != written


def test_missing_or_unknown_runtime(trained_system: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="askexpert export onnx"):
        OnnxGeneralist(tmp_path / "none.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a loadable ONNX model"):
        OnnxGeneralist(tmp_path / "bad.onnx")
    with pytest.raises(ConfigError, match="unknown edge runtime 'tflite'"):
        edge_classifier(SystemDir.open(trained_system), LocalExpertBackend({}), runtime="tflite")
