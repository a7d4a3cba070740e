"""The near-edge ExpertServer: every expert of a system directory behind one HTTP API.

```
GET  /healthz                       alive
GET  /readyz                        experts loaded (503 until then)
GET  /metrics                       Prometheus text
GET  /v1/experts                    ids, class subsets, checkpoint SHA-256s, the energy meter read
POST /v1/experts/{id}/predict       body: wire format (askexpert.protocol.wire)
```
`ExpertService` is the unit of serving (a small class with an async
`__call__`); batching is the `dynamic_batch` decorator on its `run` method.
`serving.ray_app` provides the same service on Ray Serve. The
FastAPI app only translates HTTP to and from it, and turns every bad request
into a 4xx JSON error that names the problem.
"""

from __future__ import annotations

import hmac
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.requests import ClientDisconnect

from askexpert.config import ServingConfig
from askexpert.data import input_size
from askexpert.errors import AskExpertError
from askexpert.inference.backend import LocalExpertBackend, reply_from_logits
from askexpert.measure.energy import EnergyMeter, meter_for
from askexpert.models import CheckpointMeta
from askexpert.partition import Partition
from askexpert.protocol import OTHER
from askexpert.protocol.wire import BUDGET_HEADER, MEDIA_TYPE, WireError, decode_images
from askexpert.serving.batching import BatchResult, DeadlineExpired, QueueFull, dynamic_batch
from askexpert.system import SystemDir

API_VERSION = "v1"


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


class ServiceBase:
    """What the HTTP layer needs from a service: expert facts, metrics, and an async `__call__`."""

    def __init__(self, metas: dict[str, CheckpointMeta], image_size: int, cfg: ServingConfig) -> None:
        self.metas = metas
        self.image_size = image_size
        self.cfg = cfg
        self.metrics = ServiceMetrics()
        self.classes = {eid: np.asarray(meta.classes, dtype=np.int64) for eid, meta in metas.items()}
        self.energy_meter: EnergyMeter | None = None  # read around every model call where set

    @property
    def ready(self) -> bool:
        return bool(self.metas)

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "id": eid,
                "classes": [int(c) for c in meta.classes[:-1]],
                "other_output": True,
                "preset": meta.preset,
                "schedule": meta.schedule,
                "sha256": meta.sha256,
            }
            for eid, meta in self.metas.items()
        ]

    def reply(self, expert_id: str, result: BatchResult) -> dict[str, Any]:
        """Record the call's metrics (per-batch ones once per batch) and map logits to global labels."""
        m = self.metrics
        if result.first_in_batch:
            m.batch_size.labels(expert_id).observe(result.batch_size)
            m.compute.labels(expert_id).observe(result.compute_s)
            if result.batch_energy_j is not None:
                m.energy.labels(expert_id).inc(max(0.0, result.batch_energy_j))
        m.queue.labels(expert_id).observe(result.queue_s)
        m.images.labels(expert_id).inc(len(result.rows))
        answer = reply_from_logits(result.rows, self.classes[expert_id])
        timing: dict[str, Any] = {
            "queue_ms": result.queue_s * 1e3,
            "compute_ms": result.compute_s * 1e3,
            "batch_size": result.batch_size,
        }
        if result.energy_j is not None and self.energy_meter is not None:
            timing |= {
                "energy_j": result.energy_j,  # this request's share: its images / the batch's
                "batch_energy_j": result.batch_energy_j,
                "energy_meter": self.energy_meter.source,
            }
        return {
            "expert": expert_id,
            "labels": answer.labels.tolist(),
            "other": (answer.labels == OTHER).tolist(),
            "confidence": [round(float(c), 6) for c in answer.confidence],
            "probs": np.round(answer.probs, 6).tolist() if answer.probs is not None else None,
            "timing": timing,
        }

    async def __call__(self, expert_id: str, images: np.ndarray, deadline: float | None = None) -> dict[str, Any]:
        raise NotImplementedError


