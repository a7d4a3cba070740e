"""The shared answer rules: combination rules, abstain → fallback, and their use on the live path."""

from __future__ import annotations

import numpy as np
import pytest

from askexpert.protocol import COMBINE_RULES, OTHER, expert_answer, expert_full_distribution, final_labels, softmax


def _gen(rows: list[list[float]]) -> np.ndarray:
    p = np.asarray(rows, dtype=np.float64)
    return p / p.sum(axis=1, keepdims=True)


CLASSES = np.array([1, 3, OTHER])  # an expert for classes 1 and 3 of 5


def test_full_distribution_spreads_other_by_the_generalist() -> None:
    gen = _gen([[0.1, 0.2, 0.3, 0.1, 0.3]])
    expert = np.array([[0.5, 0.1, 0.4]])
    full = expert_full_distribution(expert, CLASSES, gen)
    assert full.sum() == pytest.approx(1.0)
    assert full[0, 1] == 0.5 and full[0, 3] == pytest.approx(0.1)
    outside = gen[0, [0, 2, 4]] / gen[0, [0, 2, 4]].sum()
    assert np.allclose(full[0, [0, 2, 4]], 0.4 * outside)


def test_replace_takes_the_expert_argmax_and_abstains_on_other() -> None:
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    assert expert_answer(softmax(logits), CLASSES).tolist() == [1, OTHER]


def test_mix_pools_both_answers() -> None:
    gen = _gen([[0.05, 0.30, 0.05, 0.25, 0.35], [0.1, 0.1, 0.1, 0.1, 0.6]])
    expert = np.log(np.array([[0.2, 0.7, 0.1], [0.05, 0.05, 0.9]]))
    # w = 1: the generalist alone; w = 0: the expert's full distribution.
    assert expert_answer(softmax(expert), CLASSES, gen, "mix", 1.0).tolist() == gen.argmax(1).tolist()
    only_expert = expert_full_distribution(softmax(expert), CLASSES, gen).argmax(1)
    assert expert_answer(softmax(expert), CLASSES, gen, "mix", 0.0).tolist() == only_expert.tolist() == [3, 4]
    # A confident "other" hands the answer to the generalist's best class outside the subset, never -1.
    assert OTHER not in expert_answer(softmax(expert), CLASSES, gen, "mix", 0.3)
    # In between, the pooled argmax can differ from both: expert says 3, generalist says 4, 1 is a close second.
    mixed = expert_answer(softmax(expert[:1]), CLASSES, gen[:1], "mix", 0.5)
    pooled = 0.5 * gen[:1] + 0.5 * expert_full_distribution(softmax(expert[:1]), CLASSES, gen[:1])
    assert mixed.tolist() == pooled.argmax(1).tolist()
    with pytest.raises(ValueError, match="needs the generalist"):
        expert_answer(softmax(expert), CLASSES, None, "mix")
    with pytest.raises(ValueError, match="unknown combination rule 'vote'"):
        expert_answer(softmax(expert), CLASSES, gen, "vote")


def test_logmix_needs_both_models_to_agree() -> None:
    # The generalist: class 4 at 0.70, class 1 at 0.25, class 3 almost never (0.01). The expert (classes 1, 3):
    # class 3 at 0.80, class 1 at 0.18, "other" 0.02, spread over 0, 2, 4 as 2:2:70 (class 4: 0.02·70/74).
    gen = _gen([[0.02, 0.25, 0.02, 0.01, 0.70]])
    expert = np.log(np.array([[0.18, 0.80, 0.02]]))
    # Linear pool at w = 0.5: class 3 = (0.01 + 0.80) / 2 = 0.405 beats class 4 (0.359) and class 1 (0.215).
    assert expert_answer(softmax(expert), CLASSES, gen, "mix", 0.5).tolist() == [3]
    # Log pool at w = 0.5: log-means class 1 -1.550, class 4 -2.163, class 3 -2.414: the generalist's 0.01
    # vetoes class 3, and class 1, which both give weight, wins.
    assert expert_answer(softmax(expert), CLASSES, gen, "logmix", 0.5).tolist() == [1]
    # w = 1 is the generalist alone, w = 0 the expert's full distribution, as for `mix`.
    assert expert_answer(softmax(expert), CLASSES, gen, "logmix", 1.0).tolist() == [4]
    assert expert_answer(softmax(expert), CLASSES, gen, "logmix", 0.0).tolist() == [3]
    # A probability that underflowed to 0 is a strong veto, not a nan: the answer stays a real class.
    zero = _gen([[0.0, 0.5, 0.0, 0.0, 0.5]])
    with np.errstate(all="raise"):
        assert expert_answer(softmax(expert), CLASSES, zero, "logmix", 0.5).tolist() == [1]
    with pytest.raises(ValueError, match="'logmix' needs the generalist"):
        expert_answer(softmax(expert), CLASSES, None, "logmix")


