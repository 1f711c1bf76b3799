"""The batch order: a pure function of (seed, epoch), sharded by rank within each global batch."""
from __future__ import annotations

import pytest
import torch

from distsparse.config import load_config
from distsparse.data.loader import TensorLoader, build_data
from distsparse.errors import ConfigError
from tests.conftest import SMALL


def _loader(rank: int = 0, world_size: int = 1, train: bool = True, augment: bool = True) -> TensorLoader:
    images = torch.arange(40 * 28 * 28, dtype=torch.int64).remainder(251).to(torch.uint8).view(40, 28, 28)
    labels = torch.arange(40) % 10
    mean, std = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    return TensorLoader(images, labels, 8, 3, train, augment, mean, std, rank, world_size)


def test_ranks_split_each_global_batch_into_contiguous_slices():
    whole = list(_loader().batches(1))
    ranks = [list(_loader(r, 2).batches(1)) for r in range(2)]
    assert len(whole) == len(ranks[0]) == len(ranks[1]) == 5
    for b, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([ranks[0][b][0], ranks[1][b][0]]), x)
        assert torch.equal(torch.cat([ranks[0][b][1], ranks[1][b][1]]), y)


def test_an_epoch_is_a_permutation_and_epochs_differ():
    labels = [torch.cat([y for _, y in _loader(augment=False).batches(e)]) for e in (0, 1)]
    assert sorted(labels[0].tolist()) == sorted((torch.arange(40) % 10).tolist())
    assert not torch.equal(labels[0], labels[1])


def test_starting_mid_epoch_replays_the_same_batches():
    whole = list(_loader().batches(2))
    tail = list(_loader().batches(2, start=3))
    assert len(tail) == 2
    for (xa, ya), (xb, yb) in zip(whole[3:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_augmentation_flips_and_shifts_within_the_padding():
    plain = torch.cat([x for x, _ in _loader(augment=False).batches(0)])
    augmented = torch.cat([x for x, _ in _loader(augment=True).batches(0)])
    assert not torch.equal(plain, augmented)
    assert plain.shape == augmented.shape == (40, 1, 28, 28)


def test_test_split_is_sequential_unaugmented_and_complete():
    batches = list(_loader(train=False).batches(0))
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(40) % 10)


def test_test_set_is_normalized_with_training_statistics(tmp_path):
    data = build_data(load_config(None, [*SMALL, f"run.dir={tmp_path}"]))
    assert data.test.mean is data.train.mean and data.test.std is data.train.std


def test_batch_larger_than_the_training_set_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size"):
        build_data(load_config(None, [*SMALL, "train.batch_size=512", f"run.dir={tmp_path}"]))


def test_global_batch_must_divide_among_ranks():
    with pytest.raises(ConfigError, match="multiple of the world size 3"):
        _loader(0, 3)


def test_synthetic_test_split_shares_the_training_classes(tmp_path):
    """Nearest class centroid of the training split must be far above chance on the test split."""
    data = build_data(load_config(None, [*SMALL, "data.augment=false", f"run.dir={tmp_path}"]))
    x_train = torch.cat([x for x, _ in data.train.batches(0)]).flatten(1)
    y_train = torch.cat([y for _, y in data.train.batches(0)])
    centroids = torch.stack([x_train[y_train == c].mean(0) for c in range(data.num_classes)])
    x_test = torch.cat([x for x, _ in data.test.batches(0)]).flatten(1)
    y_test = torch.cat([y for _, y in data.test.batches(0)])
    nearest = torch.cdist(x_test, centroids).argmin(1)
    assert (nearest == y_test).float().mean() > 0.9
