"""The learned deferral gate: it learns what confidence cannot see, decides the same everywhere, refuses staleness."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from askexpert.config import RoutingConfig
from askexpert.deferral import BREAK, FIX, SAME, DeferralGate, outcome_labels
from askexpert.errors import CheckpointError, RoutingError
from askexpert.evaluate.cache import LogitCache, _schedule_outputs, build_cache
from askexpert.evaluate.gates import competence, cross_fit_scores, curve_mean, fit_chosen_gate, fit_gate
from askexpert.evaluate.metrics import gate_statistic, offload_masks, outcomes, routed_experts, tau_for_rate
from askexpert.partition import Partition
from askexpert.routing import Router


def _specialist_cache(n: int = 1200, seed: int = 0) -> LogitCache:
    """Expert e1 is always right and e0 always wrong; the generalist is right half the time whatever its
    confidence. A confidence gate cannot tell the two apart; which expert is routed to tells everything."""
    rng = np.random.default_rng(seed)
    part = Partition("random", 4, ("e0", "e1"), ((0, 1), (2, 3)))
    y = rng.integers(0, 4, n)
    logits = rng.normal(0, 1.5, (n, 4))
    right = rng.random(n) < 0.5
    top = np.where(right, y, (y + rng.integers(1, 4, n)) % 4)
    logits[np.arange(n), top] += 3.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    e0 = np.where(y == 0, 1, 0)  # e0 answers one of its classes, always the wrong one
    pos1 = np.where(np.isin(y, (2, 3)), y - 2, 2)  # e1: right on its classes, "other" elsewhere
    out = _schedule_outputs({"e0": np.eye(3)[e0] * 5, "e1": np.eye(3)[pos1] * 5}, part)
    return LogitCache(y, probs.astype(np.float32), part, {"s": out}, "k")


def test_outcomes_are_written_out_by_hand() -> None:
    gen = np.array([0, 1, 2, 3, 0])
    expert = np.array([0, 2, 2, -1, 1])  # -1: "other", falls back
    labels = np.array([0, 2, 1, 0, 0])
    assert outcome_labels(gen, expert, labels).tolist() == [SAME, FIX, SAME, SAME, BREAK]


def test_learned_gate_finds_what_confidence_cannot() -> None:
    val, test = _specialist_cache(seed=0), _specialist_cache(seed=1)
    gate = fit_gate(val, val.schedules["s"], 1, "weighted", "fp")
    membership = test.partition.membership()
    chosen = routed_experts(test, 1, "weighted")
    learned = gate.score(test.gen_probs, membership, chosen)
    oof = cross_fit_scores(val, val.schedules["s"], 1, "weighted")
    in_sample = gate.score(val.gen_probs, membership, routed_experts(val, 1, "weighted"))
    assert oof.shape == (len(val.labels),) and not np.allclose(oof, in_sample)  # each fifth scored by the others
    acc = {}
    for name, stat, val_stat in (
        ("learned", learned, oof),
        ("margin", gate_statistic(test, "margin"), gate_statistic(val, "margin")),
    ):
        tau = tau_for_rate(name, val_stat, 0.3)
        res = outcomes(test, test.schedules["s"], offload_masks(stat, name, np.asarray([tau])), chosen)
        acc[name] = float(res["accuracy"][0])
    # the learned gate offloads the samples routed to e1 (which fixes) and keeps e0's (which breaks)
    assert acc["learned"] > acc["margin"] + 0.05


def test_gate_file_round_trip_and_bad_files(tmp_path: Path) -> None:
    cache = _specialist_cache(300)
    gate = fit_gate(cache, cache.schedules["s"], 2, "weighted", "abc")
    path = tmp_path / "gate.json"
    gate.to_json(path)
    back = DeferralGate.from_json(path)
    chosen = routed_experts(cache, 2, "weighted")
    m = cache.partition.membership()
    assert np.array_equal(back.score(cache.gen_probs, m, chosen), gate.score(cache.gen_probs, m, chosen))
    with pytest.raises(CheckpointError, match="not found"):
        DeferralGate.from_json(tmp_path / "missing.json")
    data = json.loads(path.read_text())
    data["coef"] = data["coef"][:1] if len(data["outcomes"]) == 3 else [[0.0]]
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="not a deferral gate file"):
        DeferralGate.from_json(path)
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a deferral gate file"):
        DeferralGate.from_json(path)
    learned = RoutingConfig(gate="learned", tau=0.5, top_k=2)
    with pytest.raises(RoutingError, match="needs its fitted deferral gate"):
        Router(m, learned)
    with pytest.raises(RoutingError, match="fitted for k=2"):
        Router(m, learned.updated(top_k=1), deferral=gate)


def test_expected_gain_form_by_hand(tmp_path: Path) -> None:
    membership = np.array([[1, 1, 0], [0, 1, 1]])
    # expert 0 saw class 0 twice (right once) and class 1 once (right); expert 1 saw class 2 once (wrong)
    expert, labels, right = np.array([0, 0, 0, 1]), np.array([0, 0, 1, 2]), np.array([True, False, True, False])
    q = competence(expert, right, labels, membership, prior=1.0)
    # own means: expert 0 2/3, expert 1 0/1; cell = (hits + prior·mean) / (count + prior), 0 outside the subset
    np.testing.assert_allclose(q, [[(1 + 2 / 3) / 3, (1 + 2 / 3) / 2, 0.0], [0.0, 0.0, 0.0]])
    table = np.array([[0.8, 0.5, 0.0], [0.0, 0.9, 0.6]])
    gate = DeferralGate.expected_gain(2, "weighted", "fp", table)
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    # sample 0 → expert 0: 0.6·0.8 + 0.3·0.5 = 0.63 against max p 0.6; sample 1 → expert 1: 0.45 + 0.18 against 0.5
    assert gate.score(probs, membership, np.array([0, 1])).tolist() == pytest.approx([(1 + 0.03) / 2, (1 + 0.13) / 2])
    path = tmp_path / "gate.json"
    gate.to_json(path)
    back = DeferralGate.from_json(path)
    assert back.form == "expected_gain" and json.loads(path.read_text())["format"].endswith("/2")
    routed = np.array([0, 1])
    assert np.array_equal(back.score(probs, membership, routed), gate.score(probs, membership, routed))
    with pytest.raises(RoutingError, match="competence of shape"):
        gate.score(probs[:, :2], membership[:, :2], np.array([0, 1]))
    data = json.loads(path.read_text())
    del data["competence"]
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="no competence table"):
        DeferralGate.from_json(path)


def test_the_form_is_judged_by_mean_gain_over_offload_rates() -> None:
    y = np.array([FIX] * 5 + [SAME] * 10 + [BREAK] * 5)
    best, worst = np.arange(20.0)[::-1], np.arange(20.0)
    # offloading fixes first gains 1/20 a sample up to 5 of 20; reaching 95 % with the breaks last costs 4 of them
    gains = np.minimum(np.arange(1, 20), 5) - np.maximum(np.arange(1, 20) - 15, 0)
    assert curve_mean(best, y) == pytest.approx(float(np.mean(gains / 20)))
    assert curve_mean(worst, y) < 0 < curve_mean(best, y)
    val = _specialist_cache(seed=0)
    gate = fit_chosen_gate(val, val.schedules["s"], 1, "weighted", "fp")
    judged = gate.info["validation_mean_gain"]
    assert gate.form == max(judged, key=judged.get) and set(judged) == {"logistic", "expected_gain"}
    # either form finds e1's fixes, which confidence cannot: both gain more than offloading at random
    chosen = routed_experts(val, 1, "weighted")
    y_val = outcome_labels(val.gen_pred, val.schedules["s"].labels[chosen, np.arange(len(val.labels))], val.labels)
    at_random = curve_mean(np.random.default_rng(0).random(len(y_val)), y_val)
    assert min(judged.values()) > at_random + 0.01


def test_routing_hit_rate_by_hand() -> None:
    part = Partition("random", 4, ("e0", "e1"), ((0, 1), (2, 3)))
    y = np.array([0, 2, 3, 1])
    probs = np.full((4, 4), 0.1, np.float32)
    probs[np.arange(4), [0, 0, 3, 2]] = 0.7  # routed (k=1): e0, e0, e1, e1
    out = _schedule_outputs({"e0": np.eye(3)[[0, 0, 0, 0]], "e1": np.eye(3)[[0, 0, 1, 0]]}, part)
    cache = LogitCache(y, probs, part, {"s": out}, "k")
    offload = np.array([[True, True, True, False], [True, True, True, True]])
    res = outcomes(cache, out, offload, routed_experts(cache, 1, "weighted"))
    # offloaded 0,1,2: sample 0 (class 0 → e0) hit, 1 (class 2 → e0) miss, 2 (class 3 → e1) hit: 2 of 3
    # all four: sample 3 (class 1 → e1) misses too: 2 of 4
    assert res["routing_hit_rate"].tolist() == pytest.approx([2 / 3, 2 / 4])


@pytest.fixture(scope="module")
def learned_system(trained_system: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the micro system routed by its learned gate (evaluate fits it), τ at the test median."""
    from askexpert.deferral import FORMAT, FORMAT_COMPETENCE
    from askexpert.evaluate.run import evaluate_system
    from askexpert.system import SystemDir

    root = tmp_path_factory.mktemp("learned") / "system"
    shutil.copytree(trained_system, root)
    system = SystemDir.open(root)
    summary = evaluate_system(system)
    data = json.loads(system.deferral_gate_path.read_text())
    gate = DeferralGate.from_json(system.deferral_gate_path)
    assert data["format"] == (FORMAT if gate.form == "logistic" else FORMAT_COMPETENCE)  # the form validation chose
    assert summary["deferral_gate"]["form"] == gate.form  # and the report (and `evaluate`'s line) names it
    cache = build_cache(system, ["progressive"])
    score = gate.score(cache.gen_probs, cache.partition.membership(), routed_experts(cache, gate.k, gate.scoring))
    routing = {"gate": "learned", "tau": float(np.median(score)), "top_k": gate.k, "combine": "replace"}
    system.update_config("test", routing=routing, serving={"schedule": "progressive"})
    return root


