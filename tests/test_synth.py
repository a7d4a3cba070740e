import numpy as np
import pytest

from askexpert.config import SynthConfig
from askexpert.data import synth
from askexpert.errors import DataError

SMALL = SynthConfig(num_groups=4, classes_per_group=3, train_per_class=20, test_per_class=5, seed=3)


def test_generation_is_deterministic_and_shaped_like_cifar() -> None:
    a, b = synth.generate(SMALL), synth.generate(SMALL)
    for split, per_class in (("train", 20), ("test", 5)):
        assert np.array_equal(a[split].images, b[split].images)
        assert np.array_equal(a[split].labels, b[split].labels)
        assert a[split].images.shape == (12 * per_class, 32, 32, 3)
        assert a[split].images.dtype == np.uint8
        assert np.bincount(a[split].labels).tolist() == [per_class] * 12
    other = synth.generate(SMALL.model_copy(update={"seed": 4}))
    assert not np.array_equal(a["train"].images, other["train"].images)


def test_classes_of_a_group_are_closer_than_classes_of_different_groups() -> None:
    data = synth.generate(SMALL.model_copy(update={"train_per_class": 60}))["train"]
    assert data.groups is not None
    means = np.stack([data.images[data.labels == c].reshape(-1, 32 * 32 * 3).mean(0) for c in range(12)])
    dist = np.linalg.norm(means[:, None] - means[None], axis=-1)
    same = data.groups[:, None] == data.groups[None, :]
    off_diag = ~np.eye(12, dtype=bool)
    assert dist[same & off_diag].max() < dist[~same].min()


def test_write_read_round_trip_and_clear_errors(tmp_path) -> None:
    synth.write(SMALL, tmp_path / "d")
    back = synth.read(tmp_path / "d", "test")
    ref = synth.generate(SMALL)["test"]
    assert np.array_equal(back.images, ref.images) and back.class_names == ref.class_names
    assert synth.stored_config(tmp_path / "d") == SMALL
    with pytest.raises(DataError, match="askexpert data synth"):
        synth.read(tmp_path / "nothing", "train")
    (tmp_path / "d" / "test.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="unreadable"):
        synth.read(tmp_path / "d", "test")
