"""The expert server and the edge client as real processes over a loopback socket."""

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from askexpert.data import load_splits
from askexpert.inference.client import EdgeClient
from askexpert.inference.edge import edge_classifier
from askexpert.inference.http_backend import HttpExpertBackend
from askexpert.inference.records import RecordWriter
from askexpert.models.local_experts import LocalExpertBackend
from askexpert.partition import Partition
from askexpert.protocol.http import API_VERSION, Handshake
from askexpert.protocol.wire import MEDIA_TYPE, encode_images
from askexpert.system import SystemDir
from conftest import ServerProcess, StepMeter


def _test_split(root: Path):
    return load_splits(SystemDir.open(root).config().data, root).test


def test_lists_experts_and_health(server: ServerProcess, trained_system: Path) -> None:
    doc = httpx.get(f"{server.url}/v1/experts").json()
    assert Handshake.model_validate(doc).api == API_VERSION  # the server sends the protocol's own message
    part = Partition.from_json(trained_system / "partition.json")
    assert [e["id"] for e in doc["experts"]] == list(part.expert_ids)
    assert [tuple(e["classes"]) for e in doc["experts"]] == list(part.subsets)
    served = SystemDir.open(trained_system).config().serving.schedule
    assert all(len(e["sha256"]) == 64 and e["schedule"] == served for e in doc["experts"])
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def _client(system: SystemDir, backend: object, batch_size: int = 16) -> EdgeClient:
    clf = edge_classifier(system, backend)  # type: ignore[arg-type]
    return EdgeClient(clf, [str(c) for c in range(clf.partition.num_classes)], 32, batch_size=batch_size)


def test_edge_over_http_gives_the_same_labels_as_in_process(
    server: ServerProcess, trained_system: Path, tmp_path: Path
) -> None:
    system = SystemDir.open(trained_system)
    cfg = system.config()
    test = _test_split(trained_system)
    backend = HttpExpertBackend(server.url, cfg.serving)
    with RecordWriter(tmp_path / "r.jsonl") as writer:
        for record in _client(system, backend).classify_split(test):
            writer.write(record)
    backend.close()
    local = edge_classifier(system, LocalExpertBackend.of_system(system))
    part = system.partition()
    ref = local(test.images)
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["path"] for r in records] == [f"test[{i}]" for i in range(len(test))]
    assert [r["label"] for r in records] == ref.labels.tolist()
    assert [r["source"] for r in records] == ref.source.tolist()
    assert [r["truth"] for r in records] == test.labels.tolist()
    offloaded = [r for r in records if r["expert"]]
    assert offloaded and part.num_experts == 2, "the micro system should offload some samples"
    for rec in offloaded:
        assert rec["rtt_ms"] > 0 and rec["compute_ms"] > 0 and rec["bytes_sent"] > 3072 * 0.99
    assert all(r["rtt_ms"] is None and r["bytes_sent"] == 0 for r in records if r["source"] == "edge")


def test_killed_server_turns_into_fallback(trained_system: Path, tmp_path: Path) -> None:
    proc = ServerProcess(trained_system)
    system = SystemDir.open(trained_system)
    cfg = system.config().serving.model_copy(update={"timeout_s": 2.0, "retries": 1, "backoff_s": 0.01})
    backend = HttpExpertBackend(proc.url, cfg)
    test = _test_split(trained_system)
    records = []
    try:
        for record in _client(system, backend).classify_split(test):
            records.append(record)
            if len(records) == 16:  # the first batch is answered: the server dies before the second
                proc.stop()
    finally:
        proc.stop()
        backend.close()
    assert [r["path"] for r in records] == [f"test[{i}]" for i in range(len(test))]
    before, after = records[:16], records[16:]
    assert any(r["source"] == "expert" for r in before)
    assert not any(r["source"] == "expert" for r in after)
    fallbacks = [r for r in after if r["source"] == "fallback"]
    assert fallbacks and all(r["reason"].startswith("error:") for r in fallbacks)
    assert all(r["label"] == r["generalist_label"] for r in after)


