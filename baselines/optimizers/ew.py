"""Equal weighting: the sum of the task losses, one backward."""
from __future__ import annotations

import torch

from mtlbench import JacobianMethod, StepContext, register_optimizer


@register_optimizer("ew")
class EqualWeighting(JacobianMethod):
    """Equal weighting: minimise the plain sum of task losses (every weight 1)."""

    requires = frozenset()  # one backward of the summed loss; no per-task gradients needed

    def aggregate(self, J, losses, generator):
        """As an aggregator (e.g. inside F-MTL): the sum of the task gradients."""
        w = torch.ones(J.shape[0], dtype=J.dtype, device=J.device)
        return J.sum(0), w

    def step(self, ctx: StepContext) -> None:
        ctx.backward()
        self.last_weights = torch.ones(ctx.n_tasks)
