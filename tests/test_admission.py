"""Admission control (serving/admission.py): shed by the estimated wait, cap by images and requests, from headers."""

import pytest

from askexpert.config import ServingConfig
from askexpert.serving.admission import Admission, Refused, retry_after_header

IMAGE = 32 * 32 * 3  # bytes of one 32×32 RGB image on the wire


def _admission(**serving: float) -> Admission:
    return Admission(ServingConfig(**serving).resolve("cpu"), image_size=32)


def test_the_wait_estimate_sheds_a_budget_shorter_than_the_drain_and_admits_a_longer_one() -> None:
    adm = _admission(max_batch_size=64, max_queue_images=4096, queue_delay_target_ms=10_000)
    adm.observe("e0", 64, 0.1)  # 640 images/s
    first = adm.admit("e0", 320)  # an empty queue always admits
    # 320 queued + 64 new = 384 images at 640/s: a wait of 0.6 s
    with pytest.raises(Refused) as refused:
        adm.admit("e0", 64, budget_s=0.3)
    assert refused.value.status == 429 and "600 ms exceeds the budget of 300 ms" in str(refused.value)
    assert refused.value.retry_after_s == pytest.approx(0.5)  # the 320 admitted images drain in 0.5 s
    assert retry_after_header(refused.value.retry_after_s) == "1"
    second = adm.admit("e0", 64, budget_s=0.7)
    assert adm.admitted["e0"] == 384
    adm.release(first)
    adm.release(second)
    adm.release(second)  # releasing twice frees once
    assert adm.admitted["e0"] == 0 and adm.inflight == 0


def test_the_server_target_bounds_the_wait_when_no_budget_is_sent_and_a_budget_cannot_extend_it() -> None:
    adm = _admission(max_batch_size=64, max_queue_images=4096, queue_delay_target_ms=200)
    adm.observe("e0", 100, 0.1)  # 1,000 images/s
    adm.admit("e0", 1280)
    for budget in (None, 5.0):
        with pytest.raises(Refused, match="exceeds the queue-delay target of 200 ms") as refused:
            adm.admit("e0", 8, budget_s=budget)
        assert retry_after_header(refused.value.retry_after_s) == "2"  # 1,280 images at 1,000/s: 1.28 s, rounded up
    assert adm.admit("e1", 8) is not None  # another expert's queue is its own


def test_the_throughput_estimate_follows_the_batches() -> None:
    adm = _admission()
    adm.observe("e0", 100, 1.0)
    adm.observe("e0", 200, 1.0)
    adm.observe("e0", 0, 0.0)  # nothing measured: ignored
    assert adm.images_per_s["e0"] == pytest.approx(0.8 * 100 + 0.2 * 200)


def test_the_image_cap_holds_before_any_throughput_is_measured() -> None:
    adm = _admission(max_batch_size=8, max_queue_images=16)
    tickets = [adm.admit("e0", 8), adm.admit("e0", 8)]
    with pytest.raises(Refused, match=r"16 images already queued \(bound 16\)") as refused:
        adm.admit("e0", 1)
    assert retry_after_header(refused.value.retry_after_s) == "1"  # nothing measured yet: come back in a second
    adm.resize(tickets[0], 3)  # the body held 3 images, not the 8 its length promised
    assert adm.admit("e0", 5).images == 5


def test_requests_in_flight_are_bounded() -> None:
    adm = _admission(max_inflight_requests=2)
    adm.admit("e0", 1)
    held = adm.admit("e1", 1)
    with pytest.raises(Refused, match="2 requests already in flight"):
        adm.admit("e2", 1)
    adm.release(held)
    adm.admit("e2", 1)


@pytest.mark.parametrize(("length", "images"), [(24 + 3 * IMAGE, 3), (24 + IMAGE, 1), (10, 1), (None, 64)])
def test_images_declared_by_the_content_length(length: int | None, images: int) -> None:
    assert _admission(max_batch_size=64).images_declared(length) == images


