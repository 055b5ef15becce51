"""TIES-Merging (Yadav et al., "Resolving Interference When Merging Models", NeurIPS 2023; official code
prateeky2806/ties-merging, ``src/utils/merge_utils.py``).

On the flattened task vectors: (1) trim: keep each task's top-k % entries by magnitude (k = 20, threshold by
``kthvalue``, ties kept); (2) elect: γ = sign of the summed trimmed vectors (sign with more mass; an exact zero
takes the sign of the grand total); (3) disjoint merge: per entry, the mean over the tasks whose trimmed entry
agrees with γ (``dis-mean``); θ = θ0 + λ τm. Defaults are the official README's ``topk20_mass_dis-mean`` with
λ ∈ {0.8, 0.9, …, 2.5} chosen on validation (``resolve_lambda_code``), here by average normalised accuracy.
``aggregate="sum"`` is the dis-sum variant used by AdaMerging, tall_masks and FusionBench (then tune λ lower).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mtlbench.merging import MergeContext, MergeOutput, Merger, TaskVectors, ties_merge
from mtlbench.registry import register_merger

GRID = tuple(round(0.8 + 0.1 * i, 1) for i in range(18))  # 0.8 .. 2.5


@register_merger("ties")
class Ties(Merger):
    """TIES-Merging: trim to top-k %, elect signs by mass, disjoint mean; λ chosen on validation."""

    @dataclass
    class Options:
        k: float = 0.2
        aggregate: Literal["mean", "sum"] = "mean"
        lambda_grid: tuple[float, ...] = GRID
        lambda_: float | None = None
        select: Literal["normalized", "mean"] = "normalized"

        def __post_init__(self) -> None:
            if not 0 < self.k <= 1:
                raise ValueError(f"k (share of entries kept) must be in (0, 1], got {self.k}")
            if not self.lambda_grid:
                raise ValueError("lambda_grid must not be empty")

    @property
    def access(self) -> str:
        return "none" if self.options.lambda_ is not None else "labelled_val"

    def merge(self, tv: TaskVectors, ctx: MergeContext) -> MergeOutput:
        o = self.options
        merged = ties_merge(tv.matrix, o.k, o.aggregate)
        info = {"kept_share": float((merged != 0).float().mean())}
        if o.lambda_ is not None:
            return MergeOutput(shared=o.lambda_ * merged, info={**info, "lambda": o.lambda_})
        lam, delta, curve = ctx.grid_search(o.lambda_grid, lambda c: c * merged, o.select)
        return MergeOutput(shared=delta, info={**info, "lambda": lam, "selection": curve})
