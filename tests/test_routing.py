import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydantic import ValidationError

from askexpert.config import RoutingConfig
from askexpert.errors import RoutingError
from askexpert.protocol import softmax
from askexpert.routing import Router, choose_expert, expert_scores, offload_mask

C, E = 12, 4


@st.composite
def probs_and_partition(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(1, 16))
    logits = draw(arrays(np.float32, (n, C), elements=st.floats(-8, 8, width=32)))
    owner = draw(arrays(np.int64, C, elements=st.integers(0, E - 1)))
    owner[:E] = np.arange(E)  # every expert holds at least one class
    membership = np.zeros((E, C), dtype=bool)
    membership[owner, np.arange(C)] = True
    return softmax(logits.astype(np.float64)).astype(np.float32), membership


@settings(max_examples=80, deadline=None)
@given(probs_and_partition())
def test_k1_picks_the_top1_classes_expert(case: tuple[np.ndarray, np.ndarray]) -> None:
    probs, membership = case
    chosen = choose_expert(probs, membership, k=1)
    is_top = probs == probs.max(axis=1, keepdims=True)  # several classes when tied
    assert (membership[chosen] & is_top).any(axis=1).all()


@settings(max_examples=80, deadline=None)
@given(probs_and_partition(), st.floats(1.0001, 5.0))
def test_max_prob_gate_extremes(case: tuple[np.ndarray, np.ndarray], high: float) -> None:
    probs, _ = case
    assert not offload_mask(probs, "max_prob", 0.0).any()
    assert offload_mask(probs, "max_prob", high).all()
    assert not offload_mask(probs, "entropy", 1.0001).any() and not offload_mask(probs, "margin", 0.0).any()


@settings(max_examples=80, deadline=None)
@given(
    probs_and_partition(), st.integers(1, 5), st.permutations(list(range(E))), st.sampled_from(["weighted", "count"])
)
def test_invariant_to_expert_order(case: tuple[np.ndarray, np.ndarray], k: int, perm: list[int], scoring: str) -> None:
    probs, membership = case
    base = choose_expert(probs, membership, k, scoring)
    permuted = choose_expert(probs, membership[perm], k, scoring)
    assert (np.asarray(perm)[permuted] == base).all()


@settings(max_examples=60, deadline=None)
@given(probs_and_partition(), st.integers(1, 5))
def test_chosen_expert_has_the_highest_score(case: tuple[np.ndarray, np.ndarray], k: int) -> None:
    probs, membership = case
    scores, _ = expert_scores(probs, membership, k)
    chosen = choose_expert(probs, membership, k)
    best = scores.max(axis=1)
    assert np.all(scores[np.arange(len(chosen)), chosen] >= best - 1e-5)


def test_weighted_score_is_the_formula_and_ties_go_to_top1() -> None:
    membership = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=bool)
    probs = np.array([[0.40, 0.05, 0.30, 0.25], [0.35, 0.30, 0.35 - 1e-9, 0.0]], dtype=np.float32)
    scores, _ = expert_scores(probs, membership, k=3)
    assert np.allclose(scores[0], [0.40, 0.55])
    assert choose_expert(probs, membership, k=3).tolist()[0] == 1  # p3+p4 beat the top-1 class
    counts, _ = expert_scores(probs, membership, k=3, scoring="count")
    assert counts[0].tolist() == [1.0, 2.0]
    # Scores 0.5 / 0.5 (exact tie), 0.5 / 0.5000005 (inside the 1e-6 tolerance) and 0.5 / 0.5001
    # (outside it); the top-1 class 0 belongs to expert 0, so it wins the ties only.
    tie = np.array(
        [[0.4, 0.1, 0.3, 0.2], [0.4, 0.1, 0.3 + 5e-7, 0.2], [0.4, 0.1, 0.3 + 1e-4, 0.2]],
        dtype=np.float64,
    )
    assert choose_expert(tie, membership, k=4).tolist() == [0, 0, 1]


def test_overlapping_subsets_are_supported() -> None:
    membership = np.array([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=bool)
    probs = np.array([[0.1, 0.3, 0.2, 0.4]], dtype=np.float32)
    assert choose_expert(probs, membership, k=2).tolist() == [1]  # classes 3 and 1: expert 1 has both
    assert choose_expert(probs, membership, k=1).tolist() == [1]


def test_router_decision_and_errors() -> None:
    membership = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=bool)
    point = RoutingConfig(gate="max_prob", tau=0.5, top_k=2)
    router = Router(membership, point)
    probs = np.array([[0.9, 0.05, 0.03, 0.02], [0.3, 0.1, 0.4, 0.2]], dtype=np.float32)
    decision = router(probs)
    assert decision.offload.tolist() == [False, True]
    assert decision.expert.tolist() == [0, 1]
    assert decision.topk_classes.tolist() == [[0, 1], [2, 0]]
    assert decision.stat.tolist() == pytest.approx([0.9, 0.4])
    # the operating point is one validated value: a bad one never reaches the router
    for bad in ({"top_k": 0}, {"gate": "coin"}, {"scoring": "vote"}, {"tau": 1.5}):
        with pytest.raises(ValidationError):
            point.updated(**bad)
    with pytest.raises(RoutingError, match="top_k=5 exceeds"):
        Router(membership, point.updated(top_k=5))
    with pytest.raises(RoutingError, match="must be a RoutingConfig"):
        Router(membership, {"gate": "margin"})  # type: ignore[arg-type]
    assert point.model_copy(update={"tau": 0.7}).tau == 0.7 and point.tau == 0.5  # copies, never edits
    with pytest.raises(RoutingError, match="without an expert"):
        Router(np.array([[1, 1, 0, 0]], dtype=bool))
    with pytest.raises(RoutingError, match="generalist gives 3 classes but the partition has 4"):
        router(np.ones((2, 3), dtype=np.float32) / 3)
    with pytest.raises(RoutingError, match=r"must be \(N, C\)"):
        router(np.ones(4, dtype=np.float32))


def test_a_torch_tensor_routes_like_its_array() -> None:
    """Training code hands CPU tensors; the router reads them through numpy without importing torch itself."""
    torch = pytest.importorskip("torch")
    membership = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=bool)
    probs = np.array([[0.2, 0.1, 0.4, 0.3], [0.6, 0.1, 0.2, 0.1]], dtype=np.float32)
    router = Router(membership, RoutingConfig(gate="margin", tau=0.3, top_k=2))
    a, b = router(probs), router(torch.from_numpy(probs))
    assert a.expert.tolist() == b.expert.tolist() == [1, 0] and a.offload.tolist() == b.offload.tolist() == [
        True,
        False,
    ]