def test_the_wait_divides_by_the_rate_answers_come_back_while_busy_and_idle_time_does_not_count() -> None:
    adm = _admission(max_batch_size=64, max_queue_images=4096)
    adm.observe("e0", 64, 0.01)  # the model alone: 6,400 images/s
    tickets = [adm.admit("e0", 10) for _ in range(4)]
    adm.answered(tickets[0], now=0.0)  # 30 images still admitted behind it: busy from here
    adm.release(tickets[0])
    assert adm.rate("e0") == pytest.approx(6400)  # no busy time measured yet: the model's throughput
    adm.answered(tickets[1], now=0.1)
    adm.release(tickets[1])
    assert adm.rate("e0") == pytest.approx(10 / 0.1)  # 10 images in 0.1 s of busy time
    assert adm.drain_s("e0") == pytest.approx(20 / 100)  # 20 images still admitted
    adm.answered(tickets[2], now=0.3)
    adm.release(tickets[2])
    decay = 0.8187307531  # exp(-0.2 s / 1 s): older answers fade
    expected = (10 * decay + 10) / (0.1 * decay + 0.2)
    assert adm.rate("e0") == pytest.approx(expected)
    adm.answered(tickets[3], now=0.4)  # the queue empties behind this answer
    adm.release(tickets[3])
    settled = adm.rate("e0")
    late = adm.admit("e0", 10)
    adm.answered(late, now=60.0)  # a minute idle before it: not service time
    assert adm.rate("e0") == pytest.approx(settled)


def test_a_deeper_queue_drains_at_the_rate_of_fuller_batches() -> None:
    adm = _admission(max_batch_size=64, max_queue_images=4096, queue_delay_target_ms=100)
    for n in (8, 16, 8, 16, 12):  # light load: small batches, each 5 ms + 0.5 ms per image
        adm.observe("e0", n, 0.005 + 0.0005 * n)
    a, b, mean_n = adm.batch_cost("e0") or (0.0, 0.0, 0.0)
    assert a == pytest.approx(0.005) and b == pytest.approx(0.0005) and 8 < mean_n < 16
    assert adm.batching_gain("e0", 4) == 1.0  # no deeper than the recent batches: no gain
    at_recent = mean_n / (0.005 + 0.0005 * mean_n)
    assert adm.batching_gain("e0", 200) == pytest.approx((64 / 0.037) / at_recent)  # capped at one full batch
    # 120 queued images would be refused at the small batches' rate, and drain within target in full ones
    rate = adm.rate("e0") or 0.0
    assert 120 / rate > 0.1
    adm.admit("e0", 116)
    assert adm.admit("e0", 4) is not None
    assert adm.drain_s("e0") == pytest.approx(120 / (rate * adm.batching_gain("e0", 120)))


def test_without_a_spread_of_batch_sizes_there_is_no_gain() -> None:
    adm = _admission(max_batch_size=64)
    for _ in range(5):
        adm.observe("e0", 32, 0.02)
    assert adm.batch_cost("e0") is None and adm.batching_gain("e0", 64) == 1.0
    adm.observe("e1", 8, 0.02)
    adm.observe("e1", 16, 0.01)  # bigger and faster: no fixed cost plus per-image cost fits
    assert adm.batch_cost("e1") is None


def test_with_calls_side_by_side_each_batch_is_the_queues_share() -> None:
    """Two model workers split a queue of 64 images into two calls of 32: the gain is 32-image batches', not
    one 64-image batch's, so the estimate does not promise a drain the workers cannot deliver."""
    cfg = ServingConfig(max_batch_size=64, max_queue_images=4096).resolve("cpu")
    one, two = Admission(cfg, image_size=32), Admission(cfg, image_size=32, parallel_calls=2)
    for adm in (one, two):
        for n in (8, 16, 8, 16, 12):  # 5 ms + 0.5 ms per image
            adm.observe("e0", n, 0.005 + 0.0005 * n)
    mean_n = (one.batch_cost("e0") or (0.0, 0.0, 0.0))[2]
    at_recent = mean_n / (0.005 + 0.0005 * mean_n)
    assert one.batching_gain("e0", 64) == pytest.approx((64 / 0.037) / at_recent)
    assert two.batching_gain("e0", 64) == pytest.approx((32 / 0.021) / at_recent)
    assert two.batching_gain("e0", 64) < one.batching_gain("e0", 64)
    assert two.batching_gain("e0", 200) == one.batching_gain("e0", 200)  # both calls full: a full batch each
    with pytest.raises(ValueError, match="parallel_calls"):
        Admission(cfg, image_size=32, parallel_calls=0)


