"""GradVac: Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and Improving Multi-task Optimization in
Massively Multilingual Models", ICLR 2021 (arXiv 2010.05874).

Algorithm (the paper's Algorithm 1): like PCGrad, each task gradient ``g_i`` is corrected against every other task
``j`` in a random order, but instead of only removing conflicts it raises the cosine similarity
``phi_ij = cos(g_i', g_j)`` up to an adaptive target ``phi_hat_ij`` whenever ``phi_ij < phi_hat_ij``:

    g_i' <- g_i' + |g_i'| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) / (|g_j| sqrt(1 - phi_hat^2)) g_j

which makes ``cos(g_i', g_j) = phi_hat_ij`` exactly. The targets are exponential moving averages of the observed
similarities, ``phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi_ij``, where ``phi_ij`` is the cosine measured
*before* this pair's correction (the observed one, not the target it was raised to), started at 0 (so the first
step is exactly PCGrad with ``reduction="sum"``). When the EMA is updated is ``ema_update`` (below). The shared
update is the sum of the corrected gradients.

Implementation: as for PCGrad, each corrected ``g_i'`` is a combination ``c_i^T J`` of the original gradients, so
all norms and cosines come from the Gramian ``G = J J^T`` and only T numbers per task are updated; the update is
``J^T w`` with ``w = sum_i c_i`` (logged as the task weights). The order in which task i visits the others is
drawn from the run's generator (``torch.randperm``), as in mtlbench's PCGrad.

Defaults and assumptions:

- ``beta = 0.5``: LibMTL's and torchjd's default (the paper treats beta as a hyper-parameter; the value used in
  its multilingual experiments was not verified here).
- ``eps = 1e-8`` in the denominators (LibMTL, torchjd).
- Granularity: whole model -- one target per task pair over all shared parameters. The paper also applies the rule
  per layer / per parameter group (LibMTL's ``GradVac_group_type`` 1, 2); those variants are not implemented.
- ``ema_update="always"`` (default): the EMA is updated after every visited pair, corrected or not, as torchjd's
  ``GradVac`` does (re-read for this docstring) and as an EMA of the observed similarities must be: with targets
  starting at 0 only this rule lets a target become positive, which the paper's motivation (raising similarity
  above the PCGrad level for related languages) requires. LibMTL (``LibMTL/weighting/GradVac.py``, commit 13f5fc7,
  re-read) updates it only inside the ``if phi < phi_hat`` branch, i.e. only when a correction was applied;
  ``ema_update="on_correction"`` reproduces that (targets starting at 0 can then only move down, so GradVac stays
  PCGrad-like). The paper's own text was not available to re-check which placement its Algorithm 1 uses.
- ``phi_ij`` is measured on the partially corrected ``g_i'`` (LibMTL, torchjd).
- Task heads follow their own loss (weight 1), as in PCGrad.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mtlbench import JacobianMethod, register_optimizer


def gradvac_weights(gramian: torch.Tensor, targets: torch.Tensor, beta: float = 0.5, eps: float = 1e-8,
                    generator: torch.Generator | None = None, orders: list[list[int]] | None = None,
                    ema_update: str = "always") -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``w`` such that the GradVac update is ``J^T w``, and the updated targets ``phi_hat`` (``[T, T]``).

    ``targets`` is not modified. ``orders[i]`` fixes the order in which task i visits the others (drawn from
    ``generator`` if None; entries equal to i are skipped).
    """
    G = gramian.detach().to("cpu", torch.float64)
    G = 0.5 * (G + G.T)
    T = G.shape[0]
    phi_hat = targets.detach().to("cpu", torch.float64).clone()
    norms = G.diagonal().clamp(min=0.0).sqrt()
    C = torch.eye(T, dtype=torch.float64)
    for i in range(T):
        if orders is not None:
            order = [j for j in orders[i] if j != i]
        else:
            order = [j for j in torch.randperm(T, generator=generator).tolist() if j != i]
        c = C[i]
        cG = c @ G  # (g_i' . g_k) for every k
        for j in order:
            norm_i = math.sqrt(max(float(cG @ c), 0.0))
            norm_j = float(norms[j])
            phi = float(cG[j]) / (norm_i * norm_j + eps)
            target = float(phi_hat[i, j])
            if phi < target:
                s_phi = math.sqrt(max(1.0 - phi * phi, 0.0))
                s_tgt = math.sqrt(max(1.0 - target * target, 0.0))
                coef = norm_i * (target * s_phi - phi * s_tgt) / (norm_j * s_tgt + eps)
                c[j] += coef
                cG = cG + coef * G[j]
                if ema_update == "on_correction":
                    phi_hat[i, j] = (1.0 - beta) * target + beta * phi
            if ema_update == "always":
                phi_hat[i, j] = (1.0 - beta) * target + beta * phi
    return C.sum(0), phi_hat


@register_optimizer("gradvac")
class GradVac(JacobianMethod):
    """GradVac (Wang et al., ICLR 2021): raise pairwise gradient cosines to EMA targets (whole-model)."""

    task_state = {"targets": 2}

    @dataclass
    class Options:
        beta: float = 0.5
        eps: float = 1e-8
        ema_update: Literal["always", "on_correction"] = "always"

        def __post_init__(self) -> None:
            if not 0.0 <= self.beta <= 1.0:
                raise ValueError(f"beta must be in [0, 1], got {self.beta}")
            if self.eps < 0:
                raise ValueError(f"eps must be >= 0, got {self.eps}")

    def __init__(self, task_names, options=None) -> None:
        super().__init__(task_names, options if options is not None else self.Options())
        T = len(self.task_names)
        self.targets = torch.zeros(T, T, dtype=torch.float64)

    def aggregate(self, J, losses, generator):
        Jd = J.detach().double()
        if self.targets.shape[0] != J.shape[0]:
            raise ValueError(f"gradvac was built for {self.targets.shape[0]} tasks, got a Jacobian with "
                             f"{J.shape[0]} rows")
        o = self.options
        w, self.targets = gradvac_weights(Jd @ Jd.T, self.targets, o.beta, o.eps, generator,
                                          ema_update=o.ema_update)
        w = w.to(J.dtype).to(J.device)
        return w @ J, w

    def state_dict(self) -> dict[str, Any]:
        return {"targets": self.targets.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.targets = torch.as_tensor(state["targets"], dtype=torch.float64).clone()
