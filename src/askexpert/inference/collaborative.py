"""CollaborativeClassifier: generalist on the edge, one expert near the edge when unsure.

Per sample it returns the label, where it came from (`edge`, `expert`,
`fallback`), the chosen expert, the generalist's Top-k, and the expert's
confidence. When the expert answers "other" or cannot be reached, the
generalist's label stands (source `fallback`, with the reason).

The generalist is anything with `num_outputs` that maps a uint8 batch to logits:
`models.onnx_runtime.OnnxGeneralist` on a torch-free edge, or
`models.TorchGeneralist` where the training stack is installed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from askexpert.partition import Partition
from askexpert.protocol import final_labels, softmax
from askexpert.protocol.backend import (
    BackendError,
    ExpertBackend,
    ExpertReply,
    add_call_info,
    check_images,
    replies_answers,
)
from askexpert.routing import NO_SECOND, Router

EDGE, EXPERT, FALLBACK = "edge", "expert", "fallback"


class Generalist(Protocol):
    """The edge model in any runtime: uint8 NHWC images in, logits (N, num_outputs) out."""

    num_outputs: int

    def __call__(self, images: np.ndarray, batch_size: int = ...) -> np.ndarray: ...


@dataclass
class Predictions:
    """Column arrays, one row per input image."""

    labels: np.ndarray  # (N,) int64 final global label
    source: np.ndarray  # (N,) str: edge | expert | fallback
    expert: np.ndarray  # (N,) str: chosen expert id ("a+b" when two were asked), "" when not offloaded
    reason: np.ndarray  # (N,) str: "" or why the fallback happened (or why one of two experts did not answer)
    generalist_labels: np.ndarray  # (N,) int64
    topk_classes: np.ndarray  # (N, k) int64
    topk_probs: np.ndarray  # (N, k) float32
    expert_confidence: np.ndarray  # (N,) float32, NaN when no expert answered
    call_info: list[dict[str, float]] = field(default_factory=list)  # per sample: what its expert call measured
    edge_ms: float = float("nan")  # generalist + router time for the whole call

    def __len__(self) -> int:
        return len(self.labels)

    def record(self, i: int) -> dict[str, Any]:
        conf = float(self.expert_confidence[i])
        return {
            "label": int(self.labels[i]),
            "source": str(self.source[i]),
            "expert": str(self.expert[i]) or None,
            "reason": str(self.reason[i]) or None,
            "generalist_label": int(self.generalist_labels[i]),
            "topk": [[int(c), float(p)] for c, p in zip(self.topk_classes[i], self.topk_probs[i], strict=True)],
            "expert_confidence": None if np.isnan(conf) else conf,
            **(self.call_info[i] if self.call_info else {}),
        }


def _check_reply(reply: ExpertReply, classes: np.ndarray, n: int) -> str:
    """What is wrong with an expert's reply ("" if nothing): a wrong answer must become a fallback."""
    if np.shape(reply.labels) != (n,):
        return f"answered {np.shape(reply.labels)} labels for {n} images"
    outside = ~np.isin(reply.labels, classes)
    if outside.any():
        return f"answered labels outside its classes: {sorted(set(reply.labels[outside].tolist()))[:5]}"
    if reply.probs is not None and np.shape(reply.probs) != (n, len(classes)):
        return f"sent probabilities of shape {np.shape(reply.probs)}, expected {(n, len(classes))}"
    return ""


def _rows_of(call: tuple[np.ndarray, ExpertReply | str], idx: np.ndarray) -> ExpertReply | str:
    """The part of one expert call's reply that answers images `idx` (positions in the caller's batch)."""
    asked, reply = call
    return reply if isinstance(reply, str) else reply.rows(np.searchsorted(asked, idx))


