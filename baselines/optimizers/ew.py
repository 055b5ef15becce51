"""Equal weighting: the sum of the task losses, one backward."""
from __future__ import annotations

import torch

from mtlbench import MTLOptimizer, StepContext, register_optimizer


@register_optimizer("ew")
class EqualWeighting(MTLOptimizer):
    """Equal weighting: minimise the plain sum of task losses (every weight 1)."""

    def step(self, ctx: StepContext) -> None:
        ctx.backward()
        self.last_weights = torch.ones(ctx.n_tasks)
