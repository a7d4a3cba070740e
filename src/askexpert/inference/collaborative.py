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
from askexpert.protocol.backend import BackendError, ExpertBackend, ExpertReply, check_images, reply_answers
from askexpert.routing import Router

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
    expert: np.ndarray  # (N,) str: chosen expert id, "" when not offloaded
    reason: np.ndarray  # (N,) str: "" or why the fallback happened
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
        for e in np.unique(chosen[offload]):
            idx = np.flatnonzero(offload & (chosen == e))
            eid = self.partition.expert_ids[int(e)]
            expert[idx] = eid
            try:
                reply = self.backend.predict(eid, images[idx])
            except BackendError as exc:
                source[idx], reason[idx] = FALLBACK, f"{exc.reason}: {exc}"
                continue
            bad = _check_reply(reply, self._classes[int(e)], len(idx))
            if bad:
                source[idx], reason[idx] = FALLBACK, f"error: expert {eid} {bad}"
                continue
            confidence[idx] = reply.confidence
            if reply.info:
                share = dict(reply.info, bytes_sent=reply.info.get("bytes_sent", 0.0) / len(idx))
                for i in idx:
                    info[i] = share
            try:
                point = self.router.point
                answers = reply_answers(reply, self._classes[int(e)], probs[idx], point.combine, point.mix_weight)
            except BackendError as exc:
                source[idx], reason[idx] = FALLBACK, f"error: expert {eid} {exc}"
                continue
            final, answered = final_labels(gen_labels[idx], answers, np.ones(len(idx), dtype=bool))
            abstain = ~answered
            labels[idx] = final
            source[idx[~abstain]] = EXPERT
            source[idx[abstain]], reason[idx[abstain]] = FALLBACK, "abstain"
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
