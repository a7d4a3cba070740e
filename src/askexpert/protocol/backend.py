"""ExpertBackend: how the edge asks an expert, wherever the expert runs.

The classifier only needs `predict(expert_id, images) -> ExpertReply`.
`models.local_experts.LocalExpertBackend` runs the experts' checkpoints in the
calling process (the server, the evaluation, `classify --local-experts`), and
`inference.http_backend.HttpExpertBackend` asks a server over HTTP (whichever
engine, plain or Ray Serve, answers behind it). This module is the contract
between them and imports neither torch nor either side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from askexpert.errors import AskExpertError, RoutingError
from askexpert.protocol.answers import expert_answer, pair_answer, replace_pair, softmax


class BackendError(AskExpertError):
    """The expert could not answer (server down, timeout, error reply); `reason` heads the record's reason."""

    reason = "error"


class RefusingBackend:
    """Answers every call with one BackendError: an edge that must run alone (e.g. after a failed handshake)."""

    def __init__(self, error: BackendError) -> None:
        self.error = error

    def predict(self, expert_id: str, images: np.ndarray) -> ExpertReply:
        raise self.error


@dataclass(frozen=True)
class ExpertReply:
    """labels: global class ids, OTHER (-1) where the expert abstains; confidence: its softmax max.

    probs: (N, |S|+1) the expert's softmax over its outputs ("other" last), for rules that use
    both answers; None when the server did not send it.
    info: per-call facts a remote backend measured (bytes, encode/network/queue/compute ms).
    """

    labels: np.ndarray
    confidence: np.ndarray
    info: dict[str, float] = field(default_factory=dict)
    probs: np.ndarray | None = None

    def rows(self, idx: np.ndarray) -> ExpertReply:
        """The reply for some of the images it answered (`info` is per call, so it is kept whole)."""
        probs = None if self.probs is None else self.probs[idx]
        return ExpertReply(self.labels[idx], self.confidence[idx], self.info, probs)


class ExpertBackend(Protocol):
    def predict(self, expert_id: str, images: np.ndarray) -> ExpertReply: ...


def reply_from_logits(logits: np.ndarray, classes: np.ndarray) -> ExpertReply:
    """Map an expert's outputs back to global labels (`classes[i]` for output i, -1 = other)."""
    probs = softmax(logits)
    return ExpertReply(
        expert_answer(probs, classes), probs.max(axis=1).astype(np.float32), probs=probs.astype(np.float32)
    )


def reply_answers(
    reply: ExpertReply, classes: np.ndarray, gen_probs: np.ndarray, rule: str = "replace", mix_weight: float = 0.5
) -> np.ndarray:
    """The expert's global answers under the combination rule: one place for the live edge and the testbed.

    Raises BackendError when a rule that pools both answers gets a reply without probabilities.
    """
    if rule == "replace":
        return reply.labels
    if reply.probs is None:
        raise BackendError(f"sent no probabilities for '{rule}'")
    return expert_answer(reply.probs, classes, gen_probs, rule, mix_weight)


def add_call_info(total: dict[str, float], info: dict[str, float]) -> dict[str, float]:
    """What two sequential calls for one sample cost: times, bytes, retries and joules add up; `batch_size`
    (the server's merged batch each call rode in, the divisor of its compute time) does not."""
    out = {key: total.get(key, 0.0) + value for key, value in info.items()}
    if "batch_size" in info:
        out["batch_size"] = max(total.get("batch_size", 0.0), info["batch_size"])
    return out


def replies_answers(
    replies: Sequence[ExpertReply],
    classes: Sequence[np.ndarray],
    gen_probs: np.ndarray,
    rule: str = "replace",
    mix_weight: float = 0.5,
) -> np.ndarray:
    """One expert's reply, or two experts' on the same images (`pair_answer`), → global answers under the
    combination rule: one place for the live edge and the testbed."""
    if len(replies) == 1:
        return reply_answers(replies[0], classes[0], gen_probs, rule, mix_weight)
    if len(replies) != 2 or len(classes) != 2:
        raise ValueError(f"one or two experts' replies, each with its classes; got {len(replies)}, {len(classes)}")
    first, second = replies
    if rule == "replace":
        return replace_pair((first.labels, second.labels), (first.confidence, second.confidence))
    if first.probs is None or second.probs is None:
        raise BackendError(f"sent no probabilities for '{rule}'")
    return pair_answer((first.probs, second.probs), (classes[0], classes[1]), gen_probs, rule, mix_weight)


def check_images(images: np.ndarray, size: int | None = None) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        shape = getattr(images, "shape", None)
        raise RoutingError(
            f"images must be a uint8 array (N, H, W, 3); got {getattr(images, 'dtype', type(images))} {shape}"
        )
    if size is not None and images.shape[1:3] != (size, size):
        raise RoutingError(f"images are {images.shape[1]}×{images.shape[2]}, the models expect {size}×{size}")
