"""The benchmarks' lean load client: real answers from a real server, kept-alive connections, failures as status 0."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from askexpert.measure.load import LoadClient
from askexpert.protocol.http import ErrorReply
from askexpert.protocol.wire import MEDIA_TYPE, encode_images
from conftest import ServerProcess

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _body(images: int = 2) -> bytes:
    return encode_images(np.random.default_rng(0).integers(0, 256, (images, 32, 32, 3), dtype=np.uint8))


def test_posts_to_the_expert_server_and_keeps_its_connections(server: ServerProcess) -> None:
    async def go() -> tuple[list[int], list[bytes], int, bytes]:
        async with LoadClient(f"{server.url}/v1/experts/e0/predict", _body(), MEDIA_TYPE) as client:
            replies = [await client.post() for _ in range(3)]  # one after the other: one connection
            opened = len(client.opened)
        async with LoadClient(f"{server.url}/v1/experts/e9/predict", _body(), MEDIA_TYPE) as client:
            unknown = await client.post()
        return [r.status for r in replies], [r.body for r in replies], opened, unknown.body

    statuses, bodies, opened, unknown = asyncio.run(go())
    assert statuses == [200, 200, 200]
    assert all(len(json.loads(body)["labels"]) == 2 for body in bodies)  # the server decoded both images
    assert opened == 1
    assert "unknown expert" in ErrorReply.model_validate_json(unknown).error


def test_the_overload_benchmarks_open_loop_counts_every_answer(server: ServerProcess) -> None:
    """`benchmarks/serve_overload.py`'s open loop on this client: every request sent on the clock is answered
    and counted once, and the server's own timing is read from each accepted answer."""
    path = Path(__file__).parents[1] / "benchmarks" / "serve_overload.py"
    spec = importlib.util.spec_from_file_location("serve_overload", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    url = f"{server.url}/v1/experts/e0/predict"
    row = asyncio.run(bench._open_loop(url, _body(), rate=40.0, seconds=1.0))
    assert row["sent"] == 40 and row["failed_connection"] == 0 and row["status_5xx"] == 0
    assert row["ok"] + row["shed_429"] == 40 and row["ok"] > 0
    assert row["server_p99_ms"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0


async def _serve(handler: Handler) -> tuple[asyncio.Server, str]:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    return srv, f"http://127.0.0.1:{port}/x"


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = int(next(line for line in lines if line.lower().startswith(b"content-length")).split(b":")[1])
    return await reader.readexactly(length)


def test_concurrent_posts_open_connections_and_a_closing_server_is_followed() -> None:
    """Each request in flight has its own connection; an answer that says `Connection: close` is not reused."""
    seen: list[bytes] = []
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        seen.append(await _read_request(reader))
        await asyncio.sleep(0.05)  # long enough for the other requests to need connections of their own
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def go() -> tuple[list[tuple[int, bytes]], int, int]:
        srv, url = await _serve(handler)
        async with srv, LoadClient(url, b"payload", "application/octet-stream") as client:
            first = await asyncio.gather(*(client.post() for _ in range(3)))
            during = len(client.opened)
            after = await client.post()  # every connection was closed by the server: a new one
            for _ in range(100):  # the server's close reaches the client shortly after its answer
                if not client.opened:
                    break
                await asyncio.sleep(0.01)
            return [(r.status, r.body) for r in (*first, after)], during, len(client.opened)

    replies, during, left = asyncio.run(go())
    assert replies == [(201, b"ok")] * 4
    assert seen == [b"payload"] * 4
    assert connections == 4
    # a connection the server closed leaves the client's open set: a long run does not hoard them until close()
    assert during <= 3 and left == 0


def test_a_silent_server_times_out_and_a_closed_port_answers_status_zero() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.sleep(5)

    async def go() -> tuple[int, float, int]:
        srv, url = await _serve(silent)
        async with srv, LoadClient(url, b"x", "text/plain", timeout_s=0.2) as client:
            start = time.perf_counter()
            timed_out = await client.post()
            waited = time.perf_counter() - start
        with socket.socket() as sock:  # a port nothing listens on
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        async with LoadClient(f"http://127.0.0.1:{port}/x", b"x", "text/plain") as client:
            refused = await client.post()
        return timed_out.status, waited, refused.status

    status, waited, refused = asyncio.run(go())
    assert status == 0 and 0.2 <= waited < 2.0
    assert refused == 0


def test_a_garbled_answer_is_status_zero_not_an_exception() -> None:
    async def garbled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"this is not HTTP\r\n\r\n")
        await writer.drain()

    async def go() -> int:
        srv, url = await _serve(garbled)
        async with srv, LoadClient(url, b"x", "text/plain", timeout_s=2) as client:
            return (await client.post()).status

    assert asyncio.run(go()) == 0


@pytest.mark.parametrize("url", ["https://127.0.0.1:1/x", "127.0.0.1:80/x", "http:///x"])
def test_only_plain_http_urls_are_taken(url: str) -> None:
    with pytest.raises(ValueError, match="plain http"):
        LoadClient(url, b"", "text/plain")