class ExpertService(ServiceBase):
    """All experts of one system in this process, with dynamic batching per expert."""

    def __init__(self, backend: LocalExpertBackend, partition: Partition, image_size: int, cfg: ServingConfig) -> None:
        super().__init__({eid: meta for eid, (_, meta) in backend.experts.items()}, image_size, cfg)
        self.backend = backend
        self.partition = partition
        self.max_batch_size = cfg.max_batch_size
        self.max_wait_ms = cfg.max_wait_ms
        self.max_queue_images = max(cfg.max_queue_images, cfg.max_batch_size)

    @classmethod
    def from_system(cls, root: str | Path, schedule: str | None = None, device: str = "cpu") -> ExpertService:
        system = SystemDir.open(root)
        cfg = system.config()
        if cfg.serving.torch_threads:
            torch.set_num_threads(cfg.serving.torch_threads)
        part = Partition.from_json(system.partition_path)
        backend = LocalExpertBackend.from_dir(
            system.root / "experts" / (schedule or cfg.serving.schedule), part, device
        )
        service = cls(backend, part, input_size(cfg.data), cfg.serving)
        service.energy_meter = meter_for(str(backend.device))  # NVML on a GPU, RAPL on a CPU, where readable
        return service

    @dynamic_batch()
    def run(self, expert_id: str, images: np.ndarray) -> np.ndarray:
        return self.backend.logits(expert_id, images)

    async def __call__(self, expert_id: str, images: np.ndarray, deadline: float | None = None) -> dict[str, Any]:
        return self.reply(expert_id, await self.run(expert_id, images, deadline))


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


def create_app(service: ServiceBase, token: str | None = None) -> FastAPI:
    app = FastAPI(title="askexpert expert server", version=API_VERSION)
    limits = service.cfg
    expected_auth = f"Bearer {token}".encode() if token else None

    def authorised(request: Request) -> bool:
        if expected_auth is None:
            return True
        given = request.headers.get("authorization", "").encode()
        return hmac.compare_digest(given, expected_auth)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        ready = service.ready
        return JSONResponse({"ready": ready, "experts": len(service.metas)}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/experts")
    async def experts(request: Request) -> Response:
        if not authorised(request):
            return _error(401, "missing or wrong bearer token")
        meter = service.energy_meter.source if service.energy_meter is not None else None
        return JSONResponse(
            {"api": API_VERSION, "image_size": service.image_size, "energy_meter": meter, "experts": service.describe()}
        )

    @app.post("/v1/experts/{expert_id}/predict")
    async def predict(expert_id: str, request: Request) -> Response:
        start = time.perf_counter()
        m = service.metrics
        label = expert_id if expert_id in service.classes else "unknown"

        def reject(status: int, kind: str, message: str) -> JSONResponse:
            m.errors.labels(label, kind).inc()
            m.requests.labels(label, str(status)).inc()
            return _error(status, message)

        if not authorised(request):
            return reject(401, "auth", "missing or wrong bearer token")
        if expert_id not in service.classes:
            known = ", ".join(service.classes)
            return reject(404, "unknown_expert", f"unknown expert {expert_id!r}; known: {known}")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != MEDIA_TYPE:
            return reject(415, "content_type", f"content type {ctype or '(none)'!r} not accepted; send {MEDIA_TYPE}")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            return reject(413, "too_large", f"body of {declared} bytes exceeds the limit of {limits.max_body_bytes}")
        budget = request.headers.get(BUDGET_HEADER)
        deadline = None
        if budget is not None:
            try:
                deadline = start + max(0.0, float(budget)) / 1e3
            except ValueError:
                return reject(400, "bad_header", f"{BUDGET_HEADER} must be milliseconds, got {budget[:40]!r}")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limits.max_body_bytes:
                    return reject(413, "too_large", f"body exceeds the limit of {limits.max_body_bytes} bytes")
        except ClientDisconnect:
            m.disconnects.inc()  # a counted event, not a traceback in the log
            return Response(status_code=499)
        try:
            images = decode_images(bytes(body), service.image_size, limits.max_batch_size)
        except WireError as exc:
            return reject(400, "bad_body", str(exc))
        try:
            reply = await service(expert_id, images, deadline)
        except QueueFull as exc:
            m.shed.labels(expert_id, "queue_full").inc()
            response = reject(429, "overloaded", str(exc))
            response.headers["Retry-After"] = str(math.ceil(exc.retry_after_s))
            return response
        except DeadlineExpired as exc:
            m.shed.labels(expert_id, "deadline").inc()
            return reject(504, "deadline", str(exc))
        except AskExpertError as exc:
            return reject(400, "bad_request", str(exc))
        except Exception as exc:  # noqa: BLE001 - report, count, keep serving
            return reject(500, "internal", f"expert {expert_id} failed: {type(exc).__name__}: {exc}")
        m.requests.labels(expert_id, "200").inc()
        reply["timing"]["server_ms"] = (time.perf_counter() - start) * 1e3
        return JSONResponse(reply)

    return app
