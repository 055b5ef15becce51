"""Consensus Merging (Wang, Dimitriadis et al., ICML 2024, same paper as TALL-masks; official code
nik-dim/tall_masks, ``construct_consensus_mask``).

Count per weight how many tasks' TALL masks (λt chosen per task on validation, as the official code loads
them) keep it; keep the weight iff the count ≥ k (k = 2, ``config/method/consensus.yaml``: drops "catastrophic"
weights used by no task and "selfish" weights used by one); θ = θ0 + α · (τMTL ⊙ consensus) with α ∈ {0.1, …,
1.0} on validation by average normalised accuracy. τMTL is the plain sum (Consensus-TA; ``use_ties=True``:
Consensus-TIES with the TIES dis-sum k = 20 vector). k = 0 is Task Arithmetic, k > T is θ0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mtlbench.baselines.merging.tall_masks import GRID as TALL_GRID, multi_task_vector, select_masks
from mtlbench.merging import MergeContext, MergeOutput, Merger, TaskVectors
from mtlbench.registry import register_merger

GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@register_merger("consensus")
class Consensus(Merger):
    """Consensus merging: keep weights that at least k tasks' TALL masks use; α chosen on validation."""

    @dataclass
    class Options:
        k: int = 2
        alpha_grid: tuple[float, ...] = GRID
        alpha: float | None = None
        tall_lambda_grid: tuple[float, ...] = TALL_GRID
        tall_lambda: float | None = None
        use_ties: bool = False
        select: Literal["normalized", "mean"] = "normalized"

        def __post_init__(self) -> None:
            if self.k < 0:
                raise ValueError(f"k must be >= 0, got {self.k}")
            if not self.alpha_grid or not self.tall_lambda_grid:
                raise ValueError("the alpha and tall lambda grids must not be empty")

    @property
    def access(self) -> str:
        o = self.options
        return "none" if (o.alpha is not None and (o.tall_lambda is not None or o.k == 0)) else "labelled_val"

    def merge(self, tv: TaskVectors, ctx: MergeContext) -> MergeOutput:
        o = self.options
        multi = multi_task_vector(tv, o.use_ties)
        info: dict = {}
        if o.k == 0:  # every weight kept: no masks needed (official: plain TA / TIES)
            kept = multi
        else:
            masks, lam, curve = select_masks(tv, ctx, multi, o.tall_lambda_grid, o.tall_lambda)
            consensus = masks.sum(0) >= o.k
            kept = multi * consensus
            info.update(tall_lambdas=dict(zip(tv.tasks, lam)), tall_selection=curve,
                        kept_share=float(consensus.float().mean()))
        if o.alpha is not None:
            return MergeOutput(shared=o.alpha * kept, info={**info, "alpha": o.alpha})
        alpha, delta, sel = ctx.grid_search(o.alpha_grid, lambda c: c * kept, o.select, name="alpha")
        return MergeOutput(shared=delta, info={**info, "alpha": alpha, "selection": sel})
