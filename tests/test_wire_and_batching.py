import asyncio
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from askexpert.protocol.wire import HEADER_SIZE, MAGIC, WireError, decode_images, encode_images
from askexpert.serving.batching import dynamic_batch
from conftest import StepMeter


def test_round_trip_and_size() -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    body = encode_images(images)
    assert len(body) == HEADER_SIZE + 5 * 3072  # ~3 KB per 32×32 image
    assert np.array_equal(decode_images(body, 32), images)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "shorter than the 24-byte header"),
        (b"XXXX" + bytes(20), "bad magic"),
        (struct.pack("<4sB3xIIII", MAGIC, 2, 1, 32, 32, 3) + bytes(3072), "dtype code 2"),
        (struct.pack("<4sB3xIIII", MAGIC, 1, 0, 32, 32, 3), "empty batch"),
        (struct.pack("<4sB3xIIII", MAGIC, 1, 1, 32, 32, 1) + bytes(1024), "1 channels"),
        (struct.pack("<4sB3xIIII", MAGIC, 1, 1, 16, 16, 3) + bytes(768), "16×16"),
        (struct.pack("<4sB3xIIII", MAGIC, 1, 2, 32, 32, 3) + bytes(3072), "needs exactly"),
        (struct.pack("<4sB3xIIII", MAGIC, 1, 999, 32, 32, 3), "exceeds the limit of 64"),
    ],
)
def test_decoder_names_the_problem(body: bytes, fragment: str) -> None:
    with pytest.raises(WireError, match=fragment):
        decode_images(body, 32, max_batch=64)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decoder_fuzz_random_bytes(body: bytes) -> None:
    try:
        out = decode_images(body, None, 64)
    except WireError:
        return
    assert out.dtype == np.uint8 and out.ndim == 4


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 3),
    st.integers(0, 70),
    st.integers(0, 40),
    st.integers(0, 40),
    st.integers(0, 5),
    st.integers(-50, 50),
)
def test_decoder_fuzz_headers(dtype: int, n: int, h: int, w: int, c: int, slack: int) -> None:
    payload = max(0, n * h * w * c + slack)
    body = struct.pack("<4sB3xIIII", MAGIC, dtype, n, h, w, c) + bytes(min(payload, 400_000))
    try:
        out = decode_images(body, None, 64)
    except WireError:
        return
    assert out.shape == (n, h, w, 3) and dtype == 1 and slack == 0


class _Doubler:
    max_wait_ms = 50.0

    def __init__(self) -> None:
        self.calls: list[int] = []

    @dynamic_batch(max_batch_size=16)
    def run(self, key: str, images: np.ndarray) -> np.ndarray:
        self.calls.append(len(images))
        return images.astype(np.int64) * 2


def test_dynamic_batching_merges_callers_and_returns_each_its_rows() -> None:
    service = _Doubler()

    async def go() -> list:
        calls = [service.run("e0", np.full((2, 1, 1, 3), i, dtype=np.uint8)) for i in range(12)]
        return await asyncio.gather(*calls)

    results = asyncio.run(go())
    for i, res in enumerate(results):
        assert (res.rows == 2 * i).all() and res.rows.shape == (2, 1, 1, 3)
    assert sum(service.calls) == 24 and max(service.calls) <= 16
    assert len(service.calls) <= 3  # merged, not 12 separate model calls
    assert max(r.batch_size for r in results) > 2
    assert sum(r.first_in_batch for r in results) == len(service.calls)  # one per model call


def test_a_metered_batch_gives_each_caller_its_share_of_the_joules() -> None:
    service = _Doubler()
    service.energy_meter = StepMeter(2.0)  # type: ignore[attr-defined]

    async def go() -> list:
        sizes = [1, 3, 2, 2, 4, 1, 3]
        return await asyncio.gather(*(service.run("e0", np.zeros((n, 1, 1, 3), dtype=np.uint8)) for n in sizes))

    results = asyncio.run(go())
    assert all(r.batch_energy_j == pytest.approx(2.0) for r in results)
    for r in results:
        assert r.energy_j == pytest.approx(2.0 * len(r.rows) / r.batch_size)
    assert sum(r.energy_j for r in results) == pytest.approx(2.0 * len(service.calls))  # nothing lost or doubled
    unmetered = asyncio.run(_Doubler().run("e0", np.zeros((1, 1, 1, 3), np.uint8)))
    assert unmetered.batch_energy_j is None and unmetered.energy_j is None


def test_reserved_header_bytes_must_be_zero() -> None:
    body = bytearray(encode_images(np.zeros((1, 32, 32, 3), np.uint8)))
    body[6] = 7
    with pytest.raises(WireError, match="reserved header bytes 5-7 are 000700, must be zero"):
        decode_images(bytes(body), 32)


class _Failing:
    max_batch_size = 16
    max_wait_ms = 20.0

    def __init__(self) -> None:
        self.calls = 0

    @dynamic_batch()
    def run(self, key: str, images: np.ndarray) -> np.ndarray:
        self.calls += 1
        raise RuntimeError("model exploded")


def _concurrent(service: object, callers: int, images: int = 2) -> list:
    """`callers` simultaneous calls of `service.run` on expert e0; results or exceptions, in order."""

    async def go() -> list:
        calls = [service.run("e0", np.zeros((images, 1, 1, 3), np.uint8)) for _ in range(callers)]  # type: ignore[attr-defined]
        return await asyncio.gather(*calls, return_exceptions=True)

    return asyncio.run(go())


