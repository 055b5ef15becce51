"""Reference rows of a merging table, expressed as mergers so they are stored and tabled like every method.

- ``pretrained``: θ0 itself with the frozen per-task heads (the zero-shot row of the merging papers).
- ``experts``: each task evaluated with its own fine-tuned expert (the "individual" row; needs the task id);
  the denominator of normalised accuracy.
"""
from __future__ import annotations

import torch

from mtlbench.merging import MergeContext, MergeOutput, Merger, TaskVectors
from mtlbench.registry import register_merger


@register_merger("pretrained")
class Pretrained(Merger):
    """Reference: the pretrained encoder θ0, no expert used (zero-shot with the frozen heads)."""

    data_access = "none"

    def merge(self, tv: TaskVectors, ctx: MergeContext) -> MergeOutput:
        return MergeOutput(shared=torch.zeros_like(tv.base))


@register_merger("experts")
class Experts(Merger):
    """Reference: every task with its own fine-tuned expert (T encoders; needs the task id at inference)."""

    data_access = "none"
    needs_task_id = True

    def merge(self, tv: TaskVectors, ctx: MergeContext) -> MergeOutput:
        return MergeOutput(per_task=tv.matrix)
