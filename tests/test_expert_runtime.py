"""How the experts run (`serving.test_time_flip`, `serving.cpu_bfloat16`): one answer per image everywhere."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from askexpert.config import SystemConfig
from askexpert.errors import RoutingError
from askexpert.models import load_checkpoint, predict_logits
from askexpert.models.local_experts import LocalExpertBackend
from askexpert.protocol.wire import MEDIA_TYPE, encode_images
from askexpert.system import SystemDir


def _copy_with(trained_system: Path, tmp_path: Path, **serving: object) -> SystemDir:
    """A copy of the session's micro system with `serving` settings changed (the original stays as it is)."""
    root = tmp_path / "system"
    shutil.copytree(trained_system, root)
    system = SystemDir.open(root)
    raw = system.config().model_dump(mode="json")
    raw["serving"] |= serving
    SystemConfig.from_dict(raw).to_yaml(system.config_path)
    return SystemDir.open(root)


def _images(n: int = 5) -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_flip_is_the_mean_of_the_image_and_its_mirror(trained_system: Path) -> None:
    system = SystemDir.open(trained_system)
    model, _ = load_checkpoint(system.expert_path("progressive", "e0"))
    images = _images()
    plain = predict_logits(model, images)
    mirrored = predict_logits(model, np.ascontiguousarray(images[:, :, ::-1]))  # (N, H, W, C): W reversed
    flipped = predict_logits(model, images, flip=True, batch_size=2)  # batches of 2, 2, 1: each its own mirror
    np.testing.assert_allclose(flipped, (plain + mirrored) / 2, atol=1e-5)
    assert not np.allclose(flipped, plain, atol=1e-3)  # the option does something on these images
    symmetric = np.concatenate([images[:, :, :16], images[:, :, :16][:, :, ::-1]], axis=2)
    np.testing.assert_allclose(predict_logits(model, symmetric, flip=True), predict_logits(model, symmetric), atol=1e-5)