def test_one_failing_model_call_answers_every_caller_of_its_batch() -> None:
    service = _Failing()
    results = _concurrent(service, 6)
    assert service.calls == 1  # six callers, one merged batch, one failing call
    assert all(isinstance(r, RuntimeError) and "model exploded" in str(r) for r in results)


class _Slow:
    max_batch_size = 4
    max_wait_ms = 0.0
    max_queue_images = 8

    @dynamic_batch()
    def run(self, key: str, images: np.ndarray) -> np.ndarray:
        import time

        time.sleep(0.05)
        return images


def test_a_full_queue_refuses_at_once_and_expired_work_is_dropped() -> None:
    import time

    from askexpert.serving.batching import DeadlineExpired, QueueFull

    service = _Slow()
    results = _concurrent(service, 12)
    refused = [r for r in results if isinstance(r, QueueFull)]
    served = [r for r in results if not isinstance(r, Exception)]
    assert refused and served and len(refused) + len(served) == 12
    assert all(r.retry_after_s >= 1 and "overloaded" in str(r) for r in refused)
    assert sum(len(r.rows) for r in served) <= 8 + 4  # the bound plus the batch already running

    async def late() -> list:
        past = time.perf_counter() - 1.0
        calls = [service.run("e1", np.zeros((4, 1, 1, 3), np.uint8))]  # occupies the model
        calls += [service.run("e1", np.zeros((1, 1, 1, 3), np.uint8), deadline=past)]
        return await asyncio.gather(*calls, return_exceptions=True)

    first, expired = asyncio.run(late())
    assert not isinstance(first, Exception) and isinstance(expired, DeadlineExpired)


class _SharedThread:
    """Two experts on the one model thread: "slow" takes 0.2 s a call, "fast" 0.01 s."""

    max_batch_size = 16
    max_wait_ms = 0.0

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    @dynamic_batch()
    def run(self, key: str, images: np.ndarray) -> np.ndarray:
        import time

        self.calls.append((key, len(images)))
        time.sleep(0.2 if key == "slow" else 0.01)
        return images


def test_the_wait_for_another_experts_batch_is_queue_time_not_compute() -> None:
    service = _SharedThread()

    async def go() -> list:
        slow = asyncio.ensure_future(service.run("slow", np.zeros((1, 1, 1, 3), np.uint8)))
        await asyncio.sleep(0.03)  # the slow call holds the thread
        fast = asyncio.ensure_future(service.run("fast", np.full((2, 1, 1, 3), 7, np.uint8)))
        return await asyncio.gather(slow, fast)

    slow, fast = asyncio.run(go())
    assert service.calls == [("slow", 1), ("fast", 2)]  # one at a time, in turn
    assert (fast.rows == 7).all()
    assert slow.compute_s >= 0.2 and slow.queue_s < 0.05
    assert fast.compute_s < 0.1  # its own call, ~0.01 s: not the ~0.17 s it spent behind the slow one
    assert fast.queue_s > 0.1  # that wait is queue time


class _Rendezvous:
    """Each model call waits (up to 2 s) for a second call to be running at the same time."""

    max_batch_size = 4
    max_wait_ms = 0.0

    def __init__(self, workers: int, hold_s: float = 0.0) -> None:
        import threading

        self.model_workers = workers
        self.hold_s = hold_s  # how long each call computes once both are running
        self.barrier = threading.Barrier(2, timeout=2.0)
        self.met: list[bool] = []

    @dynamic_batch()
    def run(self, key: str, images: np.ndarray) -> np.ndarray:
        import threading
        import time

        try:
            self.barrier.wait()
            self.met.append(True)
        except threading.BrokenBarrierError:
            self.met.append(False)
        time.sleep(self.hold_s)
        return images + 1


@pytest.mark.parametrize("keys", [("e0", "e1"), ("e0", "e0")], ids=["two experts", "one expert"])
def test_model_workers_run_batches_side_by_side(keys: tuple[str, str]) -> None:
    async def go(service: _Rendezvous) -> list:
        # 4 images each: two full batches, whether of one expert or of two
        return await asyncio.gather(*(service.run(k, np.zeros((4, 1, 1, 3), np.uint8)) for k in keys))

    two = _Rendezvous(workers=2)
    results = asyncio.run(go(two))
    assert two.met == [True, True]  # both calls ran at once
    assert all((r.rows == 1).all() and r.batch_size == 4 for r in results)
    one = _Rendezvous(workers=1)
    asyncio.run(go(one))
    assert one.met == [False, False]  # one thread: the first call waited alone, then the second


class _WallMeter:
    """One joule per second of wall time: what a meter of the whole device reads while calls overlap."""

    source = "wall"

    def __init__(self) -> None:
        import time

        self.t0 = time.perf_counter()

    def read_j(self) -> float:
        import time

        return time.perf_counter() - self.t0


def test_overlapping_calls_split_the_metered_joules_instead_of_counting_them_twice() -> None:
    service = _Rendezvous(workers=2, hold_s=0.2)  # 0.2 s of overlap: metered once, not once per call
    meter = _WallMeter()
    service.energy_meter = meter  # type: ignore[attr-defined]

    async def go() -> list:
        return await asyncio.gather(*(service.run(k, np.zeros((4, 1, 1, 3), np.uint8)) for k in ("e0", "e1")))

    before = meter.read_j()
    results = asyncio.run(go())
    metered = meter.read_j() - before
    assert service.met == [True, True]
    joules = [r.batch_energy_j for r in results]
    assert all(j is not None and j > 0 for j in joules)
    assert sum(joules) <= metered  # each reading's increase went to the calls running, shared, not copied
    assert sum(joules) >= 0.2  # and none of the overlap was lost
    assert all(r.energy_meter == "wall" for r in results)