@pytest.mark.parametrize(
    ("path", "headers", "body", "status", "fragment"),
    [
        ("/v1/experts/e9/predict", {"content-type": MEDIA_TYPE}, b"", 404, "unknown expert 'e9'"),
        ("/v1/experts/e0/predict", {"content-type": "application/json"}, b"[]", 415, "content type"),
        ("/v1/experts/e0/predict", {"content-type": MEDIA_TYPE}, b"garbage", 400, "shorter than"),
        (
            "/v1/experts/e0/predict",
            {"content-type": MEDIA_TYPE},
            encode_images(np.zeros((0, 32, 32, 3), np.uint8)),
            400,
            "empty batch",
        ),
        (
            "/v1/experts/e0/predict",
            {"content-type": MEDIA_TYPE},
            encode_images(np.zeros((1, 8, 8, 3), np.uint8)),
            400,
            "8×8",
        ),
        ("/v1/experts/e0/predict", {"content-type": MEDIA_TYPE}, b"x" * (17 * 1024 * 1024), 413, "exceeds the limit"),
    ],
)
def test_bad_requests_get_named_4xx(
    server: ServerProcess, path: str, headers: dict, body: bytes, status: int, fragment: str
) -> None:
    response = httpx.post(server.url + path, headers=headers, content=body, timeout=30)
    assert response.status_code == status
    assert fragment in response.json()["error"]
    assert httpx.get(f"{server.url}/readyz").status_code == 200


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    expert=st.sampled_from(["e0", "e1", "nope", "..", "%00"]),
    ctype=st.sampled_from([MEDIA_TYPE, "", "text/plain", MEDIA_TYPE + "; charset=x"]),
    body=st.one_of(
        st.binary(max_size=300),
        st.builds(lambda n: encode_images(np.zeros((n, 32, 32, 3), np.uint8))[:-1], st.integers(1, 3)),
    ),
)
def test_fuzz_live_endpoint(server: ServerProcess, expert: str, ctype: str, body: bytes) -> None:
    response = httpx.post(f"{server.url}/v1/experts/{expert}/predict", headers={"content-type": ctype}, content=body)
    assert response.status_code < 500


def test_metrics_after_traffic(server: ServerProcess) -> None:
    body = encode_images(np.zeros((3, 32, 32, 3), np.uint8))
    assert (
        httpx.post(
            f"{server.url}/v1/experts/e0/predict", headers={"content-type": MEDIA_TYPE}, content=body
        ).status_code
        == 200
    )
    text = httpx.get(f"{server.url}/metrics").text
    assert 'askexpert_requests_total{expert="e0",status="200"}' in text
    assert "askexpert_batch_size_bucket" in text and "askexpert_compute_seconds_count" in text
    unknown = httpx.post(f"{server.url}/v1/experts/nope/predict", headers={"content-type": MEDIA_TYPE}, content=body)
    assert unknown.status_code == 404
    text = httpx.get(f"{server.url}/metrics").text
    assert 'askexpert_errors_total{expert="unknown",kind="unknown_expert"}' in text


def test_bearer_token_over_tls_with_a_certificate_made_here(trained_system: Path, tmp_path: Path) -> None:
    import trustme

    from askexpert.errors import ConfigError
    from askexpert.inference.edge import connect

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    (tmp_path / "token").write_text("s3cret\n")
    proc = ServerProcess(
        trained_system,
        *("--token-file", str(tmp_path / "token")),
        *("--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")),
    )
    try:
        assert proc.url.startswith("https://127.0.0.1:")
        body = encode_images(np.zeros((1, 32, 32, 3), np.uint8))
        url = f"{proc.url}/v1/experts/e0/predict"
        import ssl

        trusted = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        assert httpx.post(url, headers={"content-type": MEDIA_TYPE}, content=body, verify=trusted).status_code == 401
        bad = {"content-type": MEDIA_TYPE, "authorization": "Bearer wrong"}
        assert httpx.post(url, headers=bad, content=body, verify=trusted).status_code == 401
        good = {"content-type": MEDIA_TYPE, "authorization": "Bearer s3cret"}
        assert httpx.post(url, headers=good, content=body, verify=trusted).status_code == 200
        # a certificate nobody vouches for is refused, and the plain-http port does not exist
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.post(url, headers=good, content=body)
        with pytest.raises(httpx.HTTPError):
            httpx.post(url.replace("https://", "http://"), headers=good, content=body)
        # the edge: handshake and offload over TLS with the CA file
        system = SystemDir.open(trained_system)
        backend, http = connect(system, proc.url, "s3cret", ca_file=tmp_path / "ca.pem")
        try:
            assert backend is http  # the handshake passed
            reply = http.predict("e0", np.zeros((3, 32, 32, 3), np.uint8))
            assert len(reply.labels) == 3
        finally:
            http.close()
        with pytest.raises(ConfigError, match="CA file not found"):
            connect(system, proc.url, "s3cret", ca_file=tmp_path / "missing.pem")
    finally:
        proc.stop()


