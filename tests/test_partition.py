import json
from pathlib import Path

import numpy as np
import pytest

from askexpert.errors import PartitionError
from askexpert.partition import (
    Partition,
    confusion_kept,
    confusion_partition,
    random_partition,
    superclass_partition,
    with_overlap,
)


def _covers_each_class_once(part: Partition) -> None:
    counts = part.membership().sum(axis=0)
    assert counts.tolist() == [1] * part.num_classes


def test_superclass_packs_whole_groups() -> None:
    groups = np.repeat(np.arange(20), 5)
    part = superclass_partition(groups, 5)
    _covers_each_class_once(part)
    assert [len(s) for s in part.subsets] == [20] * 5
    for subset in part.subsets:  # every group lies inside one expert
        assert all(np.isin(np.flatnonzero(groups == groups[c]), subset).all() for c in subset)


def test_random_is_balanced_and_seeded() -> None:
    a, b = random_partition(100, 3, seed=1), random_partition(100, 3, seed=1)
    _covers_each_class_once(a)
    assert a.subsets == b.subsets and sorted(len(s) for s in a.subsets) == [33, 33, 34]
    assert random_partition(100, 3, seed=2).subsets != a.subsets


def test_confusion_recovers_blocks_of_confused_classes() -> None:
    rng = np.random.default_rng(0)
    blocks = rng.permutation(np.repeat(np.arange(4), 6))  # 24 classes in 4 hidden blocks of 6
    conf = np.where(blocks[:, None] == blocks[None, :], 8, 0) + rng.integers(0, 2, (24, 24))
    np.fill_diagonal(conf, 50)
    part = confusion_partition(conf, 4, seed=0)
    _covers_each_class_once(part)
    assert sorted(len(s) for s in part.subsets) == [6, 6, 6, 6]
    for subset in part.subsets:
        assert len(set(blocks[list(subset)])) == 1
    assert part.stats["confusion_kept"] > 0.8
    assert confusion_kept(conf, random_partition(24, 4)) < part.stats["confusion_kept"]


def test_confusion_stays_balanced_when_clusters_are_uneven() -> None:
    conf = np.eye(10, dtype=int) * 20
    conf[:7, :7] += 5  # one big cluster of 7, three loners
    part = confusion_partition(conf, 2)
    assert sorted(len(s) for s in part.subsets) == [5, 5]


def test_overlap_adds_the_classes_confused_across_the_boundary(tmp_path: Path) -> None:
    conf = np.eye(8, dtype=int) * 50
    conf[0, 4] = conf[4, 0] = 20  # class 4 (expert 1) is often mistaken for class 0 (expert 0)
    conf[7, 1] = 9  # class 7 (expert 1) less so, for class 1
    conf[2, 5] = 3  # and class 2 (expert 0) a little, for class 5 (expert 1)
    base = Partition("confusion", 8, ("e0", "e1"), ((0, 1, 2, 3), (4, 5, 6, 7)))
    part = with_overlap(base, conf, 1)
    # each expert's own classes first, then the most confused outside one (confusion is symmetrised)
    assert part.subsets == ((0, 1, 2, 3, 4), (4, 5, 6, 7, 0))
    assert with_overlap(base, conf, 2).subsets == ((0, 1, 2, 3, 4, 7), (4, 5, 6, 7, 0, 1))
    assert part.membership().sum(axis=0).tolist() == [2, 1, 1, 1, 2, 1, 1, 1]
    assert confusion_kept(conf, part) > confusion_kept(conf, base)
    assert with_overlap(base, conf, 0) is base
    part.to_json(tmp_path / "p.json")
    assert Partition.from_json(tmp_path / "p.json").subsets == part.subsets


def test_overlap_needs_the_confusion_strategy() -> None:
    from askexpert.config import SystemConfig
    from askexpert.errors import ConfigError

    with pytest.raises(ConfigError, match="overlap=2 needs strategy 'confusion'"):
        SystemConfig.from_dict({"partition": {"strategy": "random", "overlap": 2}})


def test_json_round_trip_and_validation(tmp_path: Path) -> None:
    part = superclass_partition(np.repeat(np.arange(4), 3), 2)
    part.to_json(tmp_path / "p.json")
    assert Partition.from_json(tmp_path / "p.json") == part
    doc = json.loads((tmp_path / "p.json").read_text())
    doc["experts"][1]["classes"] = doc["experts"][1]["classes"][1:]
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(PartitionError, match=r"p.json: classes \[\d+\] belong to no expert"):
        Partition.from_json(tmp_path / "p.json")
    doc["experts"][1]["classes"] = [0, 99]
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(PartitionError, match="outside 0..11"):
        Partition.from_json(tmp_path / "p.json")
    (tmp_path / "p.json").write_text('{"format": "askexpert.partition/1"}')
    with pytest.raises(PartitionError, match="malformed partition file"):
        Partition.from_json(tmp_path / "p.json")
    with pytest.raises(PartitionError, match="not found"):
        Partition.from_json(tmp_path / "missing.json")
    with pytest.raises(PartitionError, match="unknown expert 'e7'"):
        part.index("e7")
    with pytest.raises(PartitionError, match="cannot split 3 classes into 4"):
        random_partition(3, 4)
