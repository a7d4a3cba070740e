"""The edge's HTTP link to the near-edge ExpertServer, as an ExpertBackend.

Timeout per request, bounded retries with exponential back-off, and a circuit
breaker: after `breaker_failures` consecutive failures the backend stops
calling for `breaker_cooldown_s` and answers at once with BackendError, so the
edge falls back to the generalist instead of waiting on a dead server.
"""

from __future__ import annotations

import ssl
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from pydantic import ValidationError

from askexpert.config import AUTO_CPU_SMALL_BATCH, ServingConfig
from askexpert.errors import ConfigError
from askexpert.partition import Partition
from askexpert.protocol.backend import BackendError, ExpertReply, check_images
from askexpert.protocol.http import (
    API_VERSION,
    BUDGET_HEADER,
    EXPERTS_PATH,
    ErrorReply,
    Handshake,
    PredictReply,
    predict_path,
)
from askexpert.protocol.wire import MEDIA_TYPE, encode_images


@dataclass
class CircuitBreaker:
    failures_to_open: int
    cooldown_s: float
    failures: int = 0
    opened_at: float | None = None

    def allow(self) -> bool:
        if self.opened_at is None:
            return True
        if time.monotonic() - self.opened_at >= self.cooldown_s:
            return True  # half-open: let one call probe the server
        return False

    def record(self, ok: bool) -> None:
        if ok:
            self.failures, self.opened_at = 0, None
            return
        self.failures += 1
        if self.failures >= self.failures_to_open:
            self.opened_at = time.monotonic()


def _loopback(url: str) -> bool:
    host = httpx.URL(url).host
    return host in ("localhost", "::1") or host.startswith("127.")


class HandshakeError(BackendError):
    """The server's experts are not the ones this edge was built with."""

    reason = "mismatch"


class ServerUnreachable(BackendError):
    """The server did not answer the handshake at all (down, wrong address, network gone)."""

    reason = "edge-only"


