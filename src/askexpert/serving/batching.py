"""Dynamic batching as a decorator: concurrent calls for one key are merged into one model call.

```python
class Service:
    @dynamic_batch(max_batch_size=64, max_wait_ms=5)
    def run(self, key: str, images: np.ndarray) -> np.ndarray: ...   # rows align with images

    async def handle(self, key, images):
        result = await self.run(key, images)   # BatchResult: this caller's rows + timings
```
Requests queue per key (per expert). A batch closes when it holds
`max_batch_size` images or `max_wait_ms` after its first request arrived. The
wrapped function runs off the event loop in an executor of `workers` threads
(default 1: one batch at a time, every key's batches in turn). With more, that
many batches run at once, any key's: each key's queue feeds `workers` collectors,
so one busy expert can use every thread. On a CPU, several one-thread calls serve
more images per second than one call on several threads (`serving.model_workers`).
A batch's `compute_s` is the model call alone, timed in the executor thread: the
wait for a thread (other batches running) is queue time. An instance attribute
`max_batch_size` / `max_wait_ms` / `max_queue_images` / `model_workers` overrides the
decorator's default; an instance attribute `energy_meter` (an
`askexpert.measure.energy.EnergyMeter`) is read at the start and end of every model
call, and each caller gets its share of the batch's joules. The meter counts the
whole device, so while calls overlap its increase is split evenly among them: the
joules of overlapping batches add up to what was metered, never twice over.

Load shedding: a key's queue holds at most `max_queue_images` waiting images; a
call beyond that fails at once with `QueueFull` (the server answers 429), so an
arrival rate above capacity cannot grow latency without limit. A call may carry
a deadline; work whose deadline passed before its batch starts is dropped with
`DeadlineExpired` instead of being computed for a caller who has given up.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from askexpert.measure.energy import EnergyMeter


@dataclass(frozen=True)
class BatchResult:
    rows: np.ndarray
    queue_s: float  # from enqueue to the start of this caller's model call (another key's turn included)
    compute_s: float  # the model call for the whole batch, alone
    batch_size: int  # images in the merged batch
    first_in_batch: bool  # exactly one caller per model call, so per-batch figures are counted once
    batch_energy_j: float | None = None  # metered joules of the whole model call (None: no meter)
    energy_meter: str | None = None  # what metered them (the meter's `source`)

    @property
    def energy_j(self) -> float | None:
        """This caller's share of the batch's metered joules (its images / the batch's)."""
        if self.batch_energy_j is None:
            return None
        return self.batch_energy_j * len(self.rows) / max(1, self.batch_size)


class EnergyShares:
    """Joules per model call from one meter of the whole device: every reading's increase is split evenly
    among the calls running over it (one call at a time: exactly the joules read around it). Both engines'
    model calls are metered through it (`metered`)."""

    def __init__(self, meter: EnergyMeter) -> None:
        self.meter = meter
        self.lock = threading.Lock()
        self.ids = itertools.count()
        self.last = 0.0
        self.running: dict[int, float] = {}

    def _advance(self) -> None:
        now = self.meter.read_j()
        if self.running:
            share = (now - self.last) / len(self.running)
            for call in self.running:
                self.running[call] += share
        self.last = now

    def start(self) -> int:
        with self.lock:
            self._advance()
            call = next(self.ids)
            self.running[call] = 0.0
            return call

    def stop(self, call: int) -> float:
        with self.lock:
            self._advance()
            return self.running.pop(call)


def metered(shares: EnergyShares | None, fn: Callable[..., np.ndarray], *args: Any) -> tuple[np.ndarray, float | None]:
    """`fn(*args)` and its share of the metered joules (None without a meter)."""
    if shares is None:
        return fn(*args), None
    call = shares.start()
    try:
        rows = fn(*args)
    finally:
        joules = shares.stop(call)
    return rows, joules


def timed_metered(
    shares: EnergyShares | None, fn: Callable[..., np.ndarray], *args: Any
) -> tuple[np.ndarray, float | None, float, float]:
    """`metered`, with the call's start and seconds: timed next to the work, in the thread that runs it (what
    waited for that thread is queue time, not compute). Both engines' model calls go through it."""
    start = time.perf_counter()
    rows, joules = metered(shares, fn, *args)
    return rows, joules, start, time.perf_counter() - start


class QueueFull(Exception):
    """The key's queue is at its bound: refuse now rather than queue without limit."""

    def __init__(self, key: str, queued: int, retry_after_s: float) -> None:
        super().__init__(f"expert {key} is overloaded: {queued} images already queued")
        self.retry_after_s = retry_after_s


class DeadlineExpired(Exception):
    """The caller's time budget ran out while its work waited in the queue."""


@dataclass
class _Pending:
    images: np.ndarray
    future: asyncio.Future[BatchResult]
    enqueued: float
    deadline: float | None = None  # perf_counter time after which the caller no longer waits


class DynamicBatcher:
    def __init__(
        self,
        fn: Callable[[str, np.ndarray], np.ndarray],
        max_batch_size: int,
        max_wait_s: float,
        max_queue_images: int | None = None,
        meter: EnergyMeter | None = None,
        workers: int = 1,
    ) -> None:
        if max_batch_size < 1 or max_wait_s < 0 or workers < 1:
            raise ValueError("max_batch_size and model_workers must be ≥ 1 and max_wait_ms ≥ 0")
        if max_queue_images is not None and max_queue_images < max_batch_size:
            raise ValueError("max_queue_images must hold at least one full batch")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_images = max_queue_images
        self.meter = meter
        self.shares = EnergyShares(meter) if meter is not None else None
        self.model_workers = workers
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="askexpert-batch")
        self.queues: dict[str, asyncio.Queue[_Pending]] = {}
        self.workers: dict[str, list[asyncio.Task[None]]] = {}
        self.queued: dict[str, int] = {}  # images waiting per key (not yet in a running batch)
        self.images_per_s: dict[str, float] = {}  # recent model throughput per key, for Retry-After

    async def __call__(self, key: str, images: np.ndarray, deadline: float | None = None) -> BatchResult:
        loop = asyncio.get_running_loop()
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = asyncio.Queue()
            self.queued[key] = 0
            self.workers[key] = [loop.create_task(self._worker(key, queue)) for _ in range(self.model_workers)]
        waiting = self.queued[key]
        if self.max_queue_images is not None and waiting + len(images) > self.max_queue_images:
            rate = self.images_per_s.get(key, 0.0)
            raise QueueFull(key, waiting, max(1.0, waiting / rate) if rate > 0 else 1.0)
        pending = _Pending(images, loop.create_future(), time.perf_counter(), deadline)
        self.queued[key] = waiting + len(images)
        await queue.put(pending)
        return await pending.future

    async def _collect(
        self, queue: asyncio.Queue[_Pending], carry: _Pending | None
    ) -> tuple[list[_Pending], _Pending | None]:
        first = carry if carry is not None else await queue.get()
        items, count = [first], len(first.images)
        deadline = first.enqueued + self.max_wait_s
        while count < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                item = queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(queue.get(), remaining)
            except (asyncio.QueueEmpty, TimeoutError):
                break
            if count + len(item.images) > self.max_batch_size:
                return items, item  # starts the next batch
            items.append(item)
            count += len(item.images)
        return items, None

    async def _worker(self, key: str, queue: asyncio.Queue[_Pending]) -> None:
        carry: _Pending | None = None
        while True:
            items, carry = await self._collect(queue, carry)
            await self._run(key, items)

    async def _run(self, key: str, items: list[_Pending]) -> None:
        """One model call for `items`; every caller gets its rows or the error."""
        self.queued[key] -= sum(len(p.images) for p in items)
        now = time.perf_counter()
        for p in items:
            if p.deadline is not None and now > p.deadline and not p.future.done():
                p.future.set_exception(DeadlineExpired(f"the caller's budget ran out after {now - p.enqueued:.3f} s"))
        items = [p for p in items if not p.future.done()]
        if not items:
            return
        batch = np.concatenate([p.images for p in items]) if len(items) > 1 else items[0].images
        try:
            call = asyncio.get_running_loop().run_in_executor(
                self.executor, timed_metered, self.shares, self.fn, key, batch
            )
            rows, joules, start, compute = await call
        except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
            for p in items:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        if compute > 0:
            self.images_per_s[key] = len(batch) / compute
        offset = 0
        for p in items:
            n = len(p.images)
            if not p.future.done():
                p.future.set_result(
                    BatchResult(
                        rows[offset : offset + n],
                        start - p.enqueued,
                        compute,
                        len(batch),
                        offset == 0,
                        joules,
                        self.meter.source if self.meter is not None else None,
                    )
                )
            offset += n

    def close(self) -> None:
        for tasks in self.workers.values():
            for task in tasks:
                task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)


def dynamic_batch(
    max_batch_size: int = 64, max_wait_ms: float = 5.0, max_queue_images: int | None = None, model_workers: int = 1
) -> Callable[[Callable[[Any, str, np.ndarray], np.ndarray]], Callable[..., Awaitable[BatchResult]]]:
    def decorate(fn: Callable[[Any, str, np.ndarray], np.ndarray]) -> Callable[..., Awaitable[BatchResult]]:
        attr = f"_dynamic_batcher_{fn.__name__}"

        @functools.wraps(fn)
        async def wrapper(self: Any, key: str, images: np.ndarray, deadline: float | None = None) -> BatchResult:
            batcher = getattr(self, attr, None)
            if batcher is None:
                batcher = DynamicBatcher(
                    functools.partial(fn, self),
                    int(getattr(self, "max_batch_size", max_batch_size)),
                    float(getattr(self, "max_wait_ms", max_wait_ms)) / 1000.0,
                    getattr(self, "max_queue_images", max_queue_images),
                    getattr(self, "energy_meter", None),
                    int(getattr(self, "model_workers", model_workers)),
                )
                setattr(self, attr, batcher)
            return await batcher(key, images, deadline)

        return wrapper

    return decorate
