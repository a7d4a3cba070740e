"""Admission control: decide from a request's headers, before its body is read, whether it can be served in time.

A server that sheds load must shed it cheaply, or the refused requests eat the
capacity the accepted ones need. So the decision uses only what the headers
say (the expert, `Content-Length`, the caller's budget) and the queue's state:

* **Wait, not images.** The wait a new request would face is the work already
  admitted for its expert (images admitted and not yet answered, this request
  included) divided by the rate at which that expert answers images while it is
  busy (measured from the answers themselves, so the HTTP layer's and Ray's own
  overheads count; before enough answers, the model calls' batched throughput),
  scaled by the **batching gain** of a deeper queue: a queue of Q images is drained
  in batches of min(Q, max batch), which run more images per second than the
  smaller batches the recent answers came from (a per-batch cost a + b·N fitted to
  the model calls; the gain is never below 1). With several model calls side by
  side (`serving.model_workers`, or Ray's `serving.ray_replicas`) the queue splits
  among them, so each call's batch is the queue's share, not the whole queue.
  Without the gain the estimate, measured at
  light load, refuses the very queue that would make batches efficient. It is shed
  (429) when that wait exceeds `serving.queue_delay_target_ms`, or the
  caller's budget if that is shorter. This is the queue-delay target of CoDel:
  the p99 of accepted requests follows from it instead of being tuned.
* **Images, as a memory cap.** At most `serving.max_queue_images` images are
  admitted per expert whatever the estimate (before the first batch has been
  measured, it is the only bound).
* **Requests in flight.** At most `serving.max_inflight_requests` requests
  are admitted at once, so the event loop never becomes the queue.

A refusal names the estimated time for the expert's admitted work to drain: to the
millisecond in the 429's body (`retry_after_ms`), in whole seconds in `Retry-After`.
Both engines (`serving.server` and `serving.ray_app`) admit through this one
class, in the HTTP layer they share.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from askexpert.config import ResolvedServing
from askexpert.protocol.wire import HEADER_SIZE

# Weight of the newest batch in the model-throughput estimate: a few batches follow a change of load.
_RATE_SMOOTHING = 0.2
# Memory of the answer-rate estimate, in seconds of busy time: long enough to span several batches.
_ANSWER_MEMORY_S = 1.0
# Busy time the answer-rate estimate needs before it is trusted over the model-throughput one.
_ANSWER_MIN_S = 0.05
# Weight kept by older model calls in the mean batch size the recent answers came from: about 20 batches.
_FIT_DECAY = 0.95
# The batching gain is capped: a fit from a narrow range of batch sizes must not promise miracles.
_MAX_GAIN = 4.0


class Refused(Exception):
    """A request not admitted: the status to answer, why, and when to come back."""

    def __init__(self, status: int, kind: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.retry_after_s = retry_after_s


def retry_after_header(seconds: float) -> str:
    """HTTP's Retry-After is whole seconds: the drain time, rounded up, at least 1 (the error body carries it to
    the millisecond)."""
    return str(max(1, math.ceil(seconds)))


@dataclass
class Ticket:
    """One admitted request's share of its expert's queue; released when the request ends, however it ends."""

    expert: str
    images: int
    released: bool = field(default=False)


class Admission:
    """Per-expert admitted work and throughput; `admit` decides, `release` frees, `observe` measures."""

    def __init__(self, cfg: ResolvedServing, image_size: int, parallel_calls: int = 1) -> None:
        if parallel_calls < 1:
            raise ValueError(f"parallel_calls must be at least 1, got {parallel_calls}")
        self.parallel_calls = parallel_calls  # model calls that drain one expert's queue side by side
        self.max_images = max(cfg.max_queue_images, cfg.max_batch_size)
        self.max_batch_size = cfg.max_batch_size
        self.target_s = cfg.queue_delay_target_ms / 1e3
        self.max_inflight = cfg.max_inflight_requests
        self.image_bytes = image_size * image_size * 3
        self.admitted: dict[str, int] = {}  # images admitted and not yet answered, per expert
        self.images_per_s: dict[str, float] = {}  # smoothed batched throughput of the model calls, per expert
        self.inflight = 0
        # answers while busy: decayed sums of images answered and of the seconds they took, per expert
        self._answered: dict[str, tuple[float, float]] = {}
        self._last_answer: dict[str, tuple[float, bool]] = {}  # time of the last answer, work left behind it
        # model calls by batch size, for the fit t(N) = a + b·N: per expert, per size class (N's bit length) the
        # smoothed N and seconds. A class keeps its figures while other sizes run: light load's small batches
        # must not erase what full batches cost, or the estimate refuses the queue that would bring them back
        # (a Ray server stuck at 40 % of its capacity, docs/serving-log.md)
        self._sizes: dict[str, dict[int, tuple[float, float]]] = {}
        self._recent_n: dict[str, tuple[float, float]] = {}  # decayed weight and sum of recent batch sizes
        self._fits: dict[str, tuple[float, float, float] | None] = {}  # the fit of `_sizes`, per expert

    def images_declared(self, content_length: int | None) -> int:
        """Images a body of this length holds (the wire format is fixed-size); unknown length: a full batch."""
        if content_length is None:
            return self.max_batch_size
        return max(1, (content_length - HEADER_SIZE) // self.image_bytes)

    def rate(self, expert: str) -> float | None:
        """Images per second the expert answers while busy; the model calls' throughput until that is known."""
        images, seconds = self._answered.get(expert, (0.0, 0.0))
        if seconds >= _ANSWER_MIN_S and images > 0:
            return images / seconds
        return self.images_per_s.get(expert)

    def batch_cost(self, expert: str) -> tuple[float, float, float] | None:
        """(a, b, mean N): the fitted seconds per model call, a + b·N, and the mean batch it saw; None without
        a spread of batch sizes or with a fit that is not a fixed cost plus a per-image one. Fitted once per
        model call (`observe`), not per admission: under overload every refusal asks for it."""
        return self._fits.get(expert)

    def _fit(self, expert: str) -> tuple[float, float, float] | None:
        """a + b·N through the size classes' points (each counts once), and the recent batches' mean size."""
        points = list(self._sizes.get(expert, {}).values())
        weight, total = self._recent_n.get(expert, (0.0, 0.0))
        if len(points) < 2 or weight <= 0:
            return None
        ns, ts = [n for n, _ in points], [t for _, t in points]
        mean_n, mean_t = sum(ns) / len(ns), sum(ts) / len(ts)
        var_n = sum((n - mean_n) ** 2 for n in ns) / len(ns)
        if var_n < 1.0:  # batches of (nearly) one size: no slope to fit
            return None
        b = sum((n - mean_n) * (t - mean_t) for n, t in points) / len(ns) / var_n
        a = mean_t - b * mean_n
        if a <= 0 or b < 0:
            return None
        return a, b, total / weight

    def batching_gain(self, expert: str, images: int) -> float:
        """How many times faster a queue of `images` drains than the batches recently run (≥ 1): each of the
        side-by-side calls takes its share of the queue, at most a full batch."""
        cost = self.batch_cost(expert)
        if cost is None:
            return 1.0
        a, b, mean_n = cost
        n = min(math.ceil(images / self.parallel_calls), self.max_batch_size)
        if n <= mean_n:
            return 1.0
        gain = (n / (a + b * n)) / (mean_n / (a + b * mean_n))
        return min(_MAX_GAIN, max(1.0, gain))

    def drain_s(self, expert: str, extra_images: int = 0) -> float | None:
        """Seconds for the expert's admitted work (plus `extra_images`) to be answered; None until measured."""
        rate = self.rate(expert)
        if not rate:
            return None
        queued = self.admitted.get(expert, 0) + extra_images
        return queued / (rate * self.batching_gain(expert, queued))

    def admit(self, expert: str, images: int, budget_s: float | None = None) -> Ticket:
        """A ticket for `images` more images, or `Refused` (429) if they cannot be served in time."""
        queued = self.admitted.get(expert, 0)
        if self.inflight >= self.max_inflight:
            raise Refused(
                429,
                "overloaded",
                f"server is overloaded: {self.inflight} requests already in flight",
                self.drain_s(expert) or 1.0,
            )
        if queued + images > self.max_images:
            raise Refused(
                429,
                "overloaded",
                f"expert {expert} is overloaded: {queued} images already queued (bound {self.max_images})",
                self.drain_s(expert) or 1.0,
            )
        wait = self.drain_s(expert, images)
        limit = self.target_s if budget_s is None else min(self.target_s, budget_s)
        if wait is not None and queued and wait > limit:
            whose = "the queue-delay target" if budget_s is None or budget_s >= self.target_s else "the budget"
            raise Refused(
                429,
                "overloaded",
                f"expert {expert} is overloaded: the estimated wait of {wait * 1e3:.0f} ms "
                f"exceeds {whose} of {limit * 1e3:.0f} ms",
                self.drain_s(expert),
            )
        self.admitted[expert] = queued + images
        self.inflight += 1
        return Ticket(expert, images)

    def resize(self, ticket: Ticket, images: int) -> None:
        """The body held `images` images, not the number its length promised: correct the reservation."""
        if not ticket.released:
            self.admitted[ticket.expert] += images - ticket.images
            ticket.images = images

    def release(self, ticket: Ticket) -> None:
        if not ticket.released:
            ticket.released = True
            self.admitted[ticket.expert] -= ticket.images
            self.inflight -= 1

    def answered(self, ticket: Ticket, now: float | None = None) -> None:
        """A request's images were answered (call before `release`): the rate the wait estimate divides by.

        Only the time since the previous answer counts, and only when work was left
        behind that answer: idle time is not service time.
        """
        now = time.perf_counter() if now is None else now
        expert = ticket.expert
        last = self._last_answer.get(expert)
        if last is not None and last[1]:
            dt = max(0.0, now - last[0])
            decay = math.exp(-dt / _ANSWER_MEMORY_S)
            images, seconds = self._answered.get(expert, (0.0, 0.0))
            self._answered[expert] = (images * decay + ticket.images, seconds * decay + dt)
        left = self.admitted.get(expert, 0) - (0 if ticket.released else ticket.images)
        self._last_answer[expert] = (now, left > 0)

    def calibrate(self, expert: str, batch_size: int, compute_s: float) -> None:
        """A model call run before serving (`warm_up`): its cost joins the fit's size classes, not the figures of
        recent batches, which real load sets."""
        if compute_s <= 0 or batch_size <= 0:
            return
        self._sizes.setdefault(expert, {})[batch_size.bit_length()] = (float(batch_size), compute_s)
        self._fits[expert] = self._fit(expert)

    def observe(self, expert: str, batch_size: int, compute_s: float) -> None:
        """One model call's images and seconds: the throughput the wait estimate divides by."""
        if compute_s <= 0 or batch_size <= 0:
            return
        n, t = float(batch_size), compute_s
        sizes = self._sizes.setdefault(expert, {})
        size_class = batch_size.bit_length()
        old_n, old_t = sizes.get(size_class, (n, t))
        sizes[size_class] = (
            (1 - _RATE_SMOOTHING) * old_n + _RATE_SMOOTHING * n,
            (1 - _RATE_SMOOTHING) * old_t + _RATE_SMOOTHING * t,
        )
        weight, total = self._recent_n.get(expert, (0.0, 0.0))
        self._recent_n[expert] = (_FIT_DECAY * weight + 1.0, _FIT_DECAY * total + n)
        self._fits[expert] = self._fit(expert)
        rate = batch_size / compute_s
        old = self.images_per_s.get(expert)
        self.images_per_s[expert] = rate if old is None else (1 - _RATE_SMOOTHING) * old + _RATE_SMOOTHING * rate
