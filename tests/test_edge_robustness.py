"""The edge under bad answers, a dead or overloaded server, and a server with other experts."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import httpx
import numpy as np
import pytest

from askexpert.config import ServingConfig
from askexpert.inference.http_backend import CircuitBreaker, HandshakeError, HttpExpertBackend, _reply
from askexpert.partition import Partition
from askexpert.protocol.backend import BackendError, ExpertReply
from askexpert.protocol.http import API_VERSION, EXPERTS_PATH, ErrorReply, ExpertInfo, Handshake
from askexpert.protocol.wire import MEDIA_TYPE, encode_images
from askexpert.system import SystemDir
from conftest import ServerProcess


def test_circuit_breaker_opens_half_opens_and_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("askexpert.inference.http_backend.time.monotonic", lambda: now[0])
    breaker = CircuitBreaker(failures_to_open=2, cooldown_s=5.0)
    breaker.record(False)
    assert breaker.allow()  # one failure: still closed
    breaker.record(False)
    assert not breaker.allow()  # open: calls are refused at once
    now[0] += 4.9
    assert not breaker.allow()
    now[0] += 0.2
    assert breaker.allow()  # half-open: one probe may go
    breaker.record(False)
    assert not breaker.allow()  # the probe failed: open again for a full cooldown
    now[0] += 5.1
    assert breaker.allow()
    breaker.record(True)  # the probe succeeded: closed
    assert breaker.allow() and breaker.failures == 0 and breaker.opened_at is None


_GOOD_REPLY = {
    "expert": "e0",
    "labels": [1],
    "other": [False],
    "confidence": [0.5],
    "probs": [[0.5, 0.5]],
    "timing": {"queue_ms": 1.0, "compute_ms": 2.0, "batch_size": 4},
}


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"labels": 5}, r"labels: Input should be a valid (list|array)"),
        ({"labels": [1, 2]}, r"labels \(2,\), confidence \(1,\) for 1 images"),
        ({"labels": None}, r"labels: Input should be a valid (list|array)"),
        ({"timing": "soon"}, r"timing: Input should be an object"),
        ({"timing": {"queue_ms": 1.0}}, r"timing.compute_ms: Field required \(1 more\)"),
        ({"probs": [1, 2]}, r"probs.0: Input should be a valid (list|array)"),
        ({"probs": [[0.5, 0.5], [0.5, 0.5]]}, r"probs of shape \(2, 2\) for 1 images"),
        ({"probs": [[0.5, 0.5, 0.1], [0.5]]}, r"probs rows differ in length"),
        ("not json", r"malformed server reply: \(the body\): Invalid JSON"),
    ],
)
def test_malformed_replies_are_backend_errors(change: object, fragment: str) -> None:
    """Every defect is refused with the field named; the untouched reply parses (the cases can fail)."""
    good = _reply(httpx.Response(200, content=json.dumps(_GOOD_REPLY).encode()), 1, 100, 0.0, 1.0, 0)
    assert good.labels.tolist() == [1] and good.info["compute_ms"] == 2.0 and good.info["batch_size"] == 4
    content = change.encode() if isinstance(change, str) else json.dumps(_GOOD_REPLY | change).encode()  # type: ignore[operator]
    with pytest.raises(BackendError, match=fragment):
        _reply(httpx.Response(200, content=content), 1, 100, 0.0, 1.0, 0)


def test_a_server_of_another_api_version_or_shape_is_refused() -> None:
    part = Partition("random", 4, ("e0", "e1"), ((0, 1), (2, 3)))
    doc = Handshake(
        api="v2", image_size=32, experts=[ExpertInfo(id="e0", classes=[0, 1]), ExpertInfo(id="e1", classes=[2, 3])]
    )
    asked: list[str] = []

    def answer(body: bytes) -> httpx.MockTransport:
        def handler(request: httpx.Request) -> httpx.Response:
            asked.append(request.url.path)
            return httpx.Response(200, content=body)

        return httpx.MockTransport(handler)

    backend = HttpExpertBackend("http://edge.invalid", ServingConfig())
    backend.client = httpx.Client(transport=answer(doc.model_dump_json().encode()))
    with pytest.raises(HandshakeError, match=f"speaks API 'v2', this edge '{API_VERSION}'"):
        backend.handshake(part, 32)
    backend.client = httpx.Client(
        transport=answer(doc.model_copy(update={"api": API_VERSION}).model_dump_json().encode())
    )
    assert backend.handshake(part, 32).experts[1].classes == [2, 3]  # the same message, one version: accepted
    backend.client = httpx.Client(transport=answer(b'{"api": "v1", "image_size": "big", "experts": []}'))
    with pytest.raises(
        HandshakeError, match="malformed /v1/experts reply: image_size: Input should be a valid integer"
    ):
        backend.handshake(part, 32)
    assert asked == [EXPERTS_PATH] * 3


class _Liar:
    """A server that answers with labels outside the expert's classes."""

    def predict(self, expert_id: str, images: np.ndarray) -> ExpertReply:
        return ExpertReply(np.full(len(images), 3), np.full(len(images), 0.9, np.float32))


