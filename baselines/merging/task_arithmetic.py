"""Task Arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023; official code
mlfoundations/task_vectors): θ = θ0 + λ Σt τt with one scalar λ.

Defaults follow the official evaluation as tall_masks runs it (``src/eval/eval.py::evaluate_task_vector``):
λ ∈ {0.1, …, 1.0} chosen on the *validation* splits by average normalised accuracy (merged / expert), then
evaluated once on test. ``lambda_`` fixes λ instead (data-free; AdaMerging's and FusionBench's runs use 0.3).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mtlbench.merging import MergeContext, MergeOutput, Merger, TaskVectors
from mtlbench.registry import register_merger

GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@register_merger("task_arithmetic")
class TaskArithmetic(Merger):
    """Task Arithmetic: θ0 + λ·Σ task vectors, λ chosen on validation (or fixed: data-free)."""

    @dataclass
    class Options:
        lambda_grid: tuple[float, ...] = GRID
        lambda_: float | None = None      # fixed λ: no data at all
        select: Literal["normalized", "mean"] = "normalized"

        def __post_init__(self) -> None:
            if not self.lambda_grid:
                raise ValueError("lambda_grid must not be empty")

    @property
    def access(self) -> str:
        return "none" if self.options.lambda_ is not None else "labelled_val"

    def merge(self, tv: TaskVectors, ctx: MergeContext) -> MergeOutput:
        total = tv.matrix.sum(0)
        if self.options.lambda_ is not None:
            return MergeOutput(shared=self.options.lambda_ * total, info={"lambda": self.options.lambda_})
        lam, delta, curve = ctx.grid_search(self.options.lambda_grid, lambda c: c * total, self.options.select)
        return MergeOutput(shared=delta, info={"lambda": lam, "selection": curve})