def test_abstain_falls_back_to_the_generalist() -> None:
    labels, answered = final_labels(
        np.array([0, 1, 2, 3]), np.array([9, OTHER, 7, 8]), np.array([True, True, True, False])
    )
    assert labels.tolist() == [9, 1, 7, 3]
    assert answered.tolist() == [True, False, True, False]


class _FixedBackend:
    """An expert that answers given probabilities, or none (as an old server would)."""

    def __init__(self, probs: np.ndarray | None, labels: np.ndarray | list[int]) -> None:
        self.probs, self.labels = probs, np.asarray(labels)

    def predict(self, expert_id: str, images: np.ndarray):  # noqa: ANN201
        from askexpert.protocol.backend import ExpertReply

        n = len(images)
        probs = None if self.probs is None else np.repeat(self.probs, n, axis=0)
        return ExpertReply(np.repeat(self.labels, n), np.full(n, 0.9, np.float32), probs=probs)


class _FixedGeneralist:
    """A generalist whose softmax is the same known vector for every image."""

    num_outputs = 4

    def __init__(self, probs: list[float]) -> None:
        self.logits = np.log(np.asarray(probs, dtype=np.float32))

    def __call__(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        return np.repeat(self.logits[None], len(images), axis=0)


def test_live_classifier_uses_the_same_rule_and_falls_back_without_probabilities() -> None:
    from askexpert.config import RoutingConfig
    from askexpert.inference.collaborative import CollaborativeClassifier
    from askexpert.partition import Partition
    from askexpert.routing import Router

    # The generalist says p = (0.1, 0.2, 0.3, 0.4): top-1 class 3, so expert e1 (classes 2, 3) is asked.
    gen = _FixedGeneralist([0.1, 0.2, 0.3, 0.4])
    part = Partition("random", 4, ("e0", "e1"), ((0, 1), (2, 3)))
    point = RoutingConfig(gate="max_prob", tau=1.0, top_k=1)  # τ = 1: everything offloaded
    images = np.zeros((6, 32, 32, 3), dtype=np.uint8)
    say_other = np.array([[0.05, 0.05, 0.9]])  # e1: 0.05 on class 2, 0.05 on class 3, 0.9 on "other"
    replace = CollaborativeClassifier(gen, Router(part.membership(), point), part, _FixedBackend(say_other, [OTHER]))
    out = replace(images)
    assert (out.expert == "e1").all() and (out.source == "fallback").all() and (out.reason == "abstain").all()
    assert (out.labels == 3).all()  # "other" under replace: the generalist's label stands
    # mix, by hand: "other"'s 0.9 spread over classes 0, 1 as the generalist weighs them (1:2) gives
    # (0.3, 0.6, 0.05, 0.05); pooled half-and-half with (0.1, 0.2, 0.3, 0.4): (0.2, 0.4, 0.175, 0.225) → class 1.
    mixing = Router(part.membership(), point.updated(combine="mix"))
    out = CollaborativeClassifier(gen, mixing, part, _FixedBackend(say_other, [OTHER]))(images)
    assert (out.source == "expert").all() and (out.labels == 1).all()
    blind = CollaborativeClassifier(gen, mixing, part, _FixedBackend(None, np.array([2])))
    out = blind(images)
    assert (out.source == "fallback").all() and all("sent no probabilities" in r for r in out.reason)
    assert (out.labels == 3).all()


def test_the_config_accepts_exactly_the_rules_the_protocol_runs() -> None:
    from typing import get_args

    from askexpert.config import RoutingConfig
    from askexpert.protocol import POOLED_RULES

    assert get_args(RoutingConfig.model_fields["combine"].annotation) == COMBINE_RULES
    assert set(POOLED_RULES) < set(COMBINE_RULES)
    assert RoutingConfig(combine="logmix", mix_weight=0.35).describe().endswith("logmix w=0.35")
