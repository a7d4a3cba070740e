"""The near-edge ExpertServer: every expert of a system directory behind one HTTP API.

The API (paths, headers, every message) is `askexpert.protocol.http`: this
module builds its messages, the edge's `HttpExpertBackend` parses them.
`ExpertService` is the unit of serving (a small class with an async
`__call__`); batching is the `dynamic_batch` decorator on its `run` method.
`serving.ray_app` runs the same HTTP app over Ray Serve deployments instead.
The FastAPI app translates HTTP to and from the service, admits or sheds each
predict request from its headers before reading its body (`serving.admission`,
shared by both engines), and turns every bad request into a 4xx JSON error
that names the problem.
"""

from __future__ import annotations

import hmac
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from askexpert.config import ResolvedServing, ServingConfig
from askexpert.data import input_size
from askexpert.errors import AskExpertError, ConfigError
from askexpert.measure.energy import EnergyMeter, meter_for
from askexpert.models import CheckpointMeta, resolve_device
from askexpert.models.local_experts import LocalExpertBackend
from askexpert.models.predict import bfloat16_honoured
from askexpert.partition import Partition
from askexpert.protocol import OTHER
from askexpert.protocol.backend import reply_from_logits
from askexpert.protocol.http import (
    API_VERSION,
    BUDGET_HEADER,
    EXPERTS_PATH,
    HEALTH_PATH,
    METRICS_PATH,
    PREDICT_PATH,
    READY_PATH,
    ErrorReply,
    ExpertInfo,
    Handshake,
    PredictReply,
    Readiness,
    ServerSettings,
    Timing,
)
from askexpert.protocol.wire import MEDIA_TYPE, WireError, decode_images
from askexpert.serving.admission import Admission, Refused, Ticket, retry_after_header
from askexpert.serving.batching import BatchResult, DeadlineExpired, QueueFull, dynamic_batch
from askexpert.serving.onnx_experts import OnnxExperts
from askexpert.system import SystemDir


class ServiceMetrics:
    """Prometheus series per expert, in a registry of the service's own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("askexpert_requests", "Predict requests", ["expert", "status"], registry=self.registry)
        self.images = Counter("askexpert_images", "Images classified", ["expert"], registry=self.registry)
        self.errors = Counter(
            "askexpert_errors", "Rejected or failed requests", ["expert", "kind"], registry=self.registry
        )
        buckets = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
        self.batch_size = Histogram(
            "askexpert_batch_size", "Images per model call", ["expert"], buckets=buckets, registry=self.registry
        )
        self.queue = Histogram(
            "askexpert_queue_seconds", "Wait before the batch ran", ["expert"], registry=self.registry
        )
        self.compute = Histogram(
            "askexpert_compute_seconds", "Model time per batch", ["expert"], registry=self.registry
        )
        self.shed = Counter(
            "askexpert_shed",
            "Requests shed: queue_full (429) or deadline",
            ["expert", "reason"],
            registry=self.registry,
        )
        self.disconnects = Counter(
            "askexpert_client_disconnects", "Clients gone before their request was read", registry=self.registry
        )
        self.energy = Counter(
            "askexpert_energy_joules", "Metered energy of the model calls", ["expert"], registry=self.registry
        )
        self.admitted = Gauge(
            "askexpert_admitted_images", "Images admitted and not yet answered", ["expert"], registry=self.registry
        )
        self.throughput = Gauge(
            "askexpert_images_per_second",
            "Images answered per second while busy: what the wait estimate divides by",
            ["expert"],
            registry=self.registry,
        )

    def refused(self, expert: str, status: int, kind: str) -> None:
        """A predict request answered with an error: counted by kind and by status."""
        self.errors.labels(expert, kind).inc()
        self.requests.labels(expert, str(status)).inc()


def _bearer(token: str | None) -> bytes | None:
    return f"Bearer {token}".encode() if token else None


def _authorised(given: bytes, expected: bytes | None) -> bool:
    """The request's Authorization header against the expected bearer value (constant time); no token: open."""
    return expected is None or hmac.compare_digest(given, expected)


