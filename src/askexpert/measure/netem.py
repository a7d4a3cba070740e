"""A real emulated link between the edge and the near-edge server.

Layout: the server runs in its own network namespace, joined to the host (where
the edge runs) by a veth pair with link-local addresses. Rate comes from `tbf`
on both veth ends. Delay, jitter and loss come from `tc netem` where the kernel
has it; where it does not (these machines: "Specified qdisc kind is unknown"),
a delaying TCP relay on the host's loopback adds them: the edge talks to the
relay, the relay forwards over the veth to the server.

Everything is torn down on exit, also when the run fails; `LinkUnavailable`
says why no emulated link could be made (not root, no iproute2), so callers can
fall back to the analytic link model and say so.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from askexpert.errors import AskExpertError
from askexpert.measure.profiles import LinkPreset

HOST_IP, PEER_IP = "169.254.213.1", "169.254.213.2"


class LinkUnavailable(AskExpertError):
    """No emulated link can be set up here (the reason says why)."""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise LinkUnavailable(f"`{' '.join(cmd)}` failed: {result.stderr.strip() or result.stdout.strip()}")
    return result


def can_emulate() -> str | None:
    """None when a namespace link can be made, else the reason it cannot."""
    if os.geteuid() != 0:
        return "not running as root (network namespaces need CAP_NET_ADMIN)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (`ip`, `tc`) is not installed"
    return None


@dataclass
class NamespaceLink:
    """Context manager: namespace + veth + qdiscs, removed on exit whatever happened."""

    preset: LinkPreset
    name: str = field(default_factory=lambda: f"askexpert-{os.getpid()}")
    methods: dict[str, str] = field(default_factory=dict)

    @property
    def host_dev(self) -> str:
        return f"axh{os.getpid() % 100000}"

    @property
    def peer_dev(self) -> str:
        return f"axp{os.getpid() % 100000}"

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def __enter__(self) -> NamespaceLink:
        reason = can_emulate()
        if reason:
            raise LinkUnavailable(reason)
        try:
            self._setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def _setup(self) -> None:
        ns = self.exec_prefix()
        _run("ip", "netns", "add", self.name)
        _run("ip", "link", "add", self.host_dev, "type", "veth", "peer", "name", self.peer_dev)
        _run("ip", "link", "set", self.peer_dev, "netns", self.name)
        _run("ip", "addr", "add", f"{HOST_IP}/30", "dev", self.host_dev)
        _run("ip", "link", "set", self.host_dev, "up")
        _run(*ns, "ip", "addr", "add", f"{PEER_IP}/30", "dev", self.peer_dev)
        _run(*ns, "ip", "link", "set", self.peer_dev, "up")
        _run(*ns, "ip", "link", "set", "lo", "up")
        p = self.preset
        half_delay = f"{p.rtt_ms / 2:.3f}ms"
        half_jitter = f"{p.jitter_ms / 2:.3f}ms"
        for prefix, dev, mbps in (([], self.host_dev, p.down_mbps), (ns, self.peer_dev, p.up_mbps)):
            root_qdisc = [*prefix, "tc", "qdisc", "add", "dev", dev, "root"]
            netem = _run(
                *root_qdisc,
                "netem",
                "delay",
                half_delay,
                half_jitter,
                "loss",
                f"{p.loss * 100:.4f}%",
                "rate",
                f"{mbps}mbit",
                check=False,
            )
            if netem.returncode == 0:
                self.methods.update(rate="netem", delay="netem", loss="netem")
                continue
            burst = max(1600, int(mbps * 1e6 / 8 / 250))  # ~4 ms of data, at least one MTU
            _run(*root_qdisc, "tbf", "rate", f"{mbps}mbit", "burst", str(burst), "latency", "100ms")
            self.methods.update(rate="tbf", delay="relay", loss="relay")

    def teardown(self) -> None:
        _run("ip", "netns", "del", self.name, check=False)  # removes the peer end and with it the pair
        _run("ip", "link", "del", self.host_dev, check=False)

    def exists(self) -> bool:
        return self.name in _run("ip", "netns", "list", check=False).stdout.split()


class DelayRelay:
    """A TCP relay that adds one-way delay, jitter and loss (as retransmission delay).

    Each direction of each connection delivers chunks in order, each no earlier than
    `rtt/2 ± jitter/2` after it arrived; with probability `loss` a chunk is held one
    extra retransmission timeout (max(200 ms, 3·RTT)), which is what TCP turns loss into.
    """

    def __init__(self, target: tuple[str, int], rtt_ms: float, jitter_ms: float, loss: float, seed: int = 0) -> None:
        self.target = target
        self.one_way_s = rtt_ms / 2e3
        self.jitter_s = jitter_ms / 2e3
        self.loss = loss
        self.rto_s = max(0.2, 3 * rtt_ms / 1e3)
        self.rng = random.Random(seed)
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="askexpert-relay")

    def _delay(self) -> float:
        d = self.one_way_s + self.rng.gauss(0.0, self.jitter_s) if self.jitter_s else self.one_way_s
        if self.loss and self.rng.random() < self.loss:
            d += self.rto_s
        return max(0.0, d)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        release = 0.0
        try:
            while chunk := await reader.read(65536):
                release = max(release, time.monotonic() + self._delay())
                wait = release - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except asyncio.CancelledError:  # relay shutting down: end quietly, the sockets are closed
            up_writer.close()
            writer.close()

    async def _start(self) -> Any:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    def __enter__(self) -> DelayRelay:
        self._thread.start()
        self.port = int(asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10))
        return self

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()