def test_out_of_range_answers_fall_back(trained_system: Path) -> None:
    from askexpert.data import load_splits
    from askexpert.inference.edge import edge_classifier

    system = SystemDir.open(trained_system)
    part = Partition.from_json(system.partition_path)
    clf = edge_classifier(system, _Liar())
    clf.router = clf.router.at(clf.router.point.updated(gate="max_prob", tau=1.0))  # everything offloaded
    test = load_splits(system.config().data, trained_system).test
    pred = clf(test.images[:20])
    outside = [i for i in range(20) if 3 not in part.subsets[part.index(str(pred.expert[i]))]]
    assert outside  # some samples went to an expert that does not hold class 3
    for i in outside:
        assert pred.source[i] == "fallback" and "outside its classes" in pred.reason[i]
        assert pred.labels[i] == pred.generalist_labels[i]


def test_oversize_body_without_content_length_is_refused(server: ServerProcess) -> None:
    def chunks():  # a generator body: httpx sends it chunked, with no Content-Length
        block = b"\0" * (1 << 20)
        for _ in range(17):
            yield block

    response = httpx.post(
        f"{server.url}/v1/experts/e0/predict", headers={"content-type": MEDIA_TYPE}, content=chunks(), timeout=30
    )
    assert response.status_code == 413 and "exceeds the limit" in response.json()["error"]
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_handshake_checks_experts_classes_and_weights(server: ServerProcess, trained_system: Path) -> None:
    from askexpert.inference.edge import connect

    system = SystemDir.open(trained_system)
    cfg = system.config()
    part = Partition.from_json(system.partition_path)
    backend = HttpExpertBackend(server.url, cfg.serving)
    try:
        backend.handshake(part, 32)  # the same system: passes
        swapped = Partition("manual", part.num_classes, part.expert_ids, tuple(reversed(part.subsets)))
        with pytest.raises(HandshakeError, match="expert e0 serves classes"):
            backend.handshake(swapped, 32)
        with pytest.raises(HandshakeError, match="expects 32×32 images, this edge sends 64×64"):
            backend.handshake(part, 64)
        with pytest.raises(HandshakeError, match="weights differ"):
            backend.handshake(part, 32, {"e0": "0" * 64})
    finally:
        backend.close()
    # A retrained partition on the edge side: `connect` refuses, or runs edge-only with reason "mismatch".
    other = trained_system.parent / "edge-copy"
    import shutil

    shutil.copytree(trained_system, other, dirs_exist_ok=True)
    Partition("manual", part.num_classes, part.expert_ids, tuple(reversed(part.subsets))).to_json(
        other / "partition.json"
    )
    edge_system = SystemDir.open(other)
    with pytest.raises(HandshakeError, match="handshake with"):
        connect(edge_system, server.url)
    refusing, http = connect(edge_system, server.url, on_mismatch="edge-only")
    try:
        from askexpert.inference.edge import edge_classifier

        clf = edge_classifier(edge_system, refusing)
        clf.router = clf.router.at(clf.router.point.updated(gate="max_prob", tau=1.0))
        images = np.zeros((4, 32, 32, 3), np.uint8)
        pred = clf(images)
        assert (pred.source == "fallback").all() and all(r.startswith("mismatch: ") for r in pred.reason)
    finally:
        http.close()


@pytest.fixture(scope="module")
def tight_server(trained_system: Path):
    """A server whose queue bound is one batch of 8 images: two concurrent requests overflow it."""
    import shutil

    raw = SystemDir.open(trained_system).config().model_dump(mode="json")
    raw["serving"].update(max_queue_images=8, max_batch_size=8, max_wait_ms=50)
    copy = trained_system.parent / "overload-copy"
    shutil.copytree(trained_system, copy, dirs_exist_ok=True)
    (copy / "config.yaml").write_text(json.dumps(raw))
    proc = ServerProcess(copy)
    yield proc
    proc.stop()


def test_the_edge_sizes_its_requests_by_the_servers_limit(tight_server: ServerProcess, trained_system: Path) -> None:
    """An edge whose config allows 64 images a request, a server that allows 8: the handshake says so, and 20
    images go as 8 + 8 + 4 instead of one request the server refuses (400)."""
    system = SystemDir.open(trained_system)
    edge = system.config().serving.model_copy(update={"max_batch_size": 64})
    backend = HttpExpertBackend(tight_server.url, edge)
    assert backend.request_images == 64  # before the handshake: its own setting
    try:
        doc = backend.handshake(system.partition(), 32)
        assert doc.max_request_images == 8 == backend.request_images
        images = np.random.default_rng(3).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
        reply = backend.predict("e0", images)
        assert len(reply.labels) == 20
        assert len(backend.predict("e0", images[:1]).labels) == 1
    finally:
        backend.close()


