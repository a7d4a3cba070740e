"""Make `partition.json` for a system (`askexpert partition`).

`confusion` needs the trained generalist: its confusion matrix is measured on
the held-out validation split (never the test split).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix

from askexpert.errors import PartitionError
from askexpert.fingerprint import fingerprint
from askexpert.models import load_checkpoint, predict_logits, resolve_device
from askexpert.partition import (
    Partition,
    confusion_kept,
    confusion_partition,
    random_partition,
    superclass_partition,
    with_overlap,
)
from askexpert.system import SystemDir


def build_partition(system: SystemDir, force: bool = False) -> Partition:
    cfg = system.config()
    pc = cfg.partition
    key = fingerprint(
        "partition",
        pc.model_dump(),
        cfg.data.model_dump(),
        system.generalist_path.with_suffix(".json").read_text()
        if pc.strategy == "confusion" and system.generalist_path.is_file()
        else None,
    )
    if not force and system.partition_path.is_file():
        existing = system.partition()
        if existing.stats.get("fingerprint") == key:
            return existing
    splits = system.splits()
    num_classes = splits.train.num_classes
    confusion = None
    if system.generalist_path.is_file():
        model, _ = load_checkpoint(system.generalist_path)
        device = resolve_device(cfg.device)
        pred = predict_logits(model, splits.val.images, device).argmax(1)
        confusion = confusion_matrix(splits.val.labels, pred, labels=np.arange(num_classes))
    if pc.strategy == "superclass":
        if splits.train.groups is None:
            raise PartitionError("strategy 'superclass' needs a data source with coarse groups (synth or cifar100)")
        part = superclass_partition(splits.train.groups, pc.num_experts, pc.seed)
    elif pc.strategy == "random":
        part = random_partition(num_classes, pc.num_experts, pc.seed)
    else:
        if confusion is None:
            raise PartitionError(
                f"strategy 'confusion' needs the generalist ({system.generalist_path}); "
                "run `askexpert train generalist` first"
            )
        part = with_overlap(confusion_partition(confusion, pc.num_experts, pc.seed), confusion, pc.overlap)
    if confusion is not None:
        part.stats["confusion_kept"] = confusion_kept(confusion, part)
    part.stats["fingerprint"] = key
    part.to_json(system.partition_path)
    return part
