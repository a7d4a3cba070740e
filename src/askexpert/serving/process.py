"""`askexpert serve` as a child process: for the testbed, the tests and the benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from askexpert.errors import AskExpertError


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """Start the server (optionally under a command prefix such as `ip netns exec NS`)."""

    def __init__(
        self,
        system: str | Path,
        *extra: str,
        host: str | None = "127.0.0.1",
        port: int | None = None,
        prefix: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        """`host=None` leaves `--host` out, so the server binds where `serve` binds by default."""
        self.port = port or free_port()
        self.tls = "--tls-cert" in extra
        self.url = f"{'https' if self.tls else 'http'}://{host or '127.0.0.1'}:{self.port}"
        cmd = [
            *prefix,
            sys.executable,
            "-m",
            "askexpert.cli",
            "serve",
            "--system",
            str(Path(system).resolve()),
            *(["--host", host] if host else []),
            "--port",
            str(self.port),
            *extra,
        ]
        # The server's output goes to a file, not a pipe: nobody reads a pipe while the
        # server runs, and a chatty engine (Ray logs a lot) would block once it filled.
        self.log = tempfile.NamedTemporaryFile(prefix="askexpert-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def output(self, limit: int = 2000) -> str:
        """The last `limit` characters the server printed."""
        try:
            return Path(self.log.name).read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def wait_ready(self, url: str | None = None, seconds: float = 90) -> ServerProcess:
        """Poll `/readyz` (at `url`, default the server's own) until it answers 200."""
        url = url or self.url
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.output()
                self.stop()
                raise AskExpertError(f"expert server exited during start-up: {out}")
            try:
                # our own child's readiness: its certificate is checked by the clients under test, not here
                if httpx.get(f"{url}/readyz", timeout=1, verify=not self.tls).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AskExpertError(f"expert server at {url} not ready after {seconds:.0f} s")

    def stop(self, graceful_s: float = 0.0) -> None:
        if self.proc.poll() is None and graceful_s > 0:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=graceful_s)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
