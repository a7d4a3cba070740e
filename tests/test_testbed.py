"""The testbed and calibrate on the micro system (the emulated link when root, else the link model)."""

import json
import shutil
from pathlib import Path

import pytest

from askexpert.errors import ConfigError
from askexpert.measure.netem import can_emulate
from askexpert.system import SystemDir
from askexpert.testbed.calibrate import calibrate
from askexpert.testbed.runner import run_testbed, spec_from_names


@pytest.fixture(scope="module")
def bed(trained_system: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[SystemDir, dict]:
    root = tmp_path_factory.mktemp("bed") / "sys"
    shutil.copytree(trained_system, root)
    system = SystemDir.open(root)
    summary = run_testbed(
        system, spec_from_names("raspberry-pi-4", "desktop-gpu", "wifi"), samples=96, taus=[0.0, 0.1, 0.2, 0.5, 1.0]
    )
    return system, summary


def test_testbed_table_files_and_provenance(bed: tuple[SystemDir, dict]) -> None:
    system, summary = bed
    out = system.root / "testbed"
    for name in (
        "testbed.md",
        "testbed.csv",
        "testbed.json",
        "records.jsonl",
        "latency_vs_accuracy.png",
        "energy_vs_accuracy.png",
    ):
        assert (out / name).stat().st_size > 0
    assert len((out / "records.jsonl").read_text().splitlines()) == 96
    rows = {(r["strategy"], r["tau"]): r for r in summary["table"]}
    edge, near, execution = rows[("edge-only", None)], rows[("near-edge-only", None)], rows[("edge-execution", None)]
    assert edge["offload_rate"] == 0 and edge["energy_radio_mj"] == 0 and edge["bytes_sent_per_sample"] == 0
    assert near["offload_rate"] == 1.0 and near["bytes_sent_per_sample"] > 3072
    assert execution["latency_mean_ms"] > edge["latency_mean_ms"]
    for r in summary["table"]:
        parts = r["energy_edge_mj"] + r["energy_radio_mj"] + r["energy_near_edge_mj"]
        assert parts == pytest.approx(r["energy_total_mj"], rel=1e-9)
    assert rows[("collaborative", 0.0)]["offload_rate"] == 0.0
    assert rows[("collaborative", 0.0)]["latency_mean_ms"] == pytest.approx(edge["latency_mean_ms"])
    assert rows[("collaborative", 1.0)]["accuracy"] == pytest.approx(near["accuracy"])
    link = summary["provenance"]["link"]
    assert link.startswith("emulated") if can_emulate() is None else link.startswith("model")
    h = summary["headline"]
    chosen = next(r for r in summary["table"] if r["strategy"] == "collaborative" and r["tau"] == h["tau"])
    execution = next(r for r in summary["table"] if r["strategy"] == "edge-execution")
    assert h["latency_ratio_vs_edge_execution"] == pytest.approx(
        chosen["latency_mean_ms"] / execution["latency_mean_ms"]
    )


def test_calibrate_respects_its_budget_on_a_held_out_run(bed: tuple[SystemDir, dict]) -> None:
    system, summary = bed
    rows = {r["strategy"]: r for r in summary["table"]}
    budget = (rows["edge-only"]["latency_mean_ms"] + rows["near-edge-only"]["latency_mean_ms"]) / 2
    result = calibrate(system, latency_budget_ms=budget)
    chosen = result["chosen"]
    assert chosen["latency_ms"] <= budget
    cfg = system.config()
    assert cfg.routing.tau == pytest.approx(chosen["tau"]) and cfg.routing.top_k == chosen["k"]
    assert json.loads((system.root / "testbed" / "calibration.json").read_text())["chosen"] == chosen
    # held out: the test split (calibrate only saw the validation split), measured anew
    again = run_testbed(
        system, spec_from_names("raspberry-pi-4", "desktop-gpu", "wifi"), samples=96, taus=[chosen["tau"]]
    )
    measured = next(r for r in again["table"] if r["strategy"] == "collaborative")
    assert measured["latency_mean_ms"] <= budget * 1.3  # stated tolerance: 30 %
    assert abs(measured["latency_mean_ms"] - chosen["latency_ms"]) <= 0.3 * measured["latency_mean_ms"]


def test_calibrate_errors(bed: tuple[SystemDir, dict], tmp_path: Path) -> None:
    system, _ = bed
    with pytest.raises(ConfigError, match="give --latency-budget-ms"):
        calibrate(system, write=False)
    with pytest.raises(ConfigError, match="no \\(τ, k\\) meets the target"):
        calibrate(system, latency_budget_ms=0.0001, write=False)
    with pytest.raises(ConfigError, match="no testbed results"):
        calibrate(system, testbed_json=tmp_path / "none.json", latency_budget_ms=1)


def test_a_failed_offload_costs_its_real_time_and_waiting_energy() -> None:
    import numpy as np

    from askexpert.testbed.runner import Measurement, SampleMeasurement, strategies

    spec = spec_from_names("raspberry-pi-4", "desktop-gpu", "wifi")
    answered = {"gen_s": 0.001, "local_expert_s": 0.002, "stat": 0.1, "gen_label": 0, "local_label": 1}
    answered |= {"remote_label": 1, "offload_s": 0.02, "rtt_ms": 15.0, "compute_ms": 1.0, "batch_size": 1.0}
    answered |= {"bytes_sent": 3096.0, "bytes_received": 300.0, "encode_ms": 0.1, "queue_ms": 0.5}
    failed = {"gen_s": 0.001, "local_expert_s": 0.002, "stat": 0.1, "gen_label": 0, "local_label": 1}
    failed |= {"remote_label": -1, "offload_s": 5.0, "error": "timeout after 5 s"}  # a full timeout
    rows = [SampleMeasurement.from_dict({"id": i, "expert": "e0", **r}) for i, r in enumerate((answered, failed))]
    table, _ = strategies(Measurement(rows, [1, 1], "test", True, 1, "max_prob"), spec, [0.5])
    rows = {(r["strategy"], r["tau"]): r for r in table}
    collab, near = rows[("collaborative", 0.5)], rows[("near-edge-only", None)]
    edge_ms = 1.0 * spec.edge.slowdown
    assert collab["offload_rate"] == 1.0 and collab["failed_offloads"] == 1
    # mean of the answered sample's latency and the failed one's (edge + the whole 5 s timeout)
    assert collab["latency_mean_ms"] > (edge_ms + 5000.0) / 2
    assert collab["accuracy"] == 0.5  # the failed sample keeps the generalist's (wrong) label
    assert near["failed_offloads"] == 1 and near["latency_mean_ms"] == pytest.approx(collab["latency_mean_ms"])
    idle_w = spec.edge.idle_w
    assert collab["energy_edge_mj"] >= idle_w * 5.0 * 1e3 / 2 * 0.99  # waiting through the timeout costs idle power
    assert np.isfinite(collab["energy_total_mj"])


def test_profile_measure_writes_times_the_testbed_prefers(bed: tuple[SystemDir, dict], tmp_path: Path) -> None:
    from askexpert.cli import main
    from askexpert.measure.profiles import load_device
    from askexpert.testbed.runner import Measurement, SampleMeasurement, TestbedSpec, compute_sources, strategies

    system, _ = bed
    out = tmp_path / "board.yaml"
    main(["profile", "measure", "--system", str(system.root), "--out", str(out), "--name", "board",
          "--idle-w", "2", "--active-w", "5", "--batches", "1,4"])  # fmt: skip
    board = load_device(str(out))
    assert board.measured is not None and set(board.measured.ms) == {"generalist", "expert"}
    assert set(board.measured.ms["expert"]) == {1, 4} and all(v > 0 for v in board.measured.ms["expert"].values())
    cfg = system.config()
    presets = {"generalist": cfg.generalist.preset, "expert": cfg.expert.preset}
    spec = spec_from_names("raspberry-pi-4", "desktop-gpu", "wifi")
    measured = TestbedSpec(board, spec.near_edge, spec.link_name, spec.link, spec.radio)
    sources = compute_sources(measured, presets)
    assert sources["edge_generalist_ms"] == pytest.approx(board.measured.ms["generalist"][1])
    assert compute_sources(measured, {"generalist": "deit-tiny", "expert": "deit-small"})["edge_generalist_ms"] is None
    rows = json.loads((system.root / "testbed" / "testbed.json").read_text())
    assert rows["provenance"]["edge_compute"].startswith("measured on this machine")
    row = SampleMeasurement(0, 0, 0.9, "e0", 0, 0, gen_s=9.0, local_expert_s=9.0, offload_s=0.0)
    table, _ = strategies(Measurement([row], [0], "test", True, 1, "max_prob", presets), measured, [0.0])
    edge_only = next(r for r in table if r["strategy"] == "edge-only")
    assert edge_only["latency_mean_ms"] == pytest.approx(board.measured.ms["generalist"][1])  # not 9 s × slowdown


def test_metered_near_edge_energy_replaces_the_power_model() -> None:
    from askexpert.measure.device_timing import time_model
    from askexpert.measure.profiles import MeasuredTimes
    from askexpert.models import create_model
    from askexpert.testbed.runner import Measurement, SampleMeasurement, TestbedSpec, strategies

    class Counter:
        source = "fake"

        def __init__(self) -> None:
            self.j = 0.0

        def read_j(self) -> float:
            self.j += 0.5  # 0.5 J between reads
            return self.j

    import time

    import torch

    model = create_model("micro-expert", 3)
    ms, joules = time_model(model, 32, 2, 4, torch.device("cpu"), Counter(), meter_window_s=0.0)
    assert ms > 0 and joules == pytest.approx(0.5 / 4)

    class CoarseTenWatts:  # a 10 W draw read through a counter that ticks every 50 ms, like NVML's
        source = "fake"

        def read_j(self) -> float:
            return float(int(time.perf_counter() / 0.05)) * 0.05 * 10.0

    ms, joules = time_model(model, 32, 2, 4, torch.device("cpu"), CoarseTenWatts(), meter_window_s=0.5)
    assert joules is not None and 0.3 * 10.0 * ms / 1e3 < joules < 3.0 * 10.0 * ms / 1e3  # ≈ 10 W × one pass
    spec = spec_from_names("raspberry-pi-4", "desktop-gpu", "wifi")
    near = spec.near_edge.model_copy(
        update={
            "measured": MeasuredTimes(
                presets={"expert": "cpu-expert"}, image_size=32, device="fake-gpu", date="2026-11-28",
                ms={"expert": {1: 2.0, 4: 4.0}}, j={"expert": {1: 0.3, 4: 0.8}}, meter="nvml",
            )
        }
    )  # fmt: skip
    row = {"gen_s": 0.001, "local_expert_s": 0.002, "stat": 0.1, "gen_label": 0, "local_label": 0, "remote_label": 0}
    row |= {"offload_s": 0.02, "rtt_ms": 10.0, "compute_ms": 1.0, "batch_size": 4.0, "bytes_sent": 3096.0}
    run = Measurement([SampleMeasurement.from_dict({"id": 0, "expert": "e0", **row})], [0], "test", True, 1, "max_prob")
    run.presets = {"expert": "cpu-expert"}
    table, _ = strategies(run, TestbedSpec(spec.edge, near, spec.link_name, spec.link, spec.radio), [1.0])
    collab = next(r for r in table if r["strategy"] == "collaborative")
    assert collab["energy_near_edge_mj"] == pytest.approx(0.8 / 4 * 1e3)  # metered J per image at batch 4
    run.expert_views = 2  # serving.test_time_flip: two forward passes per expert answer, each one measured
    table, _ = strategies(run, TestbedSpec(spec.edge, near, spec.link_name, spec.link, spec.radio), [1.0])
    collab = next(r for r in table if r["strategy"] == "collaborative")
    assert collab["energy_near_edge_mj"] == pytest.approx(2 * 0.8 / 4 * 1e3)


def test_headline_tau_is_chosen_on_validation(bed: tuple[SystemDir, dict]) -> None:
    """The headline τ, checked against the live classifier on the validation images (not the cached sweep)."""
    from askexpert.evaluate.cache import build_cache
    from askexpert.evaluate.metrics import PARITY_GRID_POINTS, gate_comparison, gate_statistic
    from askexpert.inference.edge import edge_classifier
    from askexpert.models.local_experts import LocalExpertBackend
    from askexpert.testbed.choice import ValidationView
    from askexpert.testbed.costs import PAPER_ENERGY_RATIO, PAPER_LATENCY_RATIO, offload_costs

    system, summary = bed
    h, cfg = summary["headline"], system.config()
    assert cfg.routing.gate != "learned"  # live and cached share the statistic only for a confidence gate
    val = system.splits().val
    experts = LocalExpertBackend.of_system(system)
    clf = edge_classifier(system, experts, runtime="torch")  # the cache holds torch logits

    def live(tau: float) -> tuple[float, float]:
        """Validation accuracy and offload rate of the running edge at τ."""
        clf.router = clf.router.at(cfg.routing.model_copy(update={"tau": tau}))
        pred = clf(val.images)
        return float((pred.labels == val.labels).mean()), float((pred.source != "edge").mean())

    target, everything = live(1.0)  # max_prob < 1: every sample asks its routed expert (edge execution's answers)
    assert everything == 1.0 and h["val_edge_execution_accuracy"] == pytest.approx(target, abs=1e-12)
    assert h["val_samples"] == len(val)
    acc, rate = live(h["tau"])
    assert (h["val_accuracy"], h["val_offload_rate"]) == pytest.approx((acc, rate), abs=1e-12)
    grid = [live(float(t)) for t in ValidationView.of(system).spanning_taus(PARITY_GRID_POINTS)]
    if h["eligible"]:  # reaches edge execution, and no τ of the grid with a lower offload rate does
        assert acc >= target
        assert not [(a, r) for a, r in grid if a >= target and r < rate]
        # the evaluate report's gate table finds the same parity offload (one grid, one rule)
        assert cfg.routing.combine == "replace"  # the rule the gate table answers with
        val, test = (build_cache(system, [cfg.serving.schedule], split=s) for s in ("val", "test"))
        gate, k = cfg.routing.gate, cfg.routing.top_k
        stats = (gate_statistic(test, gate), gate_statistic(val, gate))
        table = gate_comparison(test, val, *stats, gate, cfg.serving.schedule, k, cfg.routing.scoring)
        assert table["parity_val_offload"] == pytest.approx(rate, abs=1e-12)
    else:
        assert acc == max(a for a, _ in grid) < target
    row = next(r for r in summary["table"] if r["strategy"] == "collaborative" and r["tau"] == h["tau"])
    assert h["accuracy"] == row["accuracy"] and h["offload_rate"] == row["offload_rate"]
    # the break-even offload rates put the linear cost model exactly on the targets
    rows = {r["strategy"]: r for r in summary["table"]}
    cost, need = offload_costs(summary["table"]), h["max_offload_rate_for_target"]
    latency = cost["edge_latency_ms"] + need["latency"] * cost["offload_latency_ms"]
    energy = cost["edge_energy_mj"] + need["energy"] * cost["offload_energy_mj"]
    assert latency / rows["edge-execution"]["latency_mean_ms"] == pytest.approx(PAPER_LATENCY_RATIO)
    assert energy / rows["near-edge-only"]["energy_total_mj"] == pytest.approx(PAPER_ENERGY_RATIO)
    terms = h["offload_terms"]["energy_mj"]
    assert sum(terms.values()) == pytest.approx(cost["offload_energy_mj"])
    assert "## Headline" in (system.root / "testbed" / "testbed.md").read_text()


@pytest.mark.parametrize("second_within", [0.0, 1.0])
def test_testbed_answers_follow_the_combination_rule(
    trained_system: Path, tmp_path: Path, second_within: float
) -> None:
    from askexpert.data import load_splits
    from askexpert.inference.edge import edge_classifier
    from askexpert.models.local_experts import LocalExpertBackend
    from askexpert.protocol import OTHER

    root = tmp_path / "sys"
    shutil.copytree(trained_system, root)
    system = SystemDir.open(root)
    # k = 3 (the micro config's max_k): a sample whose Top-3 reaches both experts asks both at second_within = 1
    routing = {"combine": "mix", "mix_weight": 0.3, "top_k": 3, "second_within": second_within}
    system.update_config("test", routing=routing)
    summary = run_testbed(system, spec_from_names("raspberry-pi-4", "desktop-gpu", "wifi"), samples=24, taus=[1.0])
    records = [json.loads(line) for line in (root / "testbed" / "records.jsonl").read_text().splitlines()]
    clf = edge_classifier(  # torch, as the testbed measures the generalist: the same probabilities to mix
        system, LocalExpertBackend.of_system(system), runtime="torch"
    )
    everything = {"gate": "max_prob", "tau": 1.0}  # every sample asks its expert
    clf.router = clf.router.at(clf.router.point.updated(**everything))
    live = clf(load_splits(system.config().data, root).test.images[:24])
    assert (live.source != "edge").all()
    assert [r["local_label"] for r in records] == live.labels.tolist()  # edge execution = the live edge's rule
    assert [r["remote_label"] for r in records] == live.labels.tolist()  # the server's probabilities, same rule
    assert OTHER not in {r["local_label"] for r in records}  # mix never abstains ("other" goes to the generalist)
    assert "mix (w=0.3)" in (root / "testbed" / "testbed.md").read_text()
    assert summary["routing"]["combine"] == "mix"
    # a close call asks two experts, live and in the testbed alike, and pays for two offloads
    requests = [r["requests"] for r in records]
    assert [r["expert"] for r in records] == live.expert.tolist()
    assert (2.0 in requests) == bool(second_within) and set(requests) <= {1.0, 2.0}
    table = json.loads((root / "testbed" / "testbed.json").read_text())["table"]
    offloaded = next(r for r in table if r["strategy"] == "collaborative" and r["tau"] == 1.0)
    assert offloaded["offload_rate"] == pytest.approx(sum(requests) / len(requests))


def test_server_metered_joules_count_only_when_the_near_edge_profile_is_this_machine() -> None:
    from askexpert.measure.profiles import load_device
    from askexpert.testbed.report import provenance
    from askexpert.testbed.runner import Measurement, SampleMeasurement, TestbedSpec, strategies

    spec = spec_from_names("raspberry-pi-4", "desktop-gpu", "wifi")
    row = {"gen_s": 0.001, "local_expert_s": 0.002, "stat": 0.1, "gen_label": 0, "local_label": 0, "remote_label": 0}
    row |= {"offload_s": 0.02, "rtt_ms": 10.0, "compute_ms": 2.0, "batch_size": 1.0, "bytes_sent": 3096.0}
    row |= {"server_energy_j": 0.04}  # what the server's meter read for this request
    run = Measurement([SampleMeasurement.from_dict({"id": 0, "expert": "e0", **row})], [0], "test", True, 1, "max_prob")
    here = load_device("this-machine")
    assert here.host and not spec.near_edge.host
    for near, expected_mj in (
        (here, 40.0),
        (spec.near_edge, spec.near_edge.active_w * 2.0e-3 * spec.near_edge.slowdown * 1e3),
    ):
        bed = TestbedSpec(spec.edge, near, spec.link_name, spec.link, spec.radio)
        table, _ = strategies(run, bed, [1.0])
        collab = next(r for r in table if r["strategy"] == "collaborative")
        assert collab["energy_near_edge_mj"] == pytest.approx(expected_mj)
        source = provenance(run, bed)["energy_near_edge_mj"]
        assert source.startswith("metered" if near.host else "modelled") and "40 mJ per sample" in source
