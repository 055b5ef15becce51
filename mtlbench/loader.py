"""Batches are slices of pre-built tensors: one seeded permutation per epoch, no per-sample Python."""
from __future__ import annotations

from typing import Iterator

import torch

from mtlbench.data import Split

Batch = dict[str, torch.Tensor]


class BatchLoader:
    """Iterates over a split in batches of ``batch_size`` rows.

    With ``shuffle`` the rows are permuted once per epoch by ``generator`` (so the run seed fixes the order),
    then every batch is a contiguous view of the permuted tensors. Every row appears exactly once per epoch; a
    final batch of a single row is folded into the previous one (unless batch_size is 1), because BatchNorm cannot
    train on one row.
    """

    def __init__(self, split: Split, batch_size: int, shuffle: bool = False,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        # labelled rows per task of the batch last yielded, counted on the host copy of the masks (no device sync)
        self._host_masks = split.tensors.get("masks")
        self._host_masks = None if self._host_masks is None else self._host_masks.cpu()
        self.host_label_counts: torch.Tensor | None = None
        self.split = split if device is None else split.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator

    def __len__(self) -> int:
        n, b = len(self.split), self.batch_size
        k = -(-n // b)
        return k - 1 if k > 1 and b > 1 and n % b == 1 else k

    def bounds(self) -> list[tuple[int, int]]:
        n, b = len(self.split), self.batch_size
        starts = list(range(0, n, b))
        out = [(s, min(s + b, n)) for s in starts]
        if len(out) > 1 and b > 1 and out[-1][1] - out[-1][0] == 1:
            out[-2] = (out[-2][0], n)
            out.pop()
        return out

    def __iter__(self) -> Iterator[Batch]:
        tensors = self.split.tensors
        host = self._host_masks
        if self.shuffle:
            perm_host = torch.randperm(len(self.split), generator=self.generator)
            perm = perm_host.to(next(iter(tensors.values())).device)
            tensors = {k: v.index_select(0, perm) for k, v in tensors.items()}
            host = None if host is None else host.index_select(0, perm_host)
        for lo, hi in self.bounds():
            self.host_label_counts = None if host is None else host[lo:hi].sum(0)
            yield {k: v[lo:hi] for k, v in tensors.items()}
