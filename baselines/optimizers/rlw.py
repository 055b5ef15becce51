"""RLW: Random Loss Weighting, from "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task
Learning", Lin, Ye, Zhang & Tsang, TMLR 2022 (arXiv 2111.10603; first version titled "A Closer Look at Loss
Weighting in Multi-Task Learning").

Every step draws fresh task weights ``lambda`` from a distribution and minimises ``sum_i lambda_i L_i`` (one
backward). The paper's default (its RLW algorithm; LibMTL's ``dist='Normal'``) samples
``lambda~ ~ N(0, I)`` and normalises with a softmax, ``lambda = softmax(lambda~)``, so the weights are positive
and sum to 1. The paper also studies other sampling distributions; following the authors' own implementation
(LibMTL ``RLW``, by the first author) they are:

- ``uniform``: softmax of U(0, 1) samples;
- ``dirichlet``: softmax of a Dirichlet(1, ..., 1) sample (LibMTL applies the softmax to it too; drawn here as
  normalised Exp(1) variables, which is exactly Dirichlet(1));
- ``bernoulli``: independent Bernoulli(1/2) 0/1 weights, redrawn while all are 0, not normalised;
- ``constrained_bernoulli``: one task drawn uniformly gets weight 1, the others 0.

Scaling convention: the paper, LibMTL and torchjd (``scalarization.Random``, ``aggregation.Random``) use weights
summing to 1 (``scale="one"``, the default), i.e. about 1/T of ``ew``'s sum of losses; ``scale="n_tasks"``
multiplies every weight by T so the expected weights match ``ew``'s scale (this matters for the effective
strength of weight decay and for plain SGD, not for Adam's step size).

Randomness comes only from the run's seeded generator (``ctx.generator``): same seed, same weights. As an
aggregator (:meth:`aggregate`, e.g. inside a wrapper) it is the paper's RGW, random weights on the task gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mtlbench import JacobianMethod, StepContext, register_optimizer

DISTRIBUTIONS = ("normal", "uniform", "dirichlet", "bernoulli", "constrained_bernoulli")


def rlw_weights(n_tasks: int, generator: torch.Generator | None = None, distribution: str = "normal",
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One draw of RLW weights ``[n_tasks]`` (summing to 1 except for the Bernoulli variants)."""
    if distribution == "normal":
        return torch.softmax(torch.randn(n_tasks, generator=generator, dtype=dtype), dim=0)
    if distribution == "uniform":
        return torch.softmax(torch.rand(n_tasks, generator=generator, dtype=dtype), dim=0)
    if distribution == "dirichlet":
        # Dirichlet(1,...,1) = normalised i.i.d. Exp(1); 1 - U keeps the argument of log in (0, 1]
        e = -torch.log1p(-torch.rand(n_tasks, generator=generator, dtype=torch.float64))
        return torch.softmax((e / e.sum()).to(dtype), dim=0)
    if distribution == "bernoulli":
        while True:  # all-zero draws are rejected (probability 2^-T per draw)
            w = (torch.rand(n_tasks, generator=generator) < 0.5).to(dtype)
            if bool(w.any()):
                return w
    if distribution == "constrained_bernoulli":
        w = torch.zeros(n_tasks, dtype=dtype)
        w[int(torch.randint(n_tasks, (1,), generator=generator))] = 1.0
        return w
    raise ValueError(f"unknown RLW distribution '{distribution}' (valid: {', '.join(DISTRIBUTIONS)})")


@register_optimizer("rlw")
class RandomLossWeighting(JacobianMethod):
    """RLW (Lin et al., TMLR 2022): fresh random loss weights each step, softmax of N(0, I) samples."""

    requires = frozenset()  # loss-level: one backward of the weighted sum, no per-task gradients

    @dataclass
    class Options:
        distribution: Literal["normal", "uniform", "dirichlet", "bernoulli", "constrained_bernoulli"] = "normal"
        scale: Literal["one", "n_tasks"] = "one"  # weights as drawn (sum 1), or times T (mean 1, like ew)

    def __init__(self, task_names, options=None) -> None:
        super().__init__(task_names, options or self.Options())

    def draw(self, n_tasks: int, generator: torch.Generator | None) -> torch.Tensor:
        w = rlw_weights(n_tasks, generator, self.options.distribution)
        return w * n_tasks if self.options.scale == "n_tasks" else w

    def aggregate(self, J, losses, generator):
        """As an aggregator: RGW, random weights on the rows of ``J``."""
        w = self.draw(J.shape[0], generator).to(device=J.device, dtype=J.dtype)
        return w @ J, w

    def step(self, ctx: StepContext) -> None:
        w = self.draw(ctx.n_tasks, ctx.generator)
        ctx.backward(w.to(ctx.losses[0].device))
        self.last_weights = w