def _admitted_images(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith('askexpert_admitted_images{expert="e0"}'):
            return float(line.split()[-1])
    return 0.0


def _read_reply(sock: socket.socket) -> str:
    """One whole HTTP reply: the head and its content-length of body (they may arrive in separate packets)."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _content_length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.decode()


def _content_length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].decode().lower()
    found = [line.split(":", 1)[1] for line in head.split("\r\n") if line.startswith("content-length:")]
    return int(found[0]) if found else 0


def test_a_full_queue_refuses_before_reading_the_body(tight_server: ServerProcess) -> None:
    """Admission decides from the headers: a refused request's body is never waited for."""
    import time

    port = int(tight_server.url.rsplit(":", 1)[1])
    length = 24 + 8 * 32 * 32 * 3  # eight 32×32 images: the whole queue bound
    head = (
        f"POST /v1/experts/e0/predict HTTP/1.1\r\nhost: x\r\ncontent-type: {MEDIA_TYPE}\r\n"
        f"content-length: {length}\r\n\r\n"
    ).encode()
    holder = socket.create_connection(("127.0.0.1", port))
    holder.sendall(head + encode_images(np.zeros((8, 32, 32, 3), np.uint8))[:100])  # then it stalls
    try:
        deadline = time.monotonic() + 60
        while _admitted_images(tight_server.url) < 8:  # the stalled request holds the queue
            assert time.monotonic() < deadline, "the stalled request was never admitted"
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as refused:
            refused.sendall(head)  # headers only: a body that never comes
            reply = _read_reply(refused)  # a server that waited for the body would time out here
        assert reply.startswith("HTTP/1.1 429"), reply
        assert "retry-after: 1" in reply.lower() and "8 images already queued" in reply
    finally:
        holder.close()
    # the stalled client gave up: its share of the queue is freed, and the next request is served
    body = encode_images(np.zeros((8, 32, 32, 3), np.uint8))
    deadline = time.monotonic() + 60
    while _admitted_images(tight_server.url) > 0:
        assert time.monotonic() < deadline, "a disconnected request kept its place in the queue"
        time.sleep(0.05)
    ok = httpx.post(f"{tight_server.url}/v1/experts/e0/predict", headers={"content-type": MEDIA_TYPE}, content=body)
    assert ok.status_code == 200, ok.text


def test_overload_gets_429_with_retry_after_and_the_edge_falls_back_at_once(
    tight_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    proc = tight_server
    body = encode_images(np.zeros((8, 32, 32, 3), np.uint8))
    replies: list[httpx.Response] = []  # one append per thread: the lists of several appends could interleave

    def post() -> None:
        r = httpx.post(f"{proc.url}/v1/experts/e0/predict", headers={"content-type": MEDIA_TYPE}, content=body)
        replies.append(r)

    threads = [threading.Thread(target=post) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = [r.status_code for r in replies]
    assert 429 in statuses and 200 in statuses and all(s in (200, 429) for s in statuses)
    for r in (r for r in replies if r.status_code == 429):
        # the body says the drain to the millisecond; Retry-After is that in whole seconds, rounded up, at least 1
        ms = r.json().get("retry_after_ms")
        assert ms is not None and ms > 0 and r.headers.get("retry-after") == str(max(1, math.ceil(ms / 1e3)))
        assert ErrorReply.model_validate_json(r.content).retry_after_s == pytest.approx(ms / 1e3)  # a client's read
    text = httpx.get(f"{proc.url}/metrics").text
    assert 'askexpert_shed_total{expert="e0",reason="queue_full"}' in text
    # The edge client: a 429 is one attempt, no retries, a BackendError naming the overload.
    cfg = ServingConfig(retries=3, backoff_s=1.0, max_batch_size=8)
    backend = HttpExpertBackend(proc.url, cfg)
    calls = {"n": 0}
    original = backend.client.post

    def counting(*args: object, **kwargs: object) -> httpx.Response:
        calls["n"] += 1
        return httpx.Response(429, headers={"retry-after": "2"}, json={"error": "expert e0 is overloaded"})

    backend.client.post = counting  # type: ignore[method-assign]
    slept: list[float] = []
    monkeypatch.setattr("askexpert.inference.http_backend.time.sleep", slept.append)
    with pytest.raises(BackendError, match=r"overloaded \(429, retry after 2 s\)"):
        backend.predict("e0", np.zeros((2, 32, 32, 3), np.uint8))
    assert calls["n"] == 1 and slept == []  # no retry, no back-off: the edge falls back at once
    backend.client.post = original  # type: ignore[method-assign]
    backend.close()


def test_before_a_handshake_an_edge_left_on_auto_sends_what_any_server_accepts() -> None:
    """'auto' lets the server's hardware choose its batch limit (8 on a CPU, 64 on a GPU): until the handshake
    names it, the edge sends at most the smallest of them."""
    from askexpert.config import ServingConfig

    backend = HttpExpertBackend("http://127.0.0.1:9", ServingConfig())
    try:
        assert backend.request_images == 8
    finally:
        backend.close()
