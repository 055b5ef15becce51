"""TALL-masks (Wang, Dimitriadis et al., "Localizing Task Information for Improved Model Merging and
Compression", ICML 2024; official code nik-dim/tall_masks, ``src/utils/tallmask_utils.py``).

Multi-task vector τMTL = Σt τt (unscaled; ``use_ties=True`` takes the TIES dis-sum k = 20 merge instead, the
official ``method.use_ties``). Per task a mask ``m_t = |τt| > λt · |τMTL − τt|`` (strict, as the code; the
README's pseudo-code too) and the reconstructed expert θ̂t = θ0 + m_t ⊙ τMTL (scaling 1.0). λt ∈ {0.2, …, 0.6}
is chosen *per task* by that task's validation accuracy (``find_optimal_mask``). The result is T encoders that
share θ0 and τMTL plus T bit masks: it needs the task id at inference (a compression method, not one model).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mtlbench.merging import MergeContext, MergeOutput, Merger, TaskVectors, tall_masks, ties_merge
from mtlbench.registry import register_merger

GRID = (0.2, 0.3, 0.4, 0.5, 0.6)


def multi_task_vector(tv: TaskVectors, use_ties: bool) -> torch.Tensor:
    return ties_merge(tv.matrix, 0.2, "sum") if use_ties else tv.matrix.sum(0)


def select_masks(tv: TaskVectors, ctx: MergeContext, multi: torch.Tensor, grid: tuple[float, ...],
                 fixed: float | None) -> tuple[torch.Tensor, list[float], list[dict]]:
    """Per-task λ on validation (each task's own accuracy, first best on ties) and the chosen masks [T, D]."""
    if fixed is not None:
        lam = [float(fixed)] * tv.n_tasks
        return tall_masks(tv.matrix, multi, torch.tensor(lam).to(tv.matrix)), lam, []
    best = [(-1.0, grid[0])] * tv.n_tasks
    curve = []
    for c in grid:
        masks = tall_masks(tv.matrix, multi, torch.tensor(c).to(tv.matrix))
        acc = ctx.val_accuracy(masks * multi)
        curve.append({"lambda": c, "val_accuracy": acc})
        ctx.log(f"  tall lambda={c:g}: val " + " ".join(f"{t} {acc[t]:.3f}" for t in tv.tasks))
        for i, t in enumerate(tv.tasks):
            if acc[t] > best[i][0]:
                best[i] = (acc[t], c)
    lam = [b[1] for b in best]
    return tall_masks(tv.matrix, multi, torch.tensor(lam).to(tv.matrix)), lam, curve


@register_merger("tall_masks")
class TallMasks(Merger):
    """TALL-masks: per-task masks on the summed task vectors, λ per task on validation; needs the task id."""

    needs_task_id = True

    @dataclass
    class Options:
        lambda_grid: tuple[float, ...] = GRID
        lambda_: float | None = None     # one fixed λ for every task (FusionBench uses 0.6): data-free
        use_ties: bool = False

        def __post_init__(self) -> None:
            if not self.lambda_grid:
                raise ValueError("lambda_grid must not be empty")

    @property
    def access(self) -> str:
        return "none" if self.options.lambda_ is not None else "labelled_val"

    def merge(self, tv: TaskVectors, ctx: MergeContext) -> MergeOutput:
        o = self.options
        multi = multi_task_vector(tv, o.use_ties)
        masks, lam, curve = select_masks(tv, ctx, multi, o.lambda_grid, o.lambda_)
        info = {"lambdas": dict(zip(tv.tasks, lam)), "selection": curve,
                "mask_density": dict(zip(tv.tasks, masks.float().mean(1).tolist())),
                "extra_storage_bits": int(masks.numel())}
        return MergeOutput(per_task=masks * multi, info=info)