def test_light_load_does_not_erase_what_full_batches_cost() -> None:
    """Small batches for a long while (light load) leave the full batches' cost in the fit: the estimate still
    expects a deep queue to drain in full batches, instead of refusing the queue that would bring them back."""
    adm = _admission(max_batch_size=64, max_queue_images=4096)
    for _ in range(3):
        adm.observe("e0", 64, 0.005 + 0.0005 * 64)
    for _ in range(500):
        adm.observe("e0", 4, 0.005 + 0.0005 * 4)
    a, b, mean_n = adm.batch_cost("e0") or (0.0, 0.0, 0.0)
    assert a == pytest.approx(0.005) and b == pytest.approx(0.0005)
    assert mean_n == pytest.approx(4, abs=0.01)  # the recent answers came from 4-image batches
    assert adm.batching_gain("e0", 64) == pytest.approx((64 / 0.037) / (4 / 0.007))


def test_a_warm_up_before_serving_gives_the_fit_its_full_batch() -> None:
    """`calibrate` (the server's warm-up calls) records what one image and a full batch cost; from the first real
    batch on, the gain of a deeper queue is known, and the warm-up does not count as recent load."""
    adm = _admission(max_batch_size=64, max_queue_images=4096)
    adm.calibrate("e0", 1, 0.005 + 0.0005)
    adm.calibrate("e0", 64, 0.005 + 0.0005 * 64)
    assert adm.batch_cost("e0") is None and adm.rate("e0") is None  # no real batch yet: nothing to scale
    adm.observe("e0", 4, 0.005 + 0.0005 * 4)
    a, b, mean_n = adm.batch_cost("e0") or (0.0, 0.0, 0.0)
    assert a == pytest.approx(0.005) and b == pytest.approx(0.0005) and mean_n == 4
    assert adm.batching_gain("e0", 64) > 2


def test_an_auto_small_batch_target_is_counted_in_full_batches_timed_at_warm_up() -> None:
    """On a host where a full batch takes 12 ms or more, the auto target grows to two and a half batches (a
    slow host otherwise refuses requests at half load); a target given as a value, or one already counted,
    stays as it is; the start-up line says what the target was counted from."""
    import numpy as np

    from askexpert.models.meta import CheckpointMeta
    from askexpert.serving.server import ServiceBase

    auto = ServingConfig().resolve("cpu", "plain", 2)
    assert (auto.queue_delay_target_ms, auto.target_batches, auto.full_batch_ms) == (30.0, 2.5, None)
    assert auto.with_batch_time(0.009).queue_delay_target_ms == 30.0  # 2.5 batches of 9 ms: the floor holds
    slow = auto.with_batch_time(0.0204)
    assert slow.queue_delay_target_ms == 51.0 and slow.full_batch_ms == pytest.approx(20.4)
    assert "51 ms queue-delay target (auto: at least 2.5 full batches of 20.4 ms)" in slow.describe()
    assert slow.with_batch_time(0.1) is slow  # counted once
    given = ServingConfig(queue_delay_target_ms=30).resolve("cpu", "plain", 2)
    assert given.target_batches == 0 and given.with_batch_time(0.0205) is given
    sized = ServingConfig(max_batch_size=64).resolve("cpu", "plain", 2)  # a batch given: its target in ms
    assert sized.target_batches == 0 and sized.with_batch_time(0.16).queue_delay_target_ms == 30.0
    assert ServingConfig().resolve("cpu", "ray").with_batch_time(0.2).queue_delay_target_ms == 70.0
    with pytest.raises(ValueError, match="must be > 0 seconds"):
        auto.with_batch_time(0.0)

    class Timed(ServiceBase):
        """A service whose model calls take 2 ms plus 10 ms per image (82 ms a full batch of 8)."""

        def compute_s(self, expert_id: str, images: np.ndarray) -> float:
            return 0.002 + 0.01 * len(images)

    meta = CheckpointMeta(role="expert", preset="micro", classes=[0, 1, -1])
    service = Timed({"e0": meta, "e1": meta}, 32, auto, parallel_calls=2)
    service.warm_up()
    assert service.cfg.queue_delay_target_ms == 205.0 and service.admission.target_s == pytest.approx(0.205)
    # the new admission keeps the calls side by side and the warm-up's timings: with one batch served, a + b·N
    # fits through the warm-up's 1 and 8 images and that batch's 4
    assert service.admission.parallel_calls == 2
    service.admission.observe("e0", 4, 0.042)
    assert service.admission.batch_cost("e0") == pytest.approx((0.002, 0.01, 4.0))
    assert auto.queue_delay_target_ms == 30.0  # a copy: the resolved settings it started from are unchanged