def test_server_cache_and_local_experts_answer_alike_with_flip(trained_system: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from askexpert.evaluate.cache import build_cache
    from askexpert.serving.server import ExpertService, create_app

    system = _copy_with(trained_system, tmp_path, test_time_flip=True)
    images = system.splits().test.images[:4]
    local = LocalExpertBackend.of_system(system)
    assert local.flip
    expected = local.predict("e1", images)
    plain = LocalExpertBackend.of_system(_copy_with(trained_system, tmp_path / "plain", test_time_flip=False))
    assert not plain.flip
    plain_logits = plain.logits("e1", images)
    assert not np.allclose(local.logits("e1", images), plain_logits, atol=1e-3)
    cache = build_cache(system)  # a new key: the flip's outputs, not the copied cache of plain ones
    np.testing.assert_allclose(cache.schedules["progressive"].logits["e1"][:4], local.logits("e1", images), atol=1e-4)
    with TestClient(create_app(ExpertService.from_system(system))) as client:
        body = encode_images(images)
        reply = client.post("/v1/experts/e1/predict", content=body, headers={"content-type": MEDIA_TYPE}).json()
    assert reply["labels"] == expected.labels.tolist()
    assert expected.probs is not None
    np.testing.assert_allclose(reply["probs"], expected.probs, atol=1e-5)


def test_how_experts_run_is_part_of_what_their_outputs_are_keyed_by(
    trained_system: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import askexpert.models.predict as predict
    from askexpert.deferral import gate_fingerprint
    from askexpert.evaluate.cache import cache_key
    from askexpert.fingerprint import fingerprint
    from askexpert.models import read_meta

    assert SystemConfig().serving.test_time_flip and not SystemConfig().serving.cpu_bfloat16  # the defaults
    before = _copy_with(trained_system, tmp_path / "plain", test_time_flip=False, cpu_bfloat16=False)
    assert before.config().serving.expert_runtime() == []  # run plainly: keyed as before the settings existed
    part = before.partition()
    shas = [before.generalist_meta().sha256] + [
        read_meta(before.expert_path("progressive", e)).sha256 for e in part.expert_ids
    ]
    assert gate_fingerprint(before, "progressive") == fingerprint("deferral/1", shas, [list(s) for s in part.subsets])
    test = before.splits().test
    key = cache_key(before, part, ["progressive"], test.labels, test.images)
    monkeypatch.setattr(predict, "native_cpu_bfloat16", lambda: True)  # bfloat16 honoured, whatever this CPU is
    for setting in ("test_time_flip", "cpu_bfloat16"):
        changed = _copy_with(trained_system, tmp_path / setting, **{"test_time_flip": False, setting: True})
        assert cache_key(changed, part, ["progressive"], test.labels, test.images) != key
        assert gate_fingerprint(changed, "progressive") != gate_fingerprint(before, "progressive")
    # where bfloat16 is not honoured the experts compute float32, the plain outputs: the cache is keyed as those
    # (a system moved from a bfloat16 machine recomputes it); the gate keeps the setting (the edge cannot tell)
    monkeypatch.setattr(predict, "native_cpu_bfloat16", lambda: False)
    asked = SystemDir.open(tmp_path / "cpu_bfloat16" / "system")
    with pytest.warns(UserWarning, match="no native bfloat16"):
        assert cache_key(asked, part, ["progressive"], test.labels, test.images) == key
    assert gate_fingerprint(asked, "progressive") != gate_fingerprint(before, "progressive")


def test_the_emulated_bfloat16_warning_is_given_once_per_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    import torch

    import askexpert.models.predict as predict

    monkeypatch.setattr(predict, "native_cpu_bfloat16", lambda: False)
    cpu = torch.device("cpu")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")  # what a command runs under: once per message and location
        predict.cpu_bfloat16_usable(True, cpu)
        assert not predict.bfloat16_honoured(True, cpu)  # another call site, the same setting: not again
        predict.cpu_bfloat16_usable(True, cpu, "stage 1: cpu_bfloat16")  # another setting: named too
    assert [str(w.message).split(" is set")[0] for w in seen] == ["serving.cpu_bfloat16", "stage 1: cpu_bfloat16"]


def test_bfloat16_asked_on_a_cpu_without_it_runs_float32_and_says_so(
    trained_system: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import askexpert.models.predict as predict

    system = _copy_with(trained_system, tmp_path, cpu_bfloat16=True)
    monkeypatch.setattr(predict, "native_cpu_bfloat16", lambda: False)
    with pytest.warns(UserWarning, match="no native bfloat16"):
        backend = LocalExpertBackend.of_system(system)
    assert not backend.cpu_bfloat16
    plain = LocalExpertBackend.of_system(SystemDir.open(trained_system))
    np.testing.assert_array_equal(backend.logits("e0", _images()), plain.logits("e0", _images()))


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "native"), [(False, False, False), (True, False, True), (False, True, True)]
)
def test_native_bfloat16_is_read_from_the_cpus_instructions_not_from_onednn(
    monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool, native: bool
) -> None:
    """oneDNN accepts bfloat16 on AVX-512 without BF16 and converts, slower than float32 (an Ice Lake-class
    Xeon: 4.9 against 2.8 ms per image): only AVX512-BF16 or AMX make `cpu_bfloat16` run in bfloat16."""
    import torch

    import askexpert.models.predict as predict

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert predict.native_cpu_bfloat16() is native
    if native:
        assert predict.cpu_bfloat16_usable(True, torch.device("cpu"))
    else:
        with pytest.warns(UserWarning, match="serving.cpu_bfloat16 is set, but this CPU has no native bfloat16"):
            assert not predict.cpu_bfloat16_usable(True, torch.device("cpu"))
    assert not predict.cpu_bfloat16_usable(False, torch.device("cpu"))


def test_a_bfloat16_system_served_where_bfloat16_is_emulated_runs_float32_onnx(
    trained_system: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cpu_bfloat16: true` on a CPU without native bfloat16: the experts are float32 experts there, so the
    server's 'auto' runtime is float32's best (ONNX Runtime), and its answers are the float32 ones."""
    import asyncio

    import askexpert.models.predict as predict
    from askexpert.serving.server import ExpertService

    system = _copy_with(trained_system, tmp_path, cpu_bfloat16=True, model_workers=1)
    monkeypatch.setattr(predict, "native_cpu_bfloat16", lambda: False)
    with pytest.warns(UserWarning, match="serving.cpu_bfloat16 is set, but this CPU has no native bfloat16"):
        service = ExpertService.from_system(system)
    assert service.cfg.model_runtime == "onnx" and not service.cfg.cpu_bfloat16 and service.onnx is not None
    images = system.splits().test.images[:6]
    reply = asyncio.run(service("e0", images))
    expected = LocalExpertBackend.of_system(system, cpu_bfloat16=False).predict("e0", images)
    assert reply.labels == expected.labels.tolist()
    np.testing.assert_allclose(reply.probs, expected.probs, atol=1e-5)


def test_benchmark_records_name_the_cpu_and_whether_its_bfloat16_is_native(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import askexpert.models.predict as predict

    for native, said in ((True, "bfloat16 native)"), (False, "bfloat16 not native)")):
        monkeypatch.setattr(predict, "native_cpu_bfloat16", lambda native=native: native)
        line = predict.cpu_description()
        assert line.endswith(f"({torch.backends.cpu.get_cpu_capability()}, {said}")
        assert line.split(" (")[0].strip()  # a name before the parenthesis
        if Path("/proc/cpuinfo").is_file():
            names = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")]
            if names:
                assert line.startswith(names[0].split(":", 1)[1].strip())


@pytest.mark.skipif(
    not __import__("askexpert.models.predict", fromlist=["x"]).native_cpu_bfloat16(), reason="no native bfloat16"
)
def test_bfloat16_on_a_cpu_with_it_changes_only_the_last_bits(trained_system: Path, tmp_path: Path) -> None:
    system = _copy_with(trained_system, tmp_path, cpu_bfloat16=True)
    backend = LocalExpertBackend.of_system(system)
    assert backend.cpu_bfloat16
    assert not LocalExpertBackend.of_system(system, cpu_bfloat16=False).cpu_bfloat16  # the testbed's edge execution
    fast = backend.logits("e0", _images(64))
    exact = LocalExpertBackend.of_system(SystemDir.open(trained_system)).logits("e0", _images(64))
    assert fast.dtype == np.float32 and not np.array_equal(fast, exact)  # bfloat16 did run
    np.testing.assert_allclose(fast, exact, atol=0.1 * float(np.abs(exact).max()))


def test_the_ray_replica_runs_its_expert_as_the_plain_engine_does(trained_system: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray.serve")
    from askexpert.serving.ray_app import ExpertReplica

    system = _copy_with(trained_system, tmp_path, test_time_flip=True)
    weights = str(system.expert_path("progressive", "e0"))
    replica = ExpertReplica(weights, 64, 5.0, 0, "cpu", flip=True, cpu_bfloat16=False)
    images = _images()
    expected = LocalExpertBackend.of_system(system).logits("e0", images)
    np.testing.assert_allclose(replica.logits(images), expected, atol=1e-6)


def test_model_calls_side_by_side_answer_as_the_local_experts_do(trained_system: Path, tmp_path: Path) -> None:
    import asyncio

    import torch

    from askexpert.serving.server import ExpertService

    system = _copy_with(
        trained_system, tmp_path, model_workers=2, max_batch_size=2, max_wait_ms=0.0, model_runtime="torch"
    )
    images = system.splits().test.images[:8]
    calls = [(eid, i) for eid in system.partition().expert_ids for i in range(0, 8, 2)]
    threads = torch.get_num_threads()
    try:
        service = ExpertService.from_system(system)  # sets torch's threads to the cores ÷ 2 for its model calls
        assert service.admission.parallel_calls == 2  # its wait estimate splits a queue between the two calls

        async def go() -> list:
            return await asyncio.gather(*(service(eid, images[i : i + 2]) for eid, i in calls))

        replies = asyncio.run(go())
    finally:
        torch.set_num_threads(threads)  # the rest of the session keeps its own
    local = LocalExpertBackend.of_system(system)
    for (eid, i), reply in zip(calls, replies, strict=True):
        expected = local.predict(eid, images[i : i + 2])
        assert reply.labels == expected.labels.tolist()
        assert expected.probs is not None and reply.probs is not None
        np.testing.assert_allclose(reply.probs, expected.probs, atol=1e-5)


def test_onnx_model_runtime_answers_as_torch_and_exports_once_per_checkpoint(
    trained_system: Path, tmp_path: Path
) -> None:
    """`serving.model_runtime: onnx`: each expert exported beside its checkpoint, answers as torch's (mirror
    included), kept while current, exported again when its checkpoint changes."""
    import asyncio

    from askexpert.models.onnx_runtime import source_path
    from askexpert.serving.server import ExpertService

    system = _copy_with(trained_system, tmp_path, model_runtime="onnx", model_workers=1, test_time_flip=True)
    schedule = system.config().serving.schedule
    ids = system.partition().expert_ids
    service = ExpertService.from_system(system)
    assert service.onnx is not None
    # threads per call with one worker: the cores this process may use (ONNX Runtime's own default counts the
    # machine's)
    cores = len(os.sched_getaffinity(0))
    assert {r.session.get_session_options().intra_op_num_threads for r in service.onnx.runners.values()} == {cores}
    exports = {eid: system.expert_path(schedule, eid).with_suffix(".onnx") for eid in ids}
    assert all(p.is_file() and source_path(p).is_file() for p in exports.values())
    images = system.splits().test.images[:6]

    async def ask() -> list:
        return await asyncio.gather(*(service(eid, images) for eid in ids))

    local = LocalExpertBackend.of_system(system)
    for eid, reply in zip(ids, asyncio.run(ask()), strict=True):
        expected = local.predict(eid, images)
        assert reply.labels == expected.labels.tolist()
        assert expected.probs is not None and reply.probs is not None
        np.testing.assert_allclose(reply.probs, expected.probs, atol=1e-4)
    with pytest.raises(RoutingError, match="unknown expert 'nope'"):
        service.onnx.logits("nope", images)
    stamps = {eid: p.stat().st_mtime_ns for eid, p in exports.items()}
    ExpertService.from_system(system)  # current exports are kept
    assert {eid: p.stat().st_mtime_ns for eid, p in exports.items()} == stamps
    source_path(exports[ids[0]]).write_text('{"expert_sha256": "an older checkpoint"}')
    ExpertService.from_system(system)  # a stale one is exported again, the others kept
    assert exports[ids[0]].stat().st_mtime_ns != stamps[ids[0]]
    assert all(exports[e].stat().st_mtime_ns == stamps[e] for e in ids[1:])


def test_a_cpu_server_left_on_auto_runs_onnx_one_single_threaded_call_per_core(trained_system: Path) -> None:
    """The micro system's config leaves the hardware-dependent settings on 'auto': on a CPU the server resolves
    them (ONNX Runtime for float32 experts, 8-image calls, a 30 ms target, a call per core), reports them in
    its handshake, and answers as torch does."""
    import asyncio

    from fastapi.testclient import TestClient

    from askexpert.serving.server import ExpertService, create_app

    system = SystemDir.open(trained_system)
    assert system.config().serving.model_runtime == "auto"
    service = ExpertService.from_system(system, device="cpu")
    cores = len(os.sched_getaffinity(0))
    sc = service.cfg
    assert (sc.model_runtime, sc.max_batch_size, sc.model_workers) == ("onnx", 8, cores)
    # the 30 ms preset, or 2.5 full batches as timed at warm-up where those take longer
    assert sc.target_batches == 2.5 and sc.full_batch_ms is not None
    assert sc.queue_delay_target_ms == max(30.0, round(2.5 * sc.full_batch_ms, 1))
    assert service.onnx is not None and service.admission.parallel_calls == cores
    assert {r.session.get_session_options().intra_op_num_threads for r in service.onnx.runners.values()} == {1}
    with TestClient(create_app(service)) as client:
        doc = client.get("/v1/experts").json()
    assert doc["max_request_images"] == 8
    said = doc["serving"]  # what the server runs under, as resolved here (warm-up's target included)
    assert (said["runtime"], said["max_batch_size"], said["model_workers"]) == ("onnx", 8, cores)
    assert said["queue_delay_target_ms"] == sc.queue_delay_target_ms and said["full_batch_ms"] == sc.full_batch_ms
    assert {"model_runtime", "max_batch_size", "queue_delay_target_ms", "model_workers"} <= set(said["auto"])
    assert f"{sc.queue_delay_target_ms:g} ms queue-delay target (auto: at least 2.5 full batches" in said["summary"]
    images = system.splits().test.images[:5]
    reply = asyncio.run(service("e0", images))
    expected = LocalExpertBackend.of_system(system).predict("e0", images)
    assert reply.labels == expected.labels.tolist()
