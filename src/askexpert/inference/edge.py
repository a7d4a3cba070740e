"""The edge's parts from a system directory: the generalist in its runtime, the link to the server.

`edge_classifier` wires the generalist (ONNX Runtime or torch), the router and
the partition to an expert backend; `connect` makes that backend an HTTP one
that passed the handshake (or that answers alone while the server is away).
`inference.client.EdgeClient` is the front door built on them.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from askexpert.data import input_size
from askexpert.errors import CheckpointError, ConfigError
from askexpert.inference.collaborative import CollaborativeClassifier, Generalist
from askexpert.inference.http_backend import HandshakeError, HttpExpertBackend, ServerUnreachable
from askexpert.models.meta import read_meta
from askexpert.models.onnx_runtime import OnnxGeneralist, exported_from, is_current
from askexpert.protocol.backend import BackendError, ExpertBackend, ExpertReply, RefusingBackend
from askexpert.routing import system_router
from askexpert.system import SystemDir

RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")


def connect(
    system: SystemDir,
    server: str,
    token: str | None = None,
    on_mismatch: str = "fail",
    ca_file: str | Path | None = None,
) -> tuple[ExpertBackend, HttpExpertBackend]:
    """An HTTP backend that passed the handshake, or (`on_mismatch="edge-only"`) one that refuses every call.

    Returns (backend to use, HTTP client to close). On a mismatch with `fail`, the
    `HandshakeError` propagates: the edge never answers for classes the server does not hold.
    """
    if on_mismatch not in ("fail", "edge-only"):
        raise ConfigError(f"on_mismatch must be 'fail' or 'edge-only', got {on_mismatch!r}")
    cfg = system.config()
    http = HttpExpertBackend(server, cfg.serving, token, ca_file)
    part = system.partition()
    shas = {}
    for eid in part.expert_ids:  # pin the weights too when this edge has the experts' metadata
        side = system.expert_path(cfg.serving.schedule, eid).with_suffix(".json")
        if side.is_file():
            shas[eid] = read_meta(side.with_suffix(".safetensors")).sha256
    try:
        http.handshake(part, input_size(cfg.data), shas or None)
    except HandshakeError as exc:
        if on_mismatch == "fail":
            http.close()
            raise
        return RefusingBackend(exc), http
    except ServerUnreachable as exc:  # the edge answers alone meanwhile, and keeps trying
        handshake = functools.partial(http.handshake, part, input_size(cfg.data), shas or None)
        return PendingHandshake(http, handshake, cfg.serving.handshake_retry_s, exc), http
    return http, http


class PendingHandshake:
    """A server unreachable at start: the edge answers alone, retrying the handshake every `retry_s` seconds.

    Until a handshake succeeds every call is refused (the samples keep the
    generalist's label, `reason: "edge-only: ..."` says why); after it, calls go
    to the server. A server that comes up with other experts is never offloaded
    to (`reason: "mismatch: ..."`), whatever `on_mismatch` says: a running edge
    does not stop.
    """

    def __init__(
        self,
        http: HttpExpertBackend,
        handshake: Callable[[], object],
        retry_s: float,
        first_error: BackendError,
    ) -> None:
        self.http = http
        self.handshake = handshake
        self.retry_s = retry_s
        self.error: BackendError = first_error
        self.next_try = time.monotonic() + retry_s
        self.connected = False

    def predict(self, expert_id: str, images: np.ndarray) -> ExpertReply:
        if not self.connected and time.monotonic() >= self.next_try:
            try:
                self.handshake()
                self.connected = True
            except BackendError as exc:
                self.error = exc
                self.next_try = time.monotonic() + self.retry_s
        if not self.connected:
            if isinstance(self.error, HandshakeError):
                raise self.error
            raise ServerUnreachable(f"{self.error}; retrying the handshake every {self.retry_s:g} s")
        return self.http.predict(expert_id, images)


def edge_runtime(system: SystemDir, runtime: str = "auto") -> str:
    """`auto`: the exported ONNX generalist when the system has a current one, else the checkpoint in torch."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown edge runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime != "auto":
        return runtime
    return "onnx" if is_current(system.onnx_path("onnx"), system.generalist_meta().sha256) else "torch"


def load_generalist(system: SystemDir, runtime: str = "auto", device: str = "cpu", threads: int = 0) -> Generalist:
    """The system's generalist in an edge runtime; an ONNX export older than the checkpoint is refused."""
    if threads < 0:
        raise ConfigError(f"threads must be ≥ 0, got {threads}")
    runtime = edge_runtime(system, runtime)
    if runtime == "torch":
        try:
            from askexpert.models import TorchGeneralist, load_checkpoint
        except ImportError as exc:
            raise ConfigError(
                f"the torch runtime needs the training stack ({exc.name} is not installed): "
                "pip install 'askexpert[train]', or run the exported generalist (`askexpert export onnx`)"
            ) from None
        model, _ = load_checkpoint(system.generalist_path, device)
        return TorchGeneralist(model, device, threads)
    path, now = system.onnx_path(runtime), system.generalist_meta().sha256
    if path.is_file() and not is_current(path, now):
        made_from = exported_from(path)
        raise CheckpointError(
            f"{path}: exported from another generalist than {system.generalist_path.name} "
            f"({(made_from or 'unknown')[:12]}, now {now[:12]}); re-export it with `askexpert export onnx`"
        )
    return OnnxGeneralist(path, threads)


def edge_classifier(
    system: SystemDir, backend: ExpertBackend, device: str = "cpu", runtime: str = "auto", threads: int = 0
) -> CollaborativeClassifier:
    """The generalist (in the chosen runtime), router and partition of a system, wired to `backend`.

    `threads` > 0 limits the generalist's compute threads, to behave like an edge
    board with that many cores (0: the runtime's default).
    """
    generalist = load_generalist(system, runtime, device, threads)
    part = system.partition()
    return CollaborativeClassifier(generalist, system_router(system, part), part, backend)
