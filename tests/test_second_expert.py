"""A second expert for close calls (`routing.second_within`): who is asked, what the pair answers, what it costs.

Every expected value here is written out by hand, not recomputed with the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from askexpert.config import EvaluateConfig, RoutingConfig
from askexpert.evaluate.cache import LogitCache, ScheduleOutputs, _schedule_outputs
from askexpert.evaluate.metrics import SecondExpert, outcomes, point_outcome, second_expert
from askexpert.partition import Partition
from askexpert.protocol import OTHER, pair_answer, replace_pair
from askexpert.protocol.backend import BackendError, ExpertReply, reply_from_logits
from askexpert.routing import NO_SECOND, Router, choose_experts


def test_replace_pair_takes_the_more_confident_answer_that_did_not_abstain() -> None:
    labels = (np.array([1, OTHER, 2, OTHER, 5]), np.array([3, 0, OTHER, OTHER, 6]))
    confidence = (np.array([0.9, 0.8, 0.5, 0.9, 0.7]), np.array([0.7, 0.6, 0.99, 0.4, 0.7]))
    # more confident first; first abstains; second abstains; both abstain; a tie goes to the router's best
    assert replace_pair(labels, confidence).tolist() == [1, 0, 2, OTHER, 5]


def test_pooled_pair_averages_the_experts_then_pools_with_the_generalist() -> None:
    gen = np.array([[0.1, 0.2, 0.3, 0.4]])
    a, classes_a = np.array([[0.6, 0.2, 0.2]]), np.array([0, 1, OTHER])
    b, classes_b = np.array([[0.1, 0.1, 0.8]]), np.array([2, 3, OTHER])
    # Full distributions, "other" spread by the generalist: A (0.6, 0.2, 0.2·3/7, 0.2·4/7) = (.6, .2, .0857, .1143);
    # B (0.8·1/3, 0.8·2/3, 0.1, 0.1) = (.2667, .5333, .1, .1).
    # logmix w = 0.5: geometric mean of A and B (.4, .3266, .0926, .1069), then with the generalist:
    # (.2, .2556, .1667, .2068): class 1. A alone would give (.245, .2, .160, .214): class 0.
    assert pair_answer((a, b), (classes_a, classes_b), gen, "logmix", 0.5).tolist() == [1]
    # mix w = 0.5: the experts' mean (.4333, .3667, .0929, .1071), pooled: (.2667, .2833, .1964, .2536): class 1.
    assert pair_answer((a, b), (classes_a, classes_b), gen, "mix", 0.5).tolist() == [1]
    # replace: A answers class 0 at 0.6, B abstains ("other" 0.8): A's answer.
    assert pair_answer((a, b), (classes_a, classes_b), gen, "replace").tolist() == [0]
    with pytest.raises(ValueError, match="'logmix' needs the generalist"):
        pair_answer((a, b), (classes_a, classes_b), None, "logmix")


MEMBERSHIP = np.array([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]], dtype=bool)  # e0, e1, e2


def test_the_runner_up_is_asked_only_when_its_score_is_close() -> None:
    probs = np.array(
        [
            [0.30, 0.05, 0.28, 0.02, 0.25, 0.10],  # Top-3 classes 0, 2, 4: e0 .30, e1 .28, e2 .25
            [0.60, 0.20, 0.10, 0.05, 0.03, 0.02],  # Top-3 classes 0, 1, 2: e0 .80, e1 .10, e2 0
        ]
    )
    first, second = choose_experts(probs, MEMBERSHIP, 3, "weighted", 0.0)
    assert first.tolist() == [0, 0] and second.tolist() == [NO_SECOND, NO_SECOND]
    # row 0 needs within ≥ 1 − .28/.30 = .067; row 1 within ≥ 1 − .10/.80 = .875
    assert choose_experts(probs, MEMBERSHIP, 3, "weighted", 0.05)[1].tolist() == [NO_SECOND, NO_SECOND]
    assert choose_experts(probs, MEMBERSHIP, 3, "weighted", 0.1)[1].tolist() == [1, NO_SECOND]
    assert choose_experts(probs, MEMBERSHIP, 3, "weighted", 0.9)[1].tolist() == [1, 1]
    # k = 1: no other expert holds a Top-k class (score 0), so none is asked, however wide the window
    assert choose_experts(probs, MEMBERSHIP, 1, "weighted", 1.0)[1].tolist() == [NO_SECOND, NO_SECOND]
    router = Router(MEMBERSHIP, RoutingConfig(gate="max_prob", tau=0.5, top_k=3, second_within=0.1))
    decision = router(probs)
    assert decision.offload.tolist() == [True, False] and decision.second.tolist() == [1, NO_SECOND]


def test_second_within_is_validated() -> None:
    with pytest.raises(ValidationError, match="second_within"):
        RoutingConfig(second_within=1.5)
    with pytest.raises(ValidationError, match="between 0 and 1"):
        EvaluateConfig(second_withins=[0.2, -0.1])
    assert "2nd within 0.25" in RoutingConfig(second_within=0.25).describe()


PART = Partition("random", 4, ("e0", "e1"), ((0, 1), (2, 3)))


def _cache() -> tuple[LogitCache, ScheduleOutputs]:
    y = np.array([0, 2, 3, 1])
    probs = np.full((4, 4), 0.1, np.float32)
    probs[np.arange(4), [1, 1, 3, 0]] = 0.7  # the generalist answers 1, 1, 3, 0: wrong, wrong, right, wrong
    out = _schedule_outputs({"e0": np.eye(3)[[0, 0, 0, 0]], "e1": np.eye(3)[[0, 0, 1, 0]]}, PART)
    return LogitCache(y, probs, PART, {"s": out}, "k"), out


def test_two_requests_count_as_two_offloads_and_either_expert_can_hit() -> None:
    cache, out = _cache()
    chosen = np.array([0, 0, 1, 1])
    answers = np.array([[0, 1, 0, 0], [2, 3, 3, 2]])  # (E, N) each expert's answer
    second = SecondExpert(np.array([NO_SECOND, 1, NO_SECOND, 0]), np.array([OTHER, 2, OTHER, 1]))
    offload = np.array([[True, True, True, True], [True, True, False, False]])
    res = outcomes(cache, out, offload, chosen, answers, second)
    # all four: e0 → 0 (right), pair → 2 (right), e1 → 3 (right), pair → 1 (right); 4 + 2 requests
    # first two: right, right (pair), then the generalist: 3 right, 0 wrong; 2 + 1 requests
    assert res["accuracy"].tolist() == pytest.approx([1.0, 0.75])
    assert res["offload_rate"].tolist() == pytest.approx([6 / 4, 3 / 4])
    assert res["offloaded_samples"].tolist() == pytest.approx([1.0, 0.5])
    # class 2 is e1's (asked second), class 1 e0's (asked second): every offloaded sample reaches its expert
    assert res["routing_hit_rate"].tolist() == pytest.approx([1.0, 1.0])
    without = outcomes(cache, out, offload, chosen, answers)
    assert without["routing_hit_rate"].tolist() == pytest.approx([2 / 4, 1 / 2])
    assert without["offload_rate"].tolist() == pytest.approx([1.0, 0.5])
    # e0 asked by samples 0, 1, 3 and e1 by 1, 2, 3 when all are offloaded
    assert res["load"][0].tolist() == pytest.approx([3 / 4, 3 / 4])


def test_cached_pairs_follow_the_router() -> None:
    cache, out = _cache()
    # k = 2, weighted: every row's Top-2 is its 0.7 class and class 0 (the lowest of the 0.1 ties), so rows
    # 0, 1, 3 (top-1 in e0) ask e0 alone; row 2 (top-1 class 3, e1: .7 vs e0 .1) asks e0 within ≥ 1 − .1/.7
    narrow = second_expert(cache, out, 2, "weighted", 0.5)
    assert narrow is not None and narrow.expert.tolist() == [NO_SECOND] * 4
    assert second_expert(cache, out, 2, "weighted", 0.0) is None  # 0: one expert, as in the paper
    pair = second_expert(cache, out, 2, "weighted", 0.9)
    assert pair is not None and pair.expert.tolist() == [NO_SECOND, NO_SECOND, 0, NO_SECOND]
    # row 2: e1 answers class 3 (logit 1 of 3), e0 class 0 (logit 1 of 3 too, softmax .576 each): a tie → e1
    assert pair.answer[2] == 3
    point = RoutingConfig(gate="max_prob", tau=1.0, top_k=2, second_within=0.9)
    assert point_outcome(cache, out, point)["offload_rate"] == pytest.approx(5 / 4)


class _Experts:
    """Each expert answers fixed probabilities; counts its calls; may be down."""

    def __init__(self, probs: dict[str, list[float]], classes: dict[str, list[int]], down: set[str]) -> None:
        self.probs, self.classes, self.down = probs, classes, down
        self.calls: dict[str, int] = {}

    def predict(self, expert_id: str, images: np.ndarray) -> ExpertReply:
        self.calls[expert_id] = self.calls.get(expert_id, 0) + 1
        if expert_id in self.down:
            raise BackendError(f"{expert_id} is down")
        logits = np.log(np.repeat([self.probs[expert_id]], len(images), axis=0))
        return reply_from_logits(logits, np.asarray(self.classes[expert_id]))


class _Generalist:
    num_outputs = 4

    def __call__(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        return np.repeat(np.log([[0.32, 0.05, 0.35, 0.28]]), len(images), axis=0)


@pytest.mark.parametrize("down", [set(), {"e0"}, {"e0", "e1"}])
def test_the_live_edge_asks_both_experts_once_and_survives_one_down(down: set[str]) -> None:
    from askexpert.inference.collaborative import CollaborativeClassifier

    # Top-2: class 2 (.35, e1) then class 0 (.32, e0): e0 is asked too when within ≥ 1 − .32/.35 = .086.
    experts = _Experts(
        {"e0": [0.9, 0.05, 0.05], "e1": [0.1, 0.6, 0.3]}, {"e0": [0, 1, OTHER], "e1": [2, 3, OTHER]}, down
    )
    point = RoutingConfig(gate="max_prob", tau=1.0, top_k=2, second_within=0.2)
    classifier = CollaborativeClassifier(_Generalist(), Router(PART.membership(), point), PART, experts)
    out = classifier(np.zeros((5, 32, 32, 3), dtype=np.uint8))
    assert experts.calls == {"e0": 1, "e1": 1}  # one call per expert for the whole batch
    assert (out.expert == "e1+e0").all()
    if not down:  # replace: e0's class 0 at .9 beats e1's class 3 at .6
        assert (out.labels == 0).all() and (out.source == "expert").all() and (out.reason == "").all()
    elif down == {"e0"}:  # e1 alone answers, and the record says why e0 did not
        assert (out.labels == 3).all() and (out.source == "expert").all()
        assert all("one expert answered" in r and "e0 is down" in r for r in out.reason)
    else:  # both down: the generalist's class 2 stands
        assert (out.labels == 2).all() and (out.source == "fallback").all()


def test_two_calls_for_one_sample_add_their_costs_but_not_their_batch() -> None:
    from askexpert.protocol.backend import add_call_info

    first = {"bytes_sent": 3096.0, "compute_ms": 1.5, "rtt_ms": 12.0, "batch_size": 1.0, "server_energy_j": 0.2}
    second = {"bytes_sent": 3096.0, "compute_ms": 2.5, "rtt_ms": 14.0, "batch_size": 1.0, "server_energy_j": 0.3}
    both = add_call_info(add_call_info({}, first), second)
    assert both == pytest.approx(
        {"bytes_sent": 6192.0, "compute_ms": 4.0, "rtt_ms": 26.0, "batch_size": 1.0, "server_energy_j": 0.5}
    )


def test_a_window_no_sample_can_use_is_chosen_as_one_expert() -> None:
    from askexpert.evaluate.metrics import choose_point

    cache, out = _cache()
    # k = 1: only the top-1 class's expert scores above 0, so no runner-up is ever asked
    point, _ = choose_point(cache, out, np.linspace(0, 1, 5), [1], [("replace", 0.0)], withins=(0.25,))
    assert point.second_within == 0.0 and "2nd" not in point.describe()