def test_server_binds_loopback_by_default(trained_system: Path) -> None:
    import subprocess

    proc = ServerProcess(trained_system, host=None)  # no --host: the default bind
    try:
        port = proc.port
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
        if listening.strip():  # iproute2 present: the socket is bound to loopback only
            local = [line.split()[3] for line in listening.splitlines()]  # State Recv-Q Send-Q Local Peer
            assert local == [f"127.0.0.1:{port}"]
        else:  # no ss: connecting through the machine's own outward address must fail
            import socket

            outward = [a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
            others = [a for a in outward if not a.startswith("127.")]
            if not others:  # nothing to test from: say so instead of passing
                pytest.skip("neither `ss` nor a non-loopback address here to check the binding")
            with socket.socket() as s, pytest.raises(OSError):
                s.settimeout(2)
                s.connect((others[0], port))
    finally:
        proc.stop()


def test_serve_on_a_port_in_use_fails_at_once_naming_the_address(trained_system: Path) -> None:
    """The API's socket is taken before the experts load (or Ray starts): a taken port is one line, no traceback,
    and nothing was loaded for it."""
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "askexpert.cli", "serve", "--system", str(trained_system), "--port", str(port)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    said = done.stdout + done.stderr
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in said and "Traceback" not in said
    assert "serving" not in done.stdout  # the experts were never loaded, nor announced


def test_large_offloads_are_split_to_the_servers_batch_limit(server: ServerProcess, trained_system: Path) -> None:
    system = SystemDir.open(trained_system)
    backend = HttpExpertBackend(server.url, system.config().serving)
    limit = backend.handshake(system.partition(), 32).max_request_images
    assert limit is not None and backend.request_images == limit  # 'auto': the server's hardware decides it
    images = np.random.default_rng(3).integers(0, 256, (limit * 2 + 5, 32, 32, 3), dtype=np.uint8)
    reply = backend.predict("e0", images)
    backend.close()
    ref = LocalExpertBackend.of_system(SystemDir.open(trained_system)).predict("e0", images)
    assert reply.labels.tolist() == ref.labels.tolist()
    assert reply.info["bytes_sent"] > images.nbytes


def test_classify_a_split_runs_on_a_device_profile(
    server: ServerProcess, trained_system: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`classify --split --profile`: the profile's thread count is applied, its slowdown a separate modelled field."""
    import torch

    from askexpert.cli import main

    profile = tmp_path / "tiny-board.yaml"
    profile.write_text(
        "name: tiny-board\ntier: edge\nidle_w: 1.0\nactive_w: 3.0\nthreads: 1\nslowdown: 3.5\nsources: [test]\n"
    )
    out = tmp_path / "records.jsonl"
    before = torch.get_num_threads()
    try:
        main(["classify", "--system", str(trained_system), "--split", "test", "--server", server.url, "--limit", "24",
              "--out", str(out), "--profile", str(profile), "--runtime", "torch"])  # fmt: skip
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 24
    for rec in records:
        assert rec["edge_ms_modelled"] == pytest.approx(rec["edge_ms"] * 3.5)
    assert "tiny-board" in capsys.readouterr().out


def test_classify_names_an_unknown_profile(
    trained_system: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from askexpert.cli import main

    with pytest.raises(SystemExit) as info:
        main(["classify", "--system", str(trained_system), "--split", "test", "--server", "http://127.0.0.1:9",
              "--profile", "toaster", "--out", str(tmp_path / "r.jsonl")])  # fmt: skip
    text = capsys.readouterr()
    assert info.value.code == 2 and "unknown device profile 'toaster'" in text.out + text.err


def test_a_metered_server_reports_joules_per_request_and_in_metrics(trained_system: Path) -> None:
    from fastapi.testclient import TestClient

    from askexpert.inference.http_backend import _reply
    from askexpert.serving.server import ExpertService, create_app

    service = ExpertService.from_system(trained_system)
    service.energy_meter = StepMeter(10.0, "fake-nvml")
    images = _test_split(trained_system).images[:3]
    with TestClient(create_app(service)) as client:
        assert client.get("/v1/experts").json()["energy_meter"] == "fake-nvml"
        response = client.post(
            "/v1/experts/e0/predict", content=encode_images(images), headers={"content-type": MEDIA_TYPE}
        )
        timing = response.json()["timing"]
        assert timing["energy_meter"] == "fake-nvml" and timing["batch_size"] == 3
        assert timing["energy_j"] == timing["batch_energy_j"] == pytest.approx(10.0)  # the batch's only caller
        assert 'askexpert_energy_joules_total{expert="e0"} 10.0' in client.get("/metrics").text
        reply = _reply(response, 3, 0, 0.0, 1.0, 0)
        assert reply.info["server_energy_j"] == pytest.approx(10.0)
