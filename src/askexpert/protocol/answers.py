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
    if rule == "replace":
        return classes[expert_probs.argmax(axis=1)].astype(np.int64)
    if rule in POOLED_RULES:
        if gen_probs is None:
            raise ValueError(f"combination rule {rule!r} needs the generalist's probabilities")
        full = expert_full_distribution(expert_probs.astype(np.float64), classes, gen_probs)
        if rule == "mix":
            pooled = mix_weight * gen_probs + (1.0 - mix_weight) * full
        else:  # a floor keeps a probability that underflowed to 0 a finite veto, not -inf (and 0·-inf = nan)
            floor = np.finfo(np.float64).tiny
            gen_log = np.log(np.maximum(gen_probs.astype(np.float64), floor))
            pooled = mix_weight * gen_log + (1.0 - mix_weight) * np.log(np.maximum(full, floor))
        return pooled.argmax(axis=1).astype(np.int64)
    raise ValueError(f"unknown combination rule {rule!r}; choose one of {', '.join(COMBINE_RULES)}")


def final_labels(
    gen_labels: np.ndarray, expert_labels: np.ndarray, offload: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, answered): the expert's label where it was asked and did not abstain, else the generalist's."""
    answered = offload & (expert_labels != OTHER)
    return np.where(answered, expert_labels, gen_labels), answered