class CollaborativeClassifier:
    def __init__(
        self,
        generalist: Generalist,
        router: Router,
        partition: Partition,
        backend: ExpertBackend,
        batch_size: int = 512,
    ) -> None:
        """`router` carries the operating point (its RoutingConfig): the gate, τ, k and the combination rule."""
        if router.num_experts != partition.num_experts:
            raise ValueError(f"router has {router.num_experts} experts, partition {partition.num_experts}")
        if generalist.num_outputs != partition.num_classes:
            raise ValueError(
                f"generalist has {generalist.num_outputs} outputs, partition covers {partition.num_classes} classes"
            )
        self.generalist = generalist
        self.router = router
        self.partition = partition
        self.backend = backend
        self.batch_size = batch_size
        self._classes = partition.output_classes()

    @property
    def _rule(self) -> tuple[str, float]:
        return self.router.point.combine, self.router.point.mix_weight

    def _ask(self, e: int, images: np.ndarray) -> ExpertReply | str:
        """Expert e's checked reply, or why it gave none (the fallback's reason)."""
        eid = self.partition.expert_ids[e]
        try:
            reply = self.backend.predict(eid, images)
        except BackendError as exc:
            return f"{exc.reason}: {exc}"
        bad = _check_reply(reply, self._classes[e], len(images))
        return f"error: expert {eid} {bad}" if bad else reply

    def edge_probs(self, images: np.ndarray) -> np.ndarray:
        return softmax(self.generalist(images, self.batch_size))

    def __call__(self, images: np.ndarray) -> Predictions:
        check_images(images)
        start = time.perf_counter()
        probs = self.edge_probs(images)
        decision = self.router(probs)
        edge_ms = (time.perf_counter() - start) * 1e3
        gen_labels = probs.argmax(axis=1).astype(np.int64)
        n = len(images)
        labels = gen_labels.copy()
        source = np.full(n, EDGE, dtype=object)
        expert = np.full(n, "", dtype=object)
        reason = np.full(n, "", dtype=object)
        confidence = np.full(n, np.nan, dtype=np.float32)
        info: list[dict[str, float]] = [{} for _ in range(n)]
        offload = decision.offload
        chosen = decision.expert
        pair = offload & (decision.second != NO_SECOND)
        second = np.where(pair, decision.second, NO_SECOND)
        # one call per expert, for every image that asks it (as the router's first choice or its second)
        calls: dict[int, tuple[np.ndarray, ExpertReply | str]] = {}
        for e in np.unique(np.concatenate([chosen[offload], second[pair]])):
            asked = np.flatnonzero((offload & (chosen == e)) | (second == e))
            reply = self._ask(int(e), images[asked])
            calls[int(e)] = (asked, reply)
            if isinstance(reply, ExpertReply) and reply.info:
                share = dict(reply.info, bytes_sent=reply.info.get("bytes_sent", 0.0) / len(asked))
                for i in asked:  # a sample that asked two experts paid for both calls
                    info[i] = add_call_info(info[i], share)
        for a, b in sorted({(int(x), int(y)) for x, y in zip(chosen[offload], second[offload], strict=True)}):
            idx = np.flatnonzero(offload & (chosen == a) & (second == b))
            asked_experts = [a] if b == NO_SECOND else [a, b]
            name = "+".join(self.partition.expert_ids[e] for e in asked_experts)
            expert[idx] = name
            got = [(e, _rows_of(calls[e], idx)) for e in asked_experts]
            ok = [(e, r) for e, r in got if isinstance(r, ExpertReply)]
            failed = [str(r) for _, r in got if not isinstance(r, ExpertReply)]
            if not ok:
                source[idx], reason[idx] = FALLBACK, failed[0]
                continue
            try:
                answers = replies_answers(
                    [r for _, r in ok], [self._classes[e] for e, _ in ok], probs[idx], *self._rule
                )
            except BackendError as exc:
                source[idx], reason[idx] = FALLBACK, f"error: expert {name} {exc}"
                continue
            confidence[idx] = np.max([r.confidence for _, r in ok], axis=0)
            final, answered = final_labels(gen_labels[idx], answers, np.ones(len(idx), dtype=bool))
            labels[idx] = final
            source[idx[answered]] = EXPERT
            source[idx[~answered]], reason[idx[~answered]] = FALLBACK, "abstain"
            if failed:  # a pair answered by one of its experts: say why the other did not
                reason[idx[answered]] = f"one expert answered; {failed[0]}"
        return Predictions(
            labels,
            source.astype(str),
            expert.astype(str),
            reason.astype(str),
            gen_labels,
            decision.topk_classes,
            decision.topk_probs.astype(np.float32),
            confidence,
            info,
            edge_ms,
        )