class HttpExpertBackend:
    """`ca_file`: the certificate authority an https server's certificate must chain to (default: the system's)."""

    def __init__(
        self, url: str, cfg: ServingConfig, token: str | None = None, ca_file: str | Path | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.cfg = cfg
        headers = {"content-type": MEDIA_TYPE}
        if token:
            headers["authorization"] = f"Bearer {token}"
        verify: ssl.SSLContext | bool = True
        if ca_file is not None:
            if not Path(ca_file).is_file():
                raise ConfigError(f"{ca_file}: CA file not found")
            if not self.url.startswith("https://"):
                raise ConfigError(f"a CA file was given but {self.url} is not https://")
            try:
                verify = ssl.create_default_context(cafile=str(ca_file))
            except ssl.SSLError as exc:
                raise ConfigError(f"{ca_file}: not a PEM certificate file ({exc.reason})") from None
        if token and self.url.startswith("http://") and not _loopback(self.url):
            warnings.warn(
                f"the bearer token crosses {self.url} in clear: serve with --tls-cert/--tls-key and use https://",
                stacklevel=2,
            )
        self.client = httpx.Client(timeout=cfg.timeout_s, headers=headers, verify=verify)
        # images per request: the server's limit once the handshake says it; before, this edge's setting, or with
        # 'auto' the least a server picks by itself (its hardware is not known yet)
        self.request_images = AUTO_CPU_SMALL_BATCH if cfg.max_batch_size == "auto" else cfg.max_batch_size
        self.breaker = CircuitBreaker(cfg.breaker_failures, cfg.breaker_cooldown_s)

    def close(self) -> None:
        self.client.close()

    def handshake(self, partition: Partition, image_size: int, sha256: dict[str, str] | None = None) -> Handshake:
        """Check that the server holds this edge's experts: ids, class subsets, image size, and weights.

        Raises `HandshakeError` listing every difference, so a server with retrained or
        repartitioned experts can never answer silently for the wrong classes.
        `sha256` (expert id → checkpoint hash, when the edge has the experts' metadata)
        also pins the exact weights.
        """
        try:
            response = self.client.get(f"{self.url}{EXPERTS_PATH}")
        except httpx.HTTPError as exc:
            detail = f": {str(exc)[:160]}" if str(exc) else ""
            raise ServerUnreachable(f"handshake: {self.url} unreachable: {type(exc).__name__}{detail}") from None
        if response.status_code != 200:
            raise BackendError(
                f"handshake: {self.url}{EXPERTS_PATH} answered {response.status_code}: {_message(response)}"
            )
        try:
            doc = Handshake.model_validate_json(response.content)
        except ValidationError as exc:
            raise HandshakeError(f"handshake: malformed {EXPERTS_PATH} reply: {_first_problem(exc)}") from None
        if doc.api != API_VERSION:
            raise HandshakeError(f"handshake: {self.url} speaks API {doc.api!r}, this edge {API_VERSION!r}")
        served = {e.id: e for e in doc.experts}
        size = doc.image_size
        problems = []
        if size != image_size:
            problems.append(f"server expects {size}×{size} images, this edge sends {image_size}×{image_size}")
        missing = [e for e in partition.expert_ids if e not in served]
        extra = [e for e in served if e not in partition.expert_ids]
        if missing or extra:
            problems.append(f"experts differ: the server lacks {missing}, has extra {extra}")
        for eid, subset in zip(partition.expert_ids, partition.subsets, strict=True):
            if eid in served and served[eid].classes != list(subset):
                problems.append(
                    f"expert {eid} serves classes {served[eid].classes}, partition.json says {list(subset)}"
                )
            if sha256 and eid in served and eid in sha256 and served[eid].sha256 != sha256[eid]:
                problems.append(
                    f"expert {eid} weights differ (server {served[eid].sha256[:12]}, edge {sha256[eid][:12]})"
                )
        if problems:
            raise HandshakeError(f"handshake with {self.url} failed: " + "; ".join(problems))
        if doc.max_request_images:
            self.request_images = doc.max_request_images
        return doc

    def predict(self, expert_id: str, images: np.ndarray) -> ExpertReply:
        """Ask `expert_id`, in requests of at most the server's limit of images (its handshake's
        `max_request_images`; before a handshake, this edge's `serving.max_batch_size`, 8 where that is 'auto')."""
        check_images(images)
        step = self.request_images
        if len(images) <= step:
            return self._predict(expert_id, images)
        parts = [self._predict(expert_id, images[i : i + step]) for i in range(0, len(images), step)]
        info = {k: float(sum(p.info.get(k, 0.0) for p in parts)) for k in parts[0].info}  # sequential: times add
        probs = None if any(p.probs is None for p in parts) else np.concatenate([p.probs for p in parts])
        return ExpertReply(
            np.concatenate([p.labels for p in parts]), np.concatenate([p.confidence for p in parts]), info, probs
        )

    def _predict(self, expert_id: str, images: np.ndarray) -> ExpertReply:
        if not self.breaker.allow():
            raise BackendError("circuit open: server failed repeatedly, not retrying yet")
        t0 = time.perf_counter()
        body = encode_images(images)
        encode_ms = (time.perf_counter() - t0) * 1e3
        last = "no attempt"
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            start = time.perf_counter()
            budget = {BUDGET_HEADER: f"{self.cfg.timeout_s * 1e3:.0f}"}  # past it, the server drops the work
            try:
                response = self.client.post(f"{self.url}{predict_path(expert_id)}", content=body, headers=budget)
            except httpx.TimeoutException:
                last = f"timeout after {self.cfg.timeout_s:g} s"
                continue
            except httpx.TransportError as exc:
                last = f"unreachable: {type(exc).__name__}"
                continue
            rtt_ms = (time.perf_counter() - start) * 1e3
            if response.status_code == 429:  # shed: falling back now is what relieves the server
                self.breaker.record(True)
                retry = response.headers.get("retry-after", "?")
                raise BackendError(f"server overloaded (429, retry after {retry} s): {_message(response)}")
            if response.status_code == 504:  # our own budget ran out in its queue: a retry would too
                self.breaker.record(True)
                raise BackendError(f"server dropped the request at its deadline (504): {_message(response)}")
            if response.status_code >= 500:
                last = f"server error {response.status_code}"
                continue
            if response.status_code != 200:
                self.breaker.record(True)  # the server is up; the request itself was refused
                raise BackendError(f"server refused ({response.status_code}): {_message(response)}")
            self.breaker.record(True)
            return _reply(response, len(images), len(body), encode_ms, rtt_ms, attempt)
        self.breaker.record(False)
        raise BackendError(f"{last} ({self.cfg.retries + 1} attempts)")


def _first_problem(exc: ValidationError) -> str:
    """The first field a message got wrong, in one line: `labels.3: Input should be a valid integer`."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(the body)"
    return f"{where}: {first['msg']}" + (f" ({exc.error_count() - 1} more)" if exc.error_count() > 1 else "")


def _message(response: httpx.Response) -> str:
    try:
        return ErrorReply.model_validate_json(response.content).error
    except ValidationError:
        return response.text[:200]


def _reply(response: httpx.Response, n: int, sent: int, encode_ms: float, rtt_ms: float, retries: int) -> ExpertReply:
    try:
        doc = PredictReply.model_validate_json(response.content)
    except ValidationError as exc:
        raise BackendError(f"malformed server reply: {_first_problem(exc)}") from None
    labels = np.asarray(doc.labels, dtype=np.int64)
    confidence = np.asarray(doc.confidence, dtype=np.float32)
    try:
        probs = None if doc.probs is None else np.asarray(doc.probs, dtype=np.float32)
    except ValueError:  # rows of different lengths
        raise BackendError("malformed server reply: probs rows differ in length") from None
    if labels.shape != (n,) or confidence.shape != (n,):
        raise BackendError(
            f"malformed server reply: labels {labels.shape}, confidence {confidence.shape} for {n} images"
        )
    if probs is not None and (probs.ndim != 2 or probs.shape[0] != n):
        raise BackendError(f"malformed server reply: probs of shape {probs.shape} for {n} images")
    timing = doc.timing
    info = {
        "bytes_sent": float(sent),
        "bytes_received": float(len(response.content)),
        "encode_ms": encode_ms,
        "rtt_ms": rtt_ms,
        "queue_ms": timing.queue_ms,
        "compute_ms": timing.compute_ms,
        "batch_size": float(timing.batch_size),  # images in the server's merged batch
        "retries": float(retries),
    }
    if timing.energy_j is not None:  # the server metered its model call: this request's share of the batch's joules
        info["server_energy_j"] = timing.energy_j
    return ExpertReply(labels, confidence, info, probs)
