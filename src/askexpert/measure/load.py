"""A lean HTTP/1.1 load client for the serving benchmarks: one fixed POST, sent over a pool of kept-alive connections.

Why not a general client: on one host the load generator takes its CPU from the
server it measures. aiohttp spent 0.19-0.23 ms of a core per request (4 images, a
refusal as the answer) and sent headers and body as two segments, which cost the
server a second read; this client sends each prebuilt request in one write, parses
the answer with httptools (uvicorn's own parser) and, for an open loop, answers
through a callback rather than a task per request (docs/serving-log.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools


@dataclass(frozen=True)
class Reply:
    """One answer: its status and body (status 0: no answer: connection lost, timed out or garbled)."""

    status: int
    body: bytes


Done = Callable[[Reply], None]
_NO_ANSWER = Reply(0, b"")


class _Connection(asyncio.Protocol):
    """One kept-alive connection; at most one request on it at a time (no pipelining)."""

    def __init__(self, idle: list[_Connection], opened: set[_Connection]) -> None:
        self.idle = idle  # the client's kept-alive connections with no request on them
        self.opened = opened  # the client's open connections, to close at the end
        self.transport: asyncio.Transport | None = None
        self.done: Done | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.chunks: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.opened.add(self)

    def start(self, request: bytes, done: Done, timer: asyncio.TimerHandle) -> None:
        self.done, self.timer = done, timer
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.fail()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        reply = Reply(self.parser.get_status_code(), b"".join(self.chunks))
        self.chunks = []
        if self.parser.should_keep_alive():
            self.idle.append(self)
        elif self.transport is not None:
            self.transport.close()
        self._answer(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.idle:
            self.idle.remove(self)
        self.opened.discard(self)  # closed by either side: nothing left to close
        self._answer(_NO_ANSWER)

    def fail(self) -> None:
        """No (usable) answer: the request ends with status 0 and the connection is not used again."""
        if self.transport is not None:
            self.transport.close()
        self._answer(_NO_ANSWER)

    def _answer(self, reply: Reply) -> None:
        done, self.done = self.done, None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if done is not None:
            done(reply)


class LoadClient:
    """POSTs one fixed body to one URL, as many at once as asked for; never raises for the server's or the
    network's failures (status 0), so that an open loop keeps its clock.

    `send(done)` starts a request and calls `done(reply)` when it ends (the open loop's way: no task per
    request); `await post()` is the same as a coroutine. Use inside a running event loop; `close` (or
    `async with`) closes every connection.
    """

    def __init__(self, url: str, body: bytes, content_type: str, timeout_s: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"LoadClient speaks plain http to a host, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.request = head.encode("latin-1") + body
        self.timeout_s = timeout_s
        self.idle: list[_Connection] = []
        self.opened: set[_Connection] = set()  # open connections (a closed one leaves): `close` closes them
        self._opening: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> LoadClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def send(self, done: Done) -> None:
        if self.idle:
            self._start(self.idle.pop(), done)
            return
        task = asyncio.get_running_loop().create_task(self._open_and_send(done))
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    async def post(self) -> Reply:
        answer: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()

        def done(reply: Reply) -> None:
            if not answer.done():
                answer.set_result(reply)

        self.send(done)
        return await answer

    def _start(self, conn: _Connection, done: Done) -> None:
        timer = asyncio.get_running_loop().call_later(self.timeout_s, conn.fail)
        conn.start(self.request, done, timer)

    async def _open_and_send(self, done: Done) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: _Connection(self.idle, self.opened), self.host, self.port)
        except OSError:
            done(_NO_ANSWER)
            return
        self._start(conn, done)

    def close(self) -> None:
        for task in list(self._opening):
            task.cancel()
        for conn in list(self.opened):
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()
        self.opened.clear()
