"""The HTTP contract between the edge and the expert server: paths, headers and every message, once.

```
GET  /healthz                       {"status": "ok"}
GET  /readyz                        Readiness (503 until the experts are loaded)
GET  /metrics                       Prometheus text
GET  /v1/experts                    Handshake: api version, image size, the experts and their weights
POST /v1/experts/{id}/predict       body: image batch (`protocol.wire`); reply: PredictReply
any error                           ErrorReply; a 429 names the drain (retry_after_ms, Retry-After in s)
```
The server builds these models and the edge parses them (pydantic, so a reply
that is not what it claims is refused with the field named). Both import this
module; neither imports the other.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

API_VERSION = "v1"
HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
METRICS_PATH = "/metrics"
EXPERTS_PATH = f"/{API_VERSION}/experts"
PREDICT_PATH = f"{EXPERTS_PATH}/{{expert_id}}/predict"
BUDGET_HEADER = "x-askexpert-budget-ms"  # the caller's remaining time: the server drops queued work past it


def predict_path(expert_id: str) -> str:
    return PREDICT_PATH.format(expert_id=expert_id)


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)  # a newer server may add fields; old edges ignore them


class ExpertInfo(_Message):
    """One served expert: its class subset (its last output is "other") and the SHA-256 of its weights."""

    id: str
    classes: list[int]
    other_output: bool = True
    preset: str = ""
    schedule: str | None = None
    sha256: str = ""


class ServerSettings(_Message):
    """The serving settings the server runs under, as resolved on its own hardware (`auto` names those it chose),
    so that a client or a benchmark reads them from the server rather than from its log."""

    runtime: str
    max_batch_size: int
    queue_delay_target_ms: float
    model_workers: int
    auto: list[str] = []
    full_batch_ms: float | None = None  # the full batch's time the auto target was counted in, where it was
    summary: str = ""  # the same in one line, as the server printed it at start-up


class Handshake(_Message):
    """`GET /v1/experts`: what the edge checks before it offloads anything."""

    api: str
    image_size: int
    energy_meter: str | None = None  # what the server's `energy_j` figures come from, None when unmetered
    experts: list[ExpertInfo]
    # the most images one predict request may hold (the server's serving.max_batch_size), so that the edge sizes
    # its requests by the server's setting rather than by its own copy of it; None: not said (an older server)
    max_request_images: int | None = None
    serving: ServerSettings | None = None  # None: not said (an older server)


class Timing(_Message):
    """What the server measured for one request; `energy_j` is this request's share of its batch's joules."""

    queue_ms: float
    compute_ms: float
    batch_size: int
    server_ms: float | None = None
    energy_j: float | None = None
    batch_energy_j: float | None = None
    energy_meter: str | None = None


class PredictReply(_Message):
    """An expert's answers in global class ids (`OTHER`, -1, where it abstains), one per image, in request order.

    `probs` is its softmax over its outputs ("other" last), for combination rules that use both answers.
    """

    expert: str
    labels: list[int]
    other: list[bool]
    confidence: list[float]
    probs: list[list[float]] | None = None
    timing: Timing


class ErrorReply(_Message):
    """Every refusal and failure: the message names the problem."""

    error: str
    status: int
    # 429: the estimated time for the expert's admitted work to drain, to the millisecond (the Retry-After
    # header carries it in whole seconds, as HTTP allows, which rounds every sub-second drain up to 1 s)
    retry_after_ms: float | None = None

    @property
    def retry_after_s(self) -> float:
        """How long a refused client should wait before it sends again (0 when the server named no drain)."""
        return (self.retry_after_ms or 0.0) / 1e3


class Readiness(_Message):
    ready: bool
    experts: int
