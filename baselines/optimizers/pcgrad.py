"""PCGrad: "Gradient Surgery for Multi-Task Learning", Yu et al., NeurIPS 2020 (arXiv 2001.06782).

Algorithm 1 of the paper: for each task i, start from its gradient g_i and, for every other task j in a random
order, if the current g_i conflicts with g_j (negative inner product) project it onto the normal plane of g_j:
``g_i <- g_i - (g_i . g_j) / |g_j|^2 g_j``. The update of the shared parameters is the sum of the projected
gradients (``reduction="sum"``, as in Algorithm 1; the authors' PyTorch code averages instead: ``"mean"``).
Task-specific parameters follow their own task's gradient, untouched.

Implementation: the projections act on a linear combination of the task gradients, so they are carried out on
the T x T Gramian ``G = J J^T``: each projected g_i is ``c_i^T J`` and only ``c_i`` (T numbers) is updated. The
shared update is ``J^T w`` with ``w = sum_i c_i``; ``w`` is logged as the task weights. This is exact, costs
O(T^3) instead of O(T^2 P), and lets the order be drawn from the run's seeded generator (same seed, same run). The T x T solve runs on the
host (one device-to-host copy of the Gramian per step); the weights go back to the Jacobian's device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mtlbench import JacobianMethod, register_optimizer


def pcgrad_weights(gramian: torch.Tensor, generator: torch.Generator | None = None,
                   orders: list[list[int]] | None = None, reduction: str = "sum") -> torch.Tensor:
    """Weights ``w`` such that the PCGrad update is ``J^T w``, from the Gramian ``J J^T``.

    ``orders[i]`` fixes the order in which task i is projected on the others (drawn from ``generator`` if None).
    """
    G = gramian.detach().to("cpu", torch.float64)  # T x T on the host: one copy per step, then scalar loops
    T = G.shape[0]
    w = torch.zeros(T, dtype=torch.float64)
    for i in range(T):
        if orders is not None:
            order = [j for j in orders[i] if j != i]
        else:
            order = [j for j in torch.randperm(T, generator=generator).tolist() if j != i]
        c = torch.zeros(T, dtype=torch.float64)
        c[i] = 1.0
        for j in order:
            dot = float(c @ G[:, j])
            if dot < 0.0 and G[j, j] > 0.0:
                c[j] -= dot / float(G[j, j])
        w += c
    if reduction == "mean":
        w /= T
    return w


@register_optimizer("pcgrad")
class PCGrad(JacobianMethod):
    """PCGrad (Yu et al., NeurIPS 2020): project away conflicting components of task gradients."""

    @dataclass
    class Options:
        reduction: Literal["sum", "mean"] = "sum"

    def aggregate(self, J, losses, generator):
        w = pcgrad_weights(J @ J.T, generator, reduction=self.options.reduction).to(J.device, J.dtype)
        return w @ J, w
