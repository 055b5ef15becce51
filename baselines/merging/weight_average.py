"""Weight averaging (model soup / "simple average"; Wortsman et al., ICML 2022; the "Weight Averaging" row of
Task Arithmetic, TIES and AdaMerging): θ = mean_t θt = θ0 + (1/T) Σ τt. Data-free, no hyper-parameter.
Official behaviour as FusionBench's ``SimpleAverageAlgorithm`` (tanganke/fusion_bench).
"""
from __future__ import annotations

from mtlbench.merging import MergeContext, MergeOutput, Merger, TaskVectors
from mtlbench.registry import register_merger


@register_merger("weight_average")
class WeightAverage(Merger):
    """Weight averaging: the mean of the experts' weights (data-free)."""

    data_access = "none"

    def merge(self, tv: TaskVectors, ctx: MergeContext) -> MergeOutput:
        return MergeOutput(shared=tv.matrix.mean(0))