class ServiceBase:
    """What the HTTP layer needs from a service: expert facts, metrics, and an async `__call__`."""

    def __init__(
        self, metas: dict[str, CheckpointMeta], image_size: int, cfg: ResolvedServing, parallel_calls: int = 1
    ) -> None:
        self.metas = metas
        self.image_size = image_size
        self.cfg = cfg
        self.metrics = ServiceMetrics()
        self.classes = {eid: np.asarray(meta.classes, dtype=np.int64) for eid, meta in metas.items()}
        self.energy_meter: EnergyMeter | None = None  # read at every model call's start and end where set
        self.admission = Admission(cfg, image_size, parallel_calls)  # calls that drain one expert side by side

    @property
    def ready(self) -> bool:
        return bool(self.metas)

    def describe(self) -> list[ExpertInfo]:
        return [
            ExpertInfo(
                id=eid,
                classes=[int(c) for c in meta.classes[:-1]],
                other_output=True,
                preset=meta.preset,
                schedule=meta.schedule,
                sha256=meta.sha256,
            )
            for eid, meta in self.metas.items()
        ]

    def reply(self, expert_id: str, result: BatchResult) -> PredictReply:
        """Record the call's metrics (per-batch ones once per batch) and map logits to global labels."""
        m = self.metrics
        if result.first_in_batch:
            self.admission.observe(expert_id, result.batch_size, result.compute_s)
            m.batch_size.labels(expert_id).observe(result.batch_size)
            m.compute.labels(expert_id).observe(result.compute_s)
            if result.batch_energy_j is not None:
                m.energy.labels(expert_id).inc(max(0.0, result.batch_energy_j))
        m.queue.labels(expert_id).observe(result.queue_s)
        m.images.labels(expert_id).inc(len(result.rows))
        answer = reply_from_logits(result.rows, self.classes[expert_id])
        metered = result.energy_j is not None
        timing = Timing(
            queue_ms=result.queue_s * 1e3,
            compute_ms=result.compute_s * 1e3,
            batch_size=result.batch_size,
            energy_j=result.energy_j,  # this request's share: its images / the batch's
            batch_energy_j=result.batch_energy_j if metered else None,
            energy_meter=result.energy_meter if metered else None,
        )
        return PredictReply(
            expert=expert_id,
            labels=answer.labels.tolist(),
            other=(answer.labels == OTHER).tolist(),
            confidence=np.round(answer.confidence.astype(np.float64), 6).tolist(),
            probs=np.round(answer.probs.astype(np.float64), 6).tolist() if answer.probs is not None else None,
            timing=timing,
        )

    def warm_up(self) -> None:
        """Run each expert on one image and on a full batch before serving, the second time timed into the
        admission's cost fit (the first pays lazy initialisation): from the first request on, the wait estimate
        knows what a full batch costs, and does not refuse the queue that would make one. An auto queue-delay
        target counted in full batches takes their median time here (`ResolvedServing.with_batch_time`)."""
        full = self.cfg.max_batch_size
        times: dict[tuple[str, int], float] = {}
        for eid in self.classes:
            for n in (1, full):
                images = np.zeros((n, self.image_size, self.image_size, 3), dtype=np.uint8)
                self.compute_s(eid, images)
                times[eid, n] = min(self.compute_s(eid, images) for _ in range(2))  # the quieter of two
        if times:
            cfg = self.cfg.with_batch_time(statistics.median(t for (_, n), t in times.items() if n == full))
            if cfg is not self.cfg:  # nothing admitted yet: the admission starts again under the new target
                self.cfg = cfg
                self.admission = Admission(cfg, self.image_size, self.admission.parallel_calls)
        for (eid, n), seconds in times.items():
            self.admission.calibrate(eid, n, seconds)

    def compute_s(self, expert_id: str, images: np.ndarray) -> float:
        """Seconds of one model call on `images`, outside the batching (for `warm_up`)."""
        raise NotImplementedError

    async def __call__(self, expert_id: str, images: np.ndarray, deadline: float | None = None) -> PredictReply:
        raise NotImplementedError


