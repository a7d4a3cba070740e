"""End to end on the micro system: every stage, the report, and agreement with the live classifier."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from askexpert.data import load_splits
from askexpert.errors import CheckpointError, RoutingError
from askexpert.inference.collaborative import CollaborativeClassifier
from askexpert.inference.edge import edge_classifier
from askexpert.models.local_experts import LocalExpertBackend
from askexpert.partition import Partition
from askexpert.protocol.backend import BackendError, ExpertReply
from askexpert.system import SystemDir


def _classifier(root: Path, schedule: str, backend=None) -> tuple[CollaborativeClassifier, object]:
    system = SystemDir.open(root)
    backend = backend or LocalExpertBackend.of_system(system, schedule)  # the experts as the system runs them
    return edge_classifier(system, backend, runtime="torch"), load_splits(system.config().data, root).test


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
    clf.router = clf.router.at(clf.router.point.updated(gate="max_prob", tau=1.0))  # offload every sample
    pred = clf(test.images)
    assert (pred.source == "fallback").all()
    assert all(r.startswith("error: connection refused") for r in pred.reason)
    assert (pred.labels == pred.generalist_labels).all()


def test_rerun_reuses_finished_stages(trained_system: Path) -> None:
    from askexpert.pipeline import run_pipeline

    weights = sorted(trained_system.rglob("*.safetensors"))
    before = {p: p.stat().st_mtime_ns for p in weights}
    summary = run_pipeline(SystemDir.open(trained_system), log=lambda _m: None)
    assert {p: p.stat().st_mtime_ns for p in weights} == before  # nothing retrained, nothing rewritten
    assert set(summary["timings_s"]) >= {"train generalist", "evaluate"}


def test_bad_inputs_give_clear_errors(trained_system: Path, tmp_path: Path) -> None:
    clf, test = _classifier(trained_system, "static")
    with pytest.raises(RoutingError, match="uint8"):
        clf(test.images.astype(np.float32))
    with pytest.raises(RoutingError, match="unknown expert 'e9'"):
        clf.backend.predict("e9", test.images[:2])  # type: ignore[attr-defined]
    part = Partition.from_json(trained_system / "partition.json")
    swapped = Partition("manual", part.num_classes, part.expert_ids, tuple(reversed(part.subsets)))
    with pytest.raises(CheckpointError, match="retrain the experts"):
        LocalExpertBackend.from_dir(trained_system / "experts" / "static", swapped, flip=True)


def test_choices_are_made_on_validation(trained_system: Path) -> None:
    """No point of the grid does better on validation than the chosen one, by the live classifier's count.

    The live edge (generalist, router, experts in process) runs on the validation images at
    every confidence-gate point of the grid: an independent path from the cached sweep that chose.
    """
    from askexpert.config import RoutingConfig

    system = SystemDir.open(trained_system)
    cfg = system.config()
    summary = json.loads((trained_system / "report" / "summary.json").read_text())
    val = system.splits().val
    taus = sorted({*np.linspace(0.0, 1.0, cfg.evaluate.taus)[::2].round(6)})
    rules = [("replace", 0.0)] + [(pool, w) for pool in ("mix", "logmix") for w in cfg.evaluate.mix_weights]
    for schedule, chosen in summary["chosen_on_validation"].items():
        point = RoutingConfig(**chosen)
        rows = [r for r in summary["combination_rules"] if r["schedule"] == schedule]
        one = {"replace", "mix", "logmix"}
        assert {r["rule"] for r in rows} == one | {f"{r} + 2nd expert" for r in one}
        reported = max(r["val_accuracy"] for r in rows)  # the chosen point's validation accuracy
        clf, _ = _classifier(trained_system, schedule)

        def live(p: RoutingConfig, clf: CollaborativeClassifier = clf) -> float:
            clf.router = clf.router.at(p)
            return float((clf(val.images).labels == val.labels).mean())

        grid = [
            point.model_copy(
                update={"gate": g, "tau": t, "top_k": k, "combine": r, "mix_weight": w, "second_within": s}
            )
            for g in ("max_prob", "margin", "entropy")
            for t in taus
            for k in range(1, cfg.evaluate.max_k + 1)
            for r, w in rules
            for s in {0.0, *cfg.evaluate.second_withins}
        ]
        best = max(live(p) for p in grid)
        assert best <= reported + 1e-12, f"{schedule}: a grid point scores {best} on validation, the chosen {reported}"
        if point.gate != "learned":  # a confidence gate: the live edge reproduces the chosen point's figure
            assert live(point) == pytest.approx(reported, abs=1e-12)


@pytest.mark.parametrize("schedule", ["static", "progressive"])
def test_live_classifier_at_the_chosen_point_matches_the_report(trained_system: Path, schedule: str) -> None:
    summary = json.loads((trained_system / "report" / "summary.json").read_text())
    from askexpert.config import RoutingConfig
    from askexpert.deferral import gate_fingerprint
    from askexpert.evaluate.cache import build_cache
    from askexpert.evaluate.gates import fit_chosen_gate
    from askexpert.inference.collaborative import CollaborativeClassifier
    from askexpert.routing import Router

    point = RoutingConfig(**summary["chosen_on_validation"][schedule])
    clf, test = _classifier(trained_system, schedule)
    system = SystemDir.open(trained_system)
    deferral = None
    if point.gate == "learned":  # the gate evaluate fitted for this schedule and k, on all of validation
        val = build_cache(system, ["progressive", "static"], split="val")
        fitted_on = gate_fingerprint(system, schedule)
        deferral = fit_chosen_gate(val, val.schedules[schedule], point.top_k, point.scoring, fitted_on)
    router = Router(clf.partition.membership(), point, deferral)
    clf = CollaborativeClassifier(clf.generalist, router, clf.partition, clf.backend)
    pred = clf(test.images)
    row = next(r for r in summary["headline"] if r["schedule"] == schedule and "chosen on validation" in r["system"])
    assert row["accuracy"] == pytest.approx(float((pred.labels == test.labels).mean()), abs=1e-12)
    assert row["offload_rate"] == pytest.approx(float((pred.source != "edge").mean()), abs=1e-12)


def test_progressive_experts_start_from_stage1_and_keep_other(trained_system: Path) -> None:
    from askexpert.models import read_meta

    system = SystemDir.open(trained_system)
    stage1 = read_meta(system.stage1_path)
    assert stage1.role == "stage1" and len(stage1.classes) == 12
    for eid in Partition.from_json(system.partition_path).expert_ids:
        prog = read_meta(system.expert_path("progressive", eid))
        assert prog.extra["init"] == str(system.stage1_path)
        assert prog.extra["schedule"]["correct_other"] is True
        assert np.isfinite(prog.extra["other_logit_correction"])
        static = read_meta(system.expert_path("static", eid))
        assert static.extra["schedule"]["init"] == "pretrained" and static.extra["other_logit_correction"] == 0.0
    summary = json.loads((trained_system / "report" / "summary.json").read_text())
    budget = {r["schedule"]: r for r in summary["budgets"]}
    assert budget["progressive"]["own_images_per_expert"] == budget["static"]["own_images_per_expert"]
    assert budget["progressive"]["per_expert_charged_whole"] == pytest.approx(
        budget["progressive"]["own_images_per_expert"] + budget["progressive"]["stage1_images"]
    )
    assert budget["static"]["stage1_images"] == 0
    assert {"closed_set_subsets", "open_set_subsets", "system"} <= set(summary["versus_static"][0])


def test_backbone_pretraining_feeds_both_roles(tmp_path: Path) -> None:
    from askexpert.config import SystemConfig
    from askexpert.models import read_meta
    from askexpert.training.experts import train_experts
    from askexpert.training.generalist import train_generalist
    from askexpert.training.partition_stage import build_partition
    from askexpert.training.shared import train_backbones
    from conftest import MICRO

    raw = json.loads(json.dumps(MICRO))
    raw["backbone"] = {
        "data": {"source": "synth", "root": "pretrain", "synth": {**raw["data"]["synth"], "seed": 7}},
        "training": {"epochs": 1, "batch_size": 32},
    }
    raw["partition"]["strategy"] = "random"
    system = SystemDir.create(tmp_path / "sys", SystemConfig.from_dict(raw))
    with pytest.raises(CheckpointError, match="run `askexpert train backbone"):
        train_generalist(system)
    metas = train_backbones(system)
    assert [m.preset for m in metas] == ["micro-generalist", "micro-expert"]
    assert all(m.role == "backbone" and "val_accuracy" in m.metrics for m in metas)
    gen = train_generalist(system)
    assert gen.extra["init"] == str(system.backbone_path("micro-generalist"))
    build_partition(system)
    static = train_experts(system, "static")
    assert all(m.extra["init"] == str(system.backbone_path("micro-expert")) for m in static)
    # Retraining a backbone makes the models that started from it stale.
    raw["backbone"]["training"]["epochs"] = 2
    SystemConfig.from_dict(raw).to_yaml(system.config_path)
    train_backbones(system)
    assert train_generalist(system).sha256 != gen.sha256
    assert read_meta(system.backbone_path("micro-expert")).extra["steps"] > metas[1].extra["steps"]


def test_generalist_closed_set_is_its_argmax_over_the_subset(trained_system: Path) -> None:
    from askexpert.evaluate.cache import build_cache
    from askexpert.evaluate.metrics import expert_table

    cache = build_cache(SystemDir.open(trained_system))
    for row, subset in zip(expert_table(cache), cache.partition.subsets, strict=True):
        mask = np.isin(cache.labels, subset)
        sub = np.asarray(subset)
        want = float((sub[cache.gen_probs[mask][:, sub].argmax(1)] == cache.labels[mask]).mean())
        assert row["generalist closed-set"] == pytest.approx(want)
        assert row["generalist closed-set"] >= row["generalist"]  # restricting the choice can only help


def test_stage1_closed_set_column_shows_where_the_experts_start(trained_system: Path, tmp_path: Path) -> None:
    import shutil

    from askexpert.evaluate.cache import build_cache, build_stage1_logits
    from askexpert.evaluate.metrics import expert_table
    from askexpert.models import load_checkpoint, predict_logits
    from askexpert.models.predict import cpu_bfloat16_usable

    system = SystemDir.open(trained_system)
    cache = build_cache(system)
    stage1 = build_stage1_logits(system)
    assert stage1 is not None and stage1.shape == cache.gen_probs.shape
    # run as the experts are served (flip, bfloat16 where the CPU has it), stored beside the cache and read back
    serving = system.config().serving
    model, _ = load_checkpoint(system.stage1_path)
    images = load_splits(system.config().data, trained_system).test.images
    bf16 = cpu_bfloat16_usable(serving.cpu_bfloat16, torch.device("cpu"))
    want = predict_logits(model, images, flip=serving.test_time_flip, cpu_bfloat16=bf16)
    assert np.allclose(stage1, want, rtol=0.0, atol=1e-6)
    assert np.array_equal(build_stage1_logits(system), stage1)
    assert any(p.name.startswith("stage1-") for p in system.cache_dir.iterdir())
    # answers written by hand: a stage 1 that always names its subset's first class is right exactly on the
    # samples of that class
    first_class = np.zeros_like(stage1)
    for e, subset in enumerate(cache.partition.subsets):
        first_class[:] = 0.0
        first_class[:, subset[0]] = 1.0
        in_subset = np.isin(cache.labels, subset)
        want = float((cache.labels[in_subset] == subset[0]).mean())
        assert expert_table(cache, first_class)[e]["stage 1 closed-set"] == pytest.approx(want)
    assert "stage 1 closed-set" not in expert_table(cache)[0]
    assert "stage 1 closed-set" in (trained_system / "report" / "experts.csv").read_text()  # `evaluate` reports it
    # a system without stage 1 has no such column
    bare = tmp_path / "bare"
    shutil.copytree(trained_system, bare)
    (bare / "stage1.safetensors").unlink()
    assert build_stage1_logits(SystemDir.open(bare)) is None
