"""The answer rules the edge, the server, the cached evaluation and the testbed share.

One place for each: the "other" sentinel, how an expert's outputs become a
global answer (`expert_answer`, with the combination rules), and abstain →
fallback (`final_labels`). Importable by edge and server alike (numpy only).

Combination rules (`routing.combine`):
  * ``replace``: the expert's label replaces the generalist's; "other" abstains.
  * ``mix``: the two distributions are pooled, q = w·p_gen + (1−w)·p_exp, where
    p_exp gives the expert's own classes its probabilities and spreads its
    "other" mass over the remaining classes in the generalist's proportions;
    the answer is argmax q. It never abstains: a confident "other" hands the
    decision back to the generalist's ranking outside the subset.
  * ``logmix``: the same two distributions pooled in log space (the logarithmic
    opinion pool), log q = w·log p_gen + (1−w)·log p_exp + const: a class wins
    only where both models give it weight, so one model's confident mistake is
    vetoed by the other's near-zero probability, where the linear pool averages
    it in. It never abstains either.

A second expert (`routing.second_within`, beyond the paper): when the runner-up expert's
routing score is close to the best's, the sample asks both (`pair_answer`). Under
``replace`` the more confident of the two answers that did not abstain wins; under the
pooled rules the two experts' distributions are first averaged (``mix``) or
geometrically averaged (``logmix``) into one expert opinion, which is then pooled with
the generalist's as for one expert.
"""

from __future__ import annotations

import numpy as np

OTHER = -1  # the global "class id" of an expert's "other" output
COMBINE_RULES: tuple[str, ...] = ("replace", "mix", "logmix")
POOLED_RULES: tuple[str, ...] = ("mix", "logmix")  # the rules that take `mix_weight` and the generalist's probabilities


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    return probs / probs.sum(axis=1, keepdims=True)


def expert_full_distribution(expert_probs: np.ndarray, classes: np.ndarray, gen_probs: np.ndarray) -> np.ndarray:
    """(N, C): the expert's subset probabilities, its "other" mass spread by the generalist outside the subset."""
    n, num_classes = gen_probs.shape
    subset = classes[classes != OTHER]
    out = np.zeros((n, num_classes), dtype=np.float64)
    out[:, subset] = expert_probs[:, : len(subset)]
    outside = np.ones(num_classes, dtype=bool)
    outside[subset] = False
    if outside.any() and len(classes) > len(subset):
        rest = gen_probs[:, outside].astype(np.float64)
        rest /= np.clip(rest.sum(axis=1, keepdims=True), 1e-12, None)
        out[:, outside] = expert_probs[:, [len(subset)]] * rest
    return out


def _pool(gen_probs: np.ndarray, fulls: list[np.ndarray], rule: str, mix_weight: float) -> np.ndarray:
    """Global labels from the generalist's distribution pooled with the experts' (averaged in the rule's space)."""
    if rule == "mix":
        pooled = mix_weight * gen_probs + (1.0 - mix_weight) * (sum(fulls) / len(fulls))
    else:  # a floor keeps a probability that underflowed to 0 a finite veto, not -inf (and 0·-inf = nan)
        floor = np.finfo(np.float64).tiny
        expert_log = sum(np.log(np.maximum(f, floor)) for f in fulls) / len(fulls)
        pooled = mix_weight * np.log(np.maximum(gen_probs.astype(np.float64), floor)) + (1.0 - mix_weight) * expert_log
    return np.asarray(pooled).argmax(axis=1).astype(np.int64)


def _check_rule(rule: str, gen_probs: np.ndarray | None) -> np.ndarray | None:
    if rule not in COMBINE_RULES:
        raise ValueError(f"unknown combination rule {rule!r}; choose one of {', '.join(COMBINE_RULES)}")
    if rule in POOLED_RULES and gen_probs is None:
        raise ValueError(f"combination rule {rule!r} needs the generalist's probabilities")
    return gen_probs


def expert_answer(
    expert_probs: np.ndarray,
    classes: np.ndarray,
    gen_probs: np.ndarray | None = None,
    rule: str = "replace",
    mix_weight: float = 0.5,
) -> np.ndarray:
    """Global labels (N,) from one expert's softmax under a combination rule; OTHER where it abstains.

    Probabilities, not logits: what a server sends and what the cache's logits give through `softmax`.
    """
    gen_probs = _check_rule(rule, gen_probs)
    if gen_probs is None or rule == "replace":
        return classes[expert_probs.argmax(axis=1)].astype(np.int64)
    full = expert_full_distribution(expert_probs.astype(np.float64), classes, gen_probs)
    return _pool(gen_probs, [full], rule, mix_weight)


def replace_pair(labels: tuple[np.ndarray, np.ndarray], confidence: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Two experts' `replace` answers (N,) each: the more confident one that did not abstain (ties: the first,
    the router's best); OTHER only where both abstain."""
    (a, b), (ca, cb) = labels, confidence
    take_b = (a == OTHER) | ((b != OTHER) & (cb > ca))
    return np.where(take_b, b, a).astype(np.int64)


def pair_answer(
    expert_probs: tuple[np.ndarray, np.ndarray],
    classes: tuple[np.ndarray, np.ndarray],
    gen_probs: np.ndarray | None = None,
    rule: str = "replace",
    mix_weight: float = 0.5,
) -> np.ndarray:
    """Global labels (N,) when every sample asked both experts: `replace_pair` on their own answers, or the
    generalist pooled with the two experts' averaged distributions (module docstring)."""
    gen_probs = _check_rule(rule, gen_probs)
    if gen_probs is None or rule == "replace":
        labels = (classes[0][expert_probs[0].argmax(axis=1)], classes[1][expert_probs[1].argmax(axis=1)])
        # confidences as a reply carries them (float32), so the cache and the live edge break near-ties alike
        conf = (expert_probs[0].max(axis=1).astype(np.float32), expert_probs[1].max(axis=1).astype(np.float32))
        return replace_pair(labels, conf)
    fulls = [
        expert_full_distribution(p.astype(np.float64), c, gen_probs) for p, c in zip(expert_probs, classes, strict=True)
    ]
    return _pool(gen_probs, fulls, rule, mix_weight)


def final_labels(
    gen_labels: np.ndarray, expert_labels: np.ndarray, offload: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, answered): the expert's label where it was asked and did not abstain, else the generalist's."""
    answered = offload & (expert_labels != OTHER)
    return np.where(answered, expert_labels, gen_labels), answered
