"""End to end on the micro system: every stage, the report, and agreement with the live classifier."""

import json
from pathlib import Path

import numpy as np
import pytest

from askexpert.data import load_splits
from askexpert.errors import CheckpointError, RoutingError
from askexpert.inference.backend import BackendError, ExpertReply, LocalExpertBackend
from askexpert.inference.collaborative import CollaborativeClassifier
from askexpert.inference.edge import edge_classifier
from askexpert.partition import Partition
from askexpert.system import SystemDir


def _classifier(root: Path, schedule: str, backend=None) -> tuple[CollaborativeClassifier, object]:
    system = SystemDir.open(root)
    part = Partition.from_json(system.partition_path)
    backend = backend or LocalExpertBackend.from_dir(root / "experts" / schedule, part)
    return edge_classifier(system, backend), load_splits(system.config().data, root).test


def test_report_files_exist(trained_system: Path) -> None:
    report = trained_system / "report"
    for name in (
        "report.md",
        "summary.json",
        "sweep.csv",
        "headline.csv",
        "experts.csv",
        "pareto.png",
        "accuracy_vs_k.png",
        "expert_load.png",
        "expert_accuracy.png",
    ):
        assert (report / name).stat().st_size > 0, name
    assert (report / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (report / "report.md").read_text()
    assert "near-edge only" in text and "oracle routing" in text and "progressive" in text


@pytest.mark.parametrize("schedule", ["static", "progressive"])
def test_report_agrees_with_the_live_classifier(trained_system: Path, schedule: str) -> None:
    summary = json.loads((trained_system / "report" / "summary.json").read_text())
    clf, test = _classifier(trained_system, schedule)
    pred = clf(test.images)
    row = next(r for r in summary["headline"] if r["schedule"] == schedule and r["system"].startswith("collaborative"))
    offloaded = pred.source != "edge"
    assert row["accuracy"] == pytest.approx(float((pred.labels == test.labels).mean()), abs=1e-12)
    assert row["offload_rate"] == pytest.approx(float(offloaded.mean()), abs=1e-12)
    gen = next(r for r in summary["headline"] if r["schedule"] == schedule and r["system"].startswith("generalist"))
    assert gen["accuracy"] == pytest.approx(float((pred.generalist_labels == test.labels).mean()), abs=1e-12)
    # records are complete and consistent
    assert set(pred.source) <= {"edge", "expert", "fallback"}
    assert (pred.expert[offloaded] != "").all() and (pred.expert[~offloaded] == "").all()
    assert (pred.labels[pred.source != "expert"] == pred.generalist_labels[pred.source != "expert"]).all()
    assert np.isnan(pred.expert_confidence[~offloaded]).all()
    abstained = pred.reason == "abstain"
    assert (
        row["abstain_rate"] == pytest.approx(abstained.sum() / max(1, offloaded.sum()), abs=1e-12)
        or not offloaded.any()
    )
    record = pred.record(0)
    assert set(record) >= {"label", "source", "expert", "topk", "expert_confidence"}


def test_unreachable_expert_falls_back_with_reason(trained_system: Path) -> None:
    class Down:
        def predict(self, expert_id: str, images: np.ndarray) -> ExpertReply:
            raise BackendError("connection refused")

    clf, test = _classifier(trained_system, "static", backend=Down())
    clf.router.tau = 1.0 + 1e-6  # offload every sample
    pred = clf(test.images)
    assert (pred.source == "fallback").all()
    assert all(r.startswith("error: connection refused") for r in pred.reason)
    assert (pred.labels == pred.generalist_labels).all()


def test_rerun_reuses_finished_stages(trained_system: Path) -> None:
    from askexpert.pipeline import run_pipeline

    weights = sorted(trained_system.rglob("*.safetensors"))
    before = {p: p.stat().st_mtime_ns for p in weights}
    summary = run_pipeline(SystemDir.open(trained_system), log=lambda _m: None)
    assert {p: p.stat().st_mtime_ns for p in weights} == before
    assert summary["timings_s"]["train generalist"] < 5


def test_bad_inputs_give_clear_errors(trained_system: Path, tmp_path: Path) -> None:
    clf, test = _classifier(trained_system, "static")
    with pytest.raises(RoutingError, match="uint8"):
        clf(test.images.astype(np.float32))
    with pytest.raises(RoutingError, match="unknown expert 'e9'"):
        clf.backend.predict("e9", test.images[:2])  # type: ignore[attr-defined]
    part = Partition.from_json(trained_system / "partition.json")
    swapped = Partition("manual", part.num_classes, part.expert_ids, tuple(reversed(part.subsets)))
    with pytest.raises(CheckpointError, match="retrain the experts"):
        LocalExpertBackend.from_dir(trained_system / "experts" / "static", swapped)
