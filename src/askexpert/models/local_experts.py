"""Experts run in this process: the server's engines, the evaluation and `classify --local-experts`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from askexpert.errors import CheckpointError, RoutingError
from askexpert.models.checkpoint import load_checkpoint
from askexpert.models.meta import CheckpointMeta
from askexpert.models.predict import cpu_bfloat16_usable, predict_logits, resolve_device
from askexpert.models.registry import ImageClassifier
from askexpert.partition import Partition
from askexpert.protocol.answers import OTHER
from askexpert.protocol.backend import ExpertReply, check_images, reply_from_logits

if TYPE_CHECKING:
    from askexpert.system import SystemDir


class LocalExpertBackend:
    """Experts loaded in this process (the near-edge server uses this too).

    `flip` and `cpu_bfloat16` are `serving.test_time_flip` and `serving.cpu_bfloat16`: how
    the system's experts run, so that the server, the evaluation's cache and the testbed
    compute the same answers.
    """

    def __init__(
        self,
        experts: dict[str, tuple[ImageClassifier, CheckpointMeta]],
        device: str | torch.device = "cpu",
        flip: bool = False,
        cpu_bfloat16: bool = False,
    ):
        self.experts = experts
        self.device = resolve_device(device)
        self.flip = flip
        self.cpu_bfloat16 = cpu_bfloat16_usable(cpu_bfloat16, self.device)
        self._classes = {eid: np.asarray(meta.classes, dtype=np.int64) for eid, (_, meta) in experts.items()}

    @classmethod
    def from_dir(
        cls,
        folder: str | Path,
        partition: Partition,
        device: str | torch.device = "cpu",
        *,
        flip: bool,
        cpu_bfloat16: bool = False,
    ) -> LocalExpertBackend:
        """Load `<folder>/<id>.safetensors` for every expert of `partition`, checking subsets agree.

        `flip` has no default: a folder does not say how its system runs the experts (the
        mirror is on by default there). `of_system` runs them as a system's config says, which
        is what its server and evaluation do."""
        folder = Path(folder)
        experts = {}
        for eid, subset in zip(partition.expert_ids, partition.subsets, strict=True):
            model, meta = load_checkpoint(folder / f"{eid}.safetensors", device)
            if tuple(meta.classes[:-1]) != subset or meta.classes[-1] != OTHER:
                raise CheckpointError(
                    f"{folder / eid}.safetensors: trained for classes {meta.classes[:-1]}, "
                    f"but the partition gives expert {eid!r} {list(subset)}; retrain the experts"
                )
            experts[eid] = (model, meta)
        return cls(experts, device, flip, cpu_bfloat16)

    @classmethod
    def of_system(
        cls,
        system: SystemDir,
        schedule: str | None = None,
        device: str | torch.device = "cpu",
        cpu_bfloat16: bool | None = None,
    ) -> LocalExpertBackend:
        """A system's expert set (default: the served schedule), run as its `serving` section says
        (`cpu_bfloat16` overrides it: the testbed's edge execution models an edge CPU, in float32)."""
        cfg = system.config()
        return cls.from_dir(
            system.experts_dir(schedule or cfg.serving.schedule),
            system.partition(),
            device,
            flip=cfg.serving.test_time_flip,
            cpu_bfloat16=cfg.serving.cpu_bfloat16 if cpu_bfloat16 is None else cpu_bfloat16,
        )

    @property
    def expert_ids(self) -> tuple[str, ...]:
        return tuple(self.experts)

    def logits(self, expert_id: str, images: np.ndarray) -> np.ndarray:
        if expert_id not in self.experts:
            raise RoutingError(f"unknown expert {expert_id!r}; known: {', '.join(self.experts)}")
        check_images(images)
        return predict_logits(
            self.experts[expert_id][0], images, self.device, flip=self.flip, cpu_bfloat16=self.cpu_bfloat16
        )

    def predict(self, expert_id: str, images: np.ndarray) -> ExpertReply:
        return reply_from_logits(self.logits(expert_id, images), self._classes[expert_id])