def compute_threads(cfg: ResolvedServing) -> int:
    """torch threads per model call (0: torch's default): `torch_threads`, or with several model workers
    the cores this process may use shared among them, so that the calls never oversubscribe the cores."""
    if cfg.torch_threads or cfg.model_workers == 1:
        return cfg.torch_threads
    return max(1, len(os.sched_getaffinity(0)) // cfg.model_workers)


class ExpertService(ServiceBase):
    """All experts of one system in this process, with dynamic batching per expert."""

    def __init__(
        self,
        backend: LocalExpertBackend,
        partition: Partition,
        image_size: int,
        cfg: ResolvedServing,
        onnx: OnnxExperts | None = None,
    ) -> None:
        metas = {eid: meta for eid, (_, meta) in backend.experts.items()}
        super().__init__(metas, image_size, cfg, parallel_calls=cfg.model_workers)
        self.backend = backend
        self.onnx = onnx  # `serving.model_runtime: onnx`: the model calls go to ONNX Runtime instead of torch
        self.partition = partition
        self.max_batch_size = cfg.max_batch_size
        self.max_wait_ms = cfg.max_wait_ms
        self.max_queue_images = self.admission.max_images  # the batcher's bound: admission's memory cap
        self.model_workers = cfg.model_workers

    @classmethod
    def from_system(
        cls,
        root: str | Path | SystemDir,
        schedule: str | None = None,
        device: str | None = None,
        serving: dict[str, Any] | None = None,
    ) -> ExpertService:
        """The system's served expert set (default `serving.schedule`) on `device` (default: the config's).

        `serving`: settings for this process only (a command line's), validated like config.yaml's, which
        stays unchanged; a bad value is a ConfigError naming it, before any model is loaded.
        """
        system = SystemDir.of(root)
        cfg = system.config().with_serving(serving or {})
        device = str(resolve_device(device or cfg.device))  # "auto": CUDA when present
        cores = len(os.sched_getaffinity(0))  # the cores this process may use (a taskset, a container's share)
        honoured = bfloat16_honoured(cfg.serving.cpu_bfloat16, torch.device(device))  # warns where not native
        sc = cfg.serving.resolve(torch.device(device).type, "plain", cores, honoured)
        threads = compute_threads(sc)
        if threads:
            torch.set_num_threads(threads)  # every model thread takes it up at its first call
        part = system.partition()
        backend = LocalExpertBackend.of_system(system, schedule, device)
        onnx = None
        if sc.model_runtime == "onnx":
            if backend.device.type != "cpu":
                raise ConfigError(
                    f"serving.model_runtime 'onnx' runs the experts on the CPU, not on {backend.device}; "
                    "use model_runtime: torch (or auto) there"
                )
            served = schedule or cfg.serving.schedule
            # ONNX Runtime's own default counts the machine's cores, not the ones this process may use: pinned
            # to one core of two, its threads contended for that core (docs/serving-log.md, pinned)
            onnx = OnnxExperts.of_backend(backend, system, served, input_size(cfg.data), threads or cores)
        service = cls(backend, part, input_size(cfg.data), sc, onnx)
        service.energy_meter = meter_for(str(backend.device))  # NVML on a GPU, RAPL on a CPU, where readable
        service.warm_up()
        return service

    def compute_s(self, expert_id: str, images: np.ndarray) -> float:
        start = time.perf_counter()
        (self.onnx or self.backend).logits(expert_id, images)
        return time.perf_counter() - start

    @dynamic_batch()
    def run(self, expert_id: str, images: np.ndarray) -> np.ndarray:
        return (self.onnx or self.backend).logits(expert_id, images)

    async def __call__(self, expert_id: str, images: np.ndarray, deadline: float | None = None) -> PredictReply:
        return self.reply(expert_id, await self.run(expert_id, images, deadline))


_PREFIX, _SUFFIX = PREDICT_PATH.split("{expert_id}")


class AdmissionMiddleware:
    """Admits or refuses every predict request from its headers alone, before routing and before its body.

    Refusing is the hot path under overload: done here in plain ASGI, a refused
    request costs a header scan and one small JSON reply, not FastAPI's request
    machinery. An admitted request carries its `Ticket` (in `scope["state"]`) to
    the route and gives it back when the response is done, however it ends.
    """

    def __init__(self, app: ASGIApp, service: ServiceBase, token: str | None) -> None:
        self.app = app
        self.service = service
        self.expected_auth = _bearer(token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "POST" or not path.startswith(_PREFIX):
            await self.app(scope, receive, send)
            return
        expert_id = path[len(_PREFIX) : -len(_SUFFIX)] if path.endswith(_SUFFIX) else None
        if not expert_id or "/" in expert_id:
            await self.app(scope, receive, send)  # not a predict path: the router answers (404/405)
            return
        start = time.perf_counter()
        label = expert_id if expert_id in self.service.classes else "unknown"
        try:
            ticket, budget_s = self.admit(expert_id, dict(scope["headers"]))
        except Refused as exc:
            self.service.metrics.refused(label, exc.status, exc.kind)
            if exc.status == 429:
                self.service.metrics.shed.labels(label, "queue_full").inc()
            await _send_error(send, exc.status, str(exc), exc.retry_after_s)
            return
        scope.setdefault("state", {})["admission"] = (ticket, start, budget_s)
        try:
            await self.app(scope, receive, send)
        finally:
            self.service.admission.release(ticket)

    def admit(self, expert_id: str, headers: dict[bytes, bytes]) -> tuple[Ticket, float | None]:
        """The ticket and the caller's budget in seconds, or `Refused` naming the problem (4xx)."""
        service, limits = self.service, self.service.cfg
        if not _authorised(headers.get(b"authorization", b""), self.expected_auth):
            raise Refused(401, "auth", "missing or wrong bearer token")
        if expert_id not in service.classes:
            raise Refused(404, "unknown_expert", f"unknown expert {expert_id!r}; known: {', '.join(service.classes)}")
        ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if ctype != MEDIA_TYPE:
            raise Refused(415, "content_type", f"content type {ctype or '(none)'!r} not accepted; send {MEDIA_TYPE}")
        declared = headers.get(b"content-length", b"").decode("latin-1")
        length = int(declared) if declared.isdigit() else None
        if length is not None and length > limits.max_body_bytes:
            raise Refused(413, "too_large", f"body of {length} bytes exceeds the limit of {limits.max_body_bytes}")
        budget = headers.get(BUDGET_HEADER.encode())
        budget_s = None
        if budget is not None:
            try:
                budget_s = max(0.0, float(budget)) / 1e3
            except ValueError:
                text = budget[:40].decode("latin-1")
                raise Refused(400, "bad_header", f"{BUDGET_HEADER} must be milliseconds, got {text!r}") from None
        return service.admission.admit(expert_id, service.admission.images_declared(length), budget_s), budget_s


def _error_reply(status: int, message: str, retry_after_s: float | None) -> tuple[ErrorReply, str | None]:
    """An error's JSON body and its Retry-After header: a drain estimate goes in both, to the millisecond in
    the body and in whole seconds in the header (None without one)."""
    if retry_after_s is None:
        return ErrorReply(error=message, status=status), None
    retry_ms = round(retry_after_s * 1e3, 1)
    return ErrorReply(error=message, status=status, retry_after_ms=retry_ms), retry_after_header(retry_ms / 1e3)


async def _send_error(send: Send, status: int, message: str, retry_after_s: float | None = None) -> None:
    """A JSON error straight onto the ASGI channel (the same body and headers as `_error`)."""
    reply, retry_after = _error_reply(status, message, retry_after_s)
    body = reply.model_dump_json().encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", retry_after.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _json(message: ErrorReply | Handshake | PredictReply | Readiness, status: int = 200) -> Response:
    return Response(message.model_dump_json(), status_code=status, media_type="application/json")


def _error(status: int, message: str, retry_after_s: float | None = None) -> Response:
    """A JSON error (with a drain estimate: `_error_reply`)."""
    reply, retry_after = _error_reply(status, message, retry_after_s)
    response = _json(reply, status)
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after
    return response


def _settings(sc: ResolvedServing) -> ServerSettings:
    """The handshake's account of the settings this server runs under."""
    return ServerSettings(
        runtime=sc.model_runtime,
        max_batch_size=sc.max_batch_size,
        queue_delay_target_ms=sc.queue_delay_target_ms,
        model_workers=sc.model_workers,
        auto=sc.auto,
        full_batch_ms=sc.full_batch_ms,
        summary=sc.describe(),
    )


def create_app(service: ServiceBase, token: str | None = None) -> ASGIApp:
    """The HTTP API: the FastAPI routes behind the admission middleware, which wraps them from outside, so that a
    refused request never enters FastAPI's own middleware stack (error handling, telemetry, body limits): the
    event loop's time fell 15 % under 4x overload (py-spy; docs/serving-log.md)."""
    app = FastAPI(title="askexpert expert server", version=API_VERSION)
    limits = service.cfg
    expected_auth = _bearer(token)

    def reject(label: str, status: int, kind: str, message: str, retry_after_s: float | None = None) -> Response:
        """Count a refused predict request and answer it with a JSON error (and Retry-After, where known)."""
        service.metrics.refused(label, status, kind)
        return _error(status, message, retry_after_s)

    @app.get(HEALTH_PATH)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(READY_PATH)
    async def readyz() -> Response:
        ready = service.ready
        return _json(Readiness(ready=ready, experts=len(service.metas)), 200 if ready else 503)

    @app.get(METRICS_PATH)
    async def metrics() -> Response:
        for eid in service.classes:
            service.metrics.admitted.labels(eid).set(service.admission.admitted.get(eid, 0))
            service.metrics.throughput.labels(eid).set(service.admission.rate(eid) or 0.0)
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get(EXPERTS_PATH)
    async def experts(request: Request) -> Response:
        if not _authorised(request.headers.get("authorization", "").encode(), expected_auth):
            return _error(401, "missing or wrong bearer token")
        meter = service.energy_meter.source if service.energy_meter is not None else None
        return _json(
            Handshake(
                api=API_VERSION,
                image_size=service.image_size,
                energy_meter=meter,
                experts=service.describe(),
                max_request_images=limits.max_batch_size,
                serving=_settings(limits),  # the service warmed up (and set an auto target) before this app
            )
        )

    @app.post(PREDICT_PATH)
    async def predict(expert_id: str, request: Request) -> Response:
        """An admitted request (AdmissionMiddleware checked its headers): read and decode its body, run it, answer."""
        ticket: Ticket
        ticket, start, budget_s = request.scope["state"]["admission"]
        m = service.metrics
        deadline = start + budget_s if budget_s is not None else None

        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limits.max_body_bytes:
                    return reject(
                        expert_id, 413, "too_large", f"body exceeds the limit of {limits.max_body_bytes} bytes"
                    )
        except ClientDisconnect:
            m.disconnects.inc()  # a counted event, not a traceback in the log
            return Response(status_code=499)
        try:
            images = decode_images(bytes(body), service.image_size, limits.max_batch_size)
        except WireError as exc:
            return reject(expert_id, 400, "bad_body", str(exc))
        service.admission.resize(ticket, len(images))
        try:
            reply = await service(expert_id, images, deadline)
        except QueueFull as exc:  # the batcher's own bound: admission normally refuses first
            m.shed.labels(expert_id, "queue_full").inc()
            return reject(expert_id, 429, "overloaded", str(exc), exc.retry_after_s)
        except DeadlineExpired as exc:
            m.shed.labels(expert_id, "deadline").inc()
            return reject(expert_id, 504, "deadline", str(exc))
        except AskExpertError as exc:
            return reject(expert_id, 400, "bad_request", str(exc))
        except Exception as exc:  # noqa: BLE001 - report, count, keep serving
            return reject(expert_id, 500, "internal", f"expert {expert_id} failed: {type(exc).__name__}: {exc}")
        service.admission.answered(ticket)
        m.requests.labels(expert_id, "200").inc()
        server_ms = (time.perf_counter() - start) * 1e3
        return _json(reply.model_copy(update={"timing": reply.timing.model_copy(update={"server_ms": server_ms})}))

    return AdmissionMiddleware(app, service, token)


def serve_http(app: ASGIApp, sock: socket.socket, cfg: ServingConfig, tls: tuple[Path, Path] | None = None) -> None:
    """Serve the HTTP API with uvicorn on `sock` (`serving.listen.listen_socket`) until interrupted: both
    engines' front (`tls`: certificate and key, PEM)."""
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level="warning",
        # no access log: at warning level it never prints, yet each request's line was still formatted
        # (5 % of the event loop's time under 4x overload, py-spy: docs/serving-log.md)
        access_log=False,
        proxy_headers=False,  # nothing reads the client's address: no X-Forwarded-* scan per request
        limit_concurrency=cfg.max_connections,
        ssl_certfile=str(tls[0]) if tls is not None else None,
        ssl_keyfile=str(tls[1]) if tls is not None else None,
    )
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    if not server.started:  # uvicorn.run would exit with its start-up failure code; it logged why
        raise AskExpertError("the HTTP API did not start (uvicorn's message above says why)")
