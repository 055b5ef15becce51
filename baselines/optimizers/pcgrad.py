"""PCGrad: "Gradient Surgery for Multi-Task Learning", Yu et al., NeurIPS 2020 (arXiv 2001.06782).

Algorithm 1 of the paper: for each task i, start from its gradient g_i and, for every other task j in a random
order, if the current g_i conflicts with g_j (negative inner product) project it onto the normal plane of g_j:
``g_i <- g_i - (g_i . g_j) / |g_j|^2 g_j``. The update of the shared parameters is the sum of the projected
gradients (``reduction="sum"``, as in Algorithm 1 and in the authors' released code, which is TensorFlow
(tianheyu927/PCGrad) and sums the projected gradients; ``"mean"`` averages them, as the widely used third-party
PyTorch port does by default).
Task-specific parameters follow their own task's gradient, untouched.

Implementation: the projections act on a linear combination of the task gradients, so they are carried out on
the T x T Gramian ``G = J J^T``: each projected g_i is ``c_i^T J`` and only ``c_i`` (T numbers) is updated. The
shared update is ``J^T w`` with ``w = sum_i c_i``; ``w`` is logged as the task weights. This is exact, costs
O(T^3) instead of O(T^2 P), and lets the order be drawn from the run's seeded generator (same seed, same run). The T x T solve runs on the
host (one device-to-host copy of the Gramian per step); the weights go back to the Jacobian's device.
Up to ``LOOP_MAX_TASKS`` tasks the projections run as a scalar loop; beyond, all T tasks are projected at once,
round r projecting every task on the r-th task of its own order (T - 1 rounds of T x T array operations instead
of T^2 scalar steps: 139 tasks take milliseconds instead of seconds per step, issue 16). Both draw the same orders
and compute the same coefficients; they differ only in the order of the additions inside each inner product (the
loop is kept for small T so that stored runs reproduce bit for bit).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mtlbench import JacobianMethod, register_optimizer


LOOP_MAX_TASKS = 8


def pcgrad_weights(gramian: torch.Tensor, generator: torch.Generator | None = None,
                   orders: list[list[int]] | None = None, reduction: str = "sum") -> torch.Tensor:
    """Weights ``w`` such that the PCGrad update is ``J^T w``, from the Gramian ``J J^T``.

    ``orders[i]`` fixes the order in which task i is projected on the others (drawn from ``generator`` if None).
    """
    G = gramian.detach().to("cpu", torch.float64)  # T x T on the host: one copy per step, then scalar loops
    T = G.shape[0]
    if T > LOOP_MAX_TASKS:
        if orders is None:
            orders = [torch.randperm(T, generator=generator).tolist() for _ in range(T)]
        w = _projected_all_at_once(G, [[j for j in orders[i] if j != i] for i in range(T)])
        return w / T if reduction == "mean" else w
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


def _projected_all_at_once(G: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """The loop of :func:`pcgrad_weights` for every task at once: row i of ``C`` holds task i's coefficients;
    round r projects each task on the r-th other task of its order (if they conflict)."""
    T = G.shape[0]
    C = torch.eye(T, dtype=torch.float64)
    rows = torch.arange(T)
    O = torch.tensor(orders, dtype=torch.long).reshape(T, T - 1)
    diag = G.diagonal()
    for r in range(T - 1):
        j = O[:, r]
        dots = (C * G[:, j].T).sum(1)  # c_i . g_{j_i}, per task i
        d = diag[j]
        conflict = (dots < 0.0) & (d > 0.0)
        C[rows, j] -= torch.where(conflict, dots / torch.where(d > 0.0, d, torch.ones_like(d)), torch.zeros_like(d))
    return C.sum(0)


@register_optimizer("pcgrad")
class PCGrad(JacobianMethod):
    """PCGrad (Yu et al., NeurIPS 2020): project away conflicting components of task gradients."""

    @dataclass
    class Options:
        reduction: Literal["sum", "mean"] = "sum"

    def aggregate(self, J, losses, generator):
        w = pcgrad_weights(J @ J.T, generator, reduction=self.options.reduction).to(J.device, J.dtype)
        return w @ J, w