def test_learned_gate_decides_the_same_live_in_the_cache_and_in_the_testbed(learned_system: Path) -> None:
    from askexpert.data import load_splits
    from askexpert.evaluate.run import evaluate_system
    from askexpert.inference.edge import edge_classifier
    from askexpert.models.local_experts import LocalExpertBackend
    from askexpert.routing import system_router
    from askexpert.system import SystemDir

    system = SystemDir.open(learned_system)
    cfg = system.config()
    part = Partition.from_json(system.partition_path)
    test = load_splits(cfg.data, learned_system).test
    live = edge_classifier(
        system, LocalExpertBackend.of_system(system, "progressive"), runtime="torch"
    )  # against the torch cache
    pred = live(test.images)
    offloaded = pred.source != "edge"
    assert 0 < offloaded.mean() < 1
    cache = build_cache(system, ["progressive"])
    gate = DeferralGate.from_json(system.deferral_gate_path)
    stat = gate.score(cache.gen_probs, part.membership(), routed_experts(cache, cfg.routing.top_k, "weighted"))
    assert np.array_equal(offload_masks(stat, "learned", np.asarray([cfg.routing.tau]))[0], offloaded)
    # the testbed measures with the same router and re-thresholds the statistic it records
    decision = system_router(system, part)(cache.gen_probs)
    assert np.allclose(decision.stat, stat) and np.array_equal(decision.offload, offloaded)
    # the report's config row is the live system's accuracy (evaluate refits the same gate: same data, same models)
    summary = evaluate_system(system)
    row = next(r for r in summary["headline"] if r["schedule"] == "progressive" and r["system"].startswith("collab"))
    assert row["accuracy"] == pytest.approx(float((pred.labels == test.labels).mean()), abs=1e-12)
    assert row["offload_rate"] == pytest.approx(float(offloaded.mean()), abs=1e-12)
    assert {r["gate"] for r in summary["gates"]} == {"max_prob", "margin", "entropy", "learned"}


def test_a_gate_fitted_on_other_models_is_refused(learned_system: Path, tmp_path: Path) -> None:
    from askexpert.inference.edge import edge_classifier
    from askexpert.models.local_experts import LocalExpertBackend
    from askexpert.system import SystemDir

    root = tmp_path / "system"
    shutil.copytree(learned_system, root, ignore=shutil.ignore_patterns("cache", "report"))
    system = SystemDir.open(root)
    backend = LocalExpertBackend.of_system(system, "progressive")
    data = json.loads(system.deferral_gate_path.read_text())
    data["fitted_on"] = "0123456789abcdef"
    system.deferral_gate_path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="fitted on other models") as err:
        edge_classifier(system, backend)
    assert "\n" not in str(err.value)
    system.deferral_gate_path.unlink()
    with pytest.raises(CheckpointError, match="deferral gate not found"):
        edge_classifier(system, backend)
