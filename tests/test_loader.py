"""BatchLoader: coverage of every row once per epoch, tail folding, seeded order, row alignment."""
from __future__ import annotations

import pytest
import torch

from mtlbench.data import Split
from mtlbench.loader import BatchLoader


def make_split(n: int) -> Split:
    """Row i carries i in every tensor, so any misalignment between tensors is visible."""
    idx = torch.arange(n)
    dense = torch.stack([idx.float(), -idx.float()], dim=1)
    categorical = torch.stack([idx, idx % 7], dim=1).long()
    labels = torch.stack([(idx % 2).float(), idx.float() * 10.0], dim=1)
    masks = torch.stack([idx % 3 == 0, idx % 2 == 1], dim=1)
    return Split({"categorical": categorical, "dense": dense, "labels": labels, "masks": masks})


def row_ids(batch) -> list[int]:
    return batch["categorical"][:, 0].tolist()


SIZES = [(1, 1), (1, 4), (2, 1), (5, 1),
         (2, 4), (3, 2), (5, 2), (7, 3), (10, 3), (10, 5), (11, 5), (12, 5), (16, 5),
         (17, 4), (100, 7), (99, 33), (100, 33), (101, 100), (1000, 64), (1025, 1024), (1024, 1024)]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("n,b", SIZES)
def test_every_row_once_per_epoch(n, b, shuffle):
    loader = BatchLoader(make_split(n), b, shuffle=shuffle, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        batches = list(loader)
        ids = [i for batch in batches for i in row_ids(batch)]
        assert sorted(ids) == list(range(n))
        assert len(batches) == len(loader)
        sizes = [len(row_ids(bt)) for bt in batches]
        assert all(0 < s <= b + 1 for s in sizes)
        # every batch but the last is full; the last may carry the folded single-row tail
        assert all(s == b for s in sizes[:-1])
        if b > 1 and n > 1:
            assert 1 not in sizes, sizes
        if n % b == 1 and n > b:
            assert sizes[-1] == b + 1
        if not shuffle:
            assert ids == list(range(n))


def test_len_counts():
    assert len(BatchLoader(make_split(10), 5)) == 2
    assert len(BatchLoader(make_split(11), 5)) == 2  # 5, 6
    assert len(BatchLoader(make_split(12), 5)) == 3  # 5, 5, 2
    assert len(BatchLoader(make_split(1), 5)) == 1
    assert len(BatchLoader(make_split(6), 5)) == 1  # 6
    assert [len(row_ids(bt)) for bt in BatchLoader(make_split(11), 5)] == [5, 6]


def _order(loader) -> list[list[int]]:
    return [row_ids(bt) for bt in loader]


def test_same_seed_same_order_different_seed_different_order():
    split = make_split(200)
    a = BatchLoader(split, 16, shuffle=True, generator=torch.Generator().manual_seed(123))
    b = BatchLoader(split, 16, shuffle=True, generator=torch.Generator().manual_seed(123))
    c = BatchLoader(split, 16, shuffle=True, generator=torch.Generator().manual_seed(124))
    a1, a2 = _order(a), _order(a)
    assert a1 == _order(b)
    assert a2 == _order(b)  # the second epoch too
    assert a1 != _order(c)
    assert a1 != a2  # two epochs of one loader are permuted differently
    assert a1 != _order(BatchLoader(split, 16, shuffle=False))


def test_order_does_not_depend_on_global_rng_when_generator_given():
    split = make_split(100)
    torch.manual_seed(0)
    a = _order(BatchLoader(split, 10, shuffle=True, generator=torch.Generator().manual_seed(5)))
    torch.manual_seed(999)
    b = _order(BatchLoader(split, 10, shuffle=True, generator=torch.Generator().manual_seed(5)))
    assert a == b


@pytest.mark.parametrize("n,b", [(97, 10), (64, 64), (33, 16)])
def test_batches_stay_row_aligned_after_shuffle(n, b):
    loader = BatchLoader(make_split(n), b, shuffle=True, generator=torch.Generator().manual_seed(7))
    for _ in range(2):
        for batch in loader:
            i = batch["categorical"][:, 0]
            assert set(batch) == {"categorical", "dense", "labels", "masks"}
            assert torch.equal(batch["dense"][:, 0], i.float())
            assert torch.equal(batch["dense"][:, 1], -i.float())
            assert torch.equal(batch["categorical"][:, 1], i % 7)
            assert torch.equal(batch["labels"][:, 0], (i % 2).float())
            assert torch.equal(batch["labels"][:, 1], i.float() * 10.0)
            assert torch.equal(batch["masks"][:, 0], i % 3 == 0)
            assert torch.equal(batch["masks"][:, 1], i % 2 == 1)
            assert batch["categorical"].dtype == torch.int64 and batch["masks"].dtype == torch.bool


def test_shuffle_does_not_mutate_split():
    split = make_split(50)
    before = {k: v.clone() for k, v in split.tensors.items()}
    list(BatchLoader(split, 8, shuffle=True, generator=torch.Generator().manual_seed(0)))
    for k, v in split.tensors.items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("b", [0, -1, -100])
def test_bad_batch_size_raises(b):
    with pytest.raises(ValueError):
        BatchLoader(make_split(10), b)
