"""MGDA / MGDA-UB: "Multi-Task Learning as Multi-Objective Optimization", Sener & Koltun, NeurIPS 2018
(arXiv 1810.04650), built on Désidéri's "Multiple-gradient descent algorithm (MGDA) for multiobjective
optimization", Comptes Rendus Mathématique 350 (2012).

Algorithm. The shared parameters move along ``d = sum_t alpha_t g_t``, the minimum-norm element of the convex
hull of the task gradients ``g_t``: ``alpha = argmin_{alpha in simplex} |J^T alpha|^2 = alpha^T G alpha`` with
``G = J J^T``. Either ``d = 0`` (0 is in the hull: a Pareto-stationary point) or ``-d`` decreases every task,
since ``g_t . d >= |d|^2`` for all t (optimality condition of the min-norm problem). The weights sum to 1, as in
the paper. The problem is solved on the T x T Gramian by the paper's Algorithm 2 (Frank-Wolfe): start at the
uniform ``alpha``, pick the vertex ``t = argmin_r (G alpha)_r`` and move towards it with the exact step of the
two-point problem ``min_gamma |(1 - gamma) J^T alpha + gamma g_t|^2`` (the paper's Algorithm 1, closed form).

Defaults and where they come from:

- ``max_iter = 250``, ``stop_crit = 1e-5`` (stop when the L1 change of ``alpha`` is below it): ``MAX_ITER`` and
  ``STOP_CRIT`` of the official code (``isl-org/MultiObjectiveOptimization``, ``min_norm_solvers.py``; LibMTL
  hard-codes the same). Not converging within ``max_iter`` warns once per run (naming the step) and keeps the
  last iterate, which is what the official solver returns (its loop never counts iterations, so it can spin
  forever instead).
- ``normalization = "none"``: the paper has no gradient normalisation (the official code's comment: "optional and
  not included in the paper"); LibMTL's default is ``none`` too. The official code offers ``l2`` (divide ``g_t``
  by ``|g_t|``), ``loss`` (by ``L_t``) and ``loss+`` (by ``L_t |g_t|``; its CelebA sample config uses this one).
  As in the official code, the normalised gradients only decide ``alpha``; the update is ``sum_t alpha_t g_t`` on
  the raw gradients (``scale[t] * loss_t`` in ``train_multi_task.py``). LibMTL instead sums the normalised
  gradients ``sum_t alpha_t g_t / n_t``.
- ``solver = "pairwise"`` (default; pairwise Frank-Wolfe, Lacoste-Julien & Jaggi, NeurIPS 2015: shift weight from
  the worst vertex in the support to the best one, with the same closed-form segment step as Algorithm 1): it
  solves the paper's min-norm problem exactly (linear convergence, ~10 iterations per step on the 3-task
  ``mmoe``/``ecommerce`` run). ``solver = "fw"`` is the paper's Algorithm 2 (plain Frank-Wolfe from the uniform
  point; the official repository ships it as ``find_min_norm_element_FW``, though its training script calls the
  projected-gradient variant ``find_min_norm_element``, as LibMTL does). Plain Frank-Wolfe converges as O(1/k)
  when the solution lies on a face of the simplex and stops early at ``max_iter``: on random Jacobians up to 1.5 %
  excess norm and 6 of 50 not converged in 250 iterations, and all five published ``fw`` runs on ``ecommerce``
  carried the warning. Since the official code's intent is the exact min-norm point, the exact solver is the
  default and ``fw`` the named option for the paper's literal algorithm. Both also stop when ``alpha`` is optimal
  up to rounding (Frank-Wolfe gap ``|d|^2 - min_t g_t . d <= 1e-13`` on the normalised Gramian) or ``|d|^2`` is
  numerically zero. Pairwise steps move weight between two tasks at a time, so with many tasks the iterations
  needed grow with T: at T = 128 (``benchmarks/step_cost_vs_tasks.py``) a step reached ``max_iter = 250`` and
  warned; pass ``-O max_iter=2000`` at 100+ tasks.
- ``rep = False``: ``rep = True`` is MGDA-UB (the paper's efficient upper-bound variant for encoders): the
  Gramian is built from the gradients of each loss w.r.t. the shared representation (``ctx.feature_grads()``,
  every feature tensor flattened over the batch, as the official code flattens ``rep_variable.grad``; LibMTL
  sums over the batch instead), then one backward of ``sum_t alpha_t L_t`` updates everything.
- ``weight_heads = False``: each task head follows its own loss with weight 1 (the paper's Algorithm 2 updates
  ``theta^t`` with ``grad L^t``). ``True`` scales head t by ``alpha_t``, which is what the official training
  script does as a side effect of its single backward of ``sum_t alpha_t L_t``.

Assumptions where the paper is unclear: the segment step breaks ties by *not* moving (``gamma = 0`` when the
current point is already optimal), so identical gradients keep the symmetric uniform weights; the official code
instead clips its two-point step to [0.001, 0.999] and starts from the best pair of tasks, which only changes the
path, not the (unique) min-norm point ``d``. The Gramian is divided by its mean diagonal before the solver (the
weights are scale-invariant), and the solve runs in float64 on the CPU (T x T numbers, one host copy). A
non-positive normaliser (zero gradient, or a zero/negative loss under ``loss``/``loss+``) is replaced by 1.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from mtlbench import JacobianMethod, StepContext, register_optimizer

NORMALIZATIONS = ("none", "l2", "loss", "loss+")
SOLVERS = ("fw", "pairwise")
# On the Gramian normalised to mean diagonal 1: |d|^2 below _ZERO_NORM is the origin itself, and a Frank-Wolfe gap
# |d|^2 - min_t g_t . d below _GAP_EPS is optimality up to rounding (further steps would only shuffle round-off).
_ZERO_NORM = 1e-14
_GAP_EPS = 1e-13


def gradient_normalizers(gramian: torch.Tensor, losses: torch.Tensor | None, normalization: str) -> torch.Tensor:
    """The official code's per-task normalisers ``n_t`` (float64, CPU): 1, ``|g_t|``, ``L_t`` or ``L_t |g_t|``."""
    G = gramian.detach().to("cpu", torch.float64)
    norms = G.diagonal().clamp_min(0.0).sqrt()
    if normalization == "none":
        return torch.ones_like(norms)
    if normalization == "l2":
        gn = norms
    elif normalization in ("loss", "loss+"):
        if losses is None:
            raise ValueError(f"MGDA normalization '{normalization}' needs the loss values")
        L = losses.detach().to("cpu", torch.float64).reshape(-1)
        gn = L if normalization == "loss" else L * norms
    else:
        raise ValueError(f"unknown MGDA normalization {normalization!r}; use one of {', '.join(NORMALIZATIONS)}")
    return torch.where(torch.isfinite(gn) & (gn > 0), gn, torch.ones_like(gn))


def find_min_norm_element(gramian: torch.Tensor, max_iter: int = 250, stop_crit: float = 1e-5,
                          solver: str = "pairwise") -> tuple[torch.Tensor, bool, int]:
    """``argmin_{alpha in simplex} alpha^T G alpha`` from the Gramian ``G`` (T x T).

    Returns ``(alpha, converged, iterations)`` with ``alpha`` in float64 on the CPU. ``solver="fw"`` is the
    paper's Algorithm 2 (Frank-Wolfe from the uniform point, closed-form step); ``"pairwise"`` moves weight between
    two vertices per step. Converged = the L1 change of ``alpha`` fell below ``stop_crit`` (the official rule), or
    ``alpha`` is exactly optimal, before ``max_iter`` iterations.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown MGDA solver {solver!r}; use one of {', '.join(SOLVERS)}")
    G = gramian.detach().to("cpu", torch.float64).numpy()
    T = G.shape[0]
    alpha = np.full(T, 1.0 / T)
    scale = float(np.trace(G)) / T if T else 0.0
    if T <= 1 or not scale > 0.0 or not np.isfinite(G).all():
        return torch.from_numpy(alpha), True, 0  # one task, or all gradients zero: the hull is the origin
    G = G / scale  # numpy on T x T: the loop costs microseconds per iteration
    converged, it = False, 0
    for it in range(1, max_iter + 1):
        Ga = G @ alpha
        norm2 = float(alpha @ Ga)
        if norm2 <= _ZERO_NORM:
            converged, it = True, it - 1
            break
        t = int(np.argmin(Ga))
        if norm2 - float(Ga[t]) <= _GAP_EPS:
            converged, it = True, it - 1  # Frank-Wolfe gap ~ 0: alpha is optimal
            break
        if solver == "fw":
            xv, vv = float(Ga[t]), float(G[t, t])  # <x, g_t> and |g_t|^2, with x = J^T alpha
            gamma = 1.0 if vv <= xv else (norm2 - xv) / (norm2 + vv - 2.0 * xv)
            new = alpha * (1.0 - gamma)
            new[t] += gamma
        else:
            s = int(np.argmax(np.where(alpha > 0.0, Ga, -np.inf)))
            gap = float(Ga[s] - Ga[t])
            curv = float(G[t, t] + G[s, s] - 2.0 * G[t, s])  # |g_t - g_s|^2
            a_s = float(alpha[s])
            gamma = a_s if curv <= 0.0 else min(gap / curv, a_s)
            new = alpha.copy()
            new[t] += gamma
            new[s] = 0.0 if gamma >= a_s else new[s] - gamma
        change = float(np.abs(new - alpha).sum())
        alpha = new
        if change < stop_crit:
            converged = True
            break
    return torch.from_numpy(alpha), converged, it


def mgda_weights(gramian: torch.Tensor, losses: torch.Tensor | None = None, normalization: str = "none",
                 max_iter: int = 250, stop_crit: float = 1e-5, solver: str = "pairwise") -> torch.Tensor:
    """MGDA task weights (they sum to 1) from the Gramian ``J J^T``; the update is ``weights @ J``.

    With a normalisation, ``alpha`` is the min-norm point of the normalised gradients ``g_t / n_t`` and is applied
    to the raw gradients, as in the official code. Warns (RuntimeWarning) if the solver did not converge.
    """
    gn = gradient_normalizers(gramian, losses, normalization)
    G = gramian.detach().to("cpu", torch.float64) / (gn[:, None] * gn[None, :])
    alpha, converged, _ = find_min_norm_element(G, max_iter, stop_crit, solver)
    if not converged:
        warnings.warn(f"mgda: the '{solver}' min-norm solver did not converge in {max_iter} iterations",
                      RuntimeWarning, stacklevel=2)
    return alpha.to(device=gramian.device, dtype=gramian.dtype)


@register_optimizer("mgda")
class MGDA(JacobianMethod):
    """MGDA (Sener & Koltun, NeurIPS 2018): min-norm point of the task gradients' convex hull; rep=true is MGDA-UB."""

    @dataclass
    class Options:
        normalization: Literal["none", "l2", "loss", "loss+"] = "none"
        max_iter: int = 250
        stop_crit: float = 1e-5
        solver: Literal["pairwise", "fw"] = "pairwise"
        rep: bool = False
        weight_heads: bool = False

        def __post_init__(self) -> None:
            if self.normalization not in NORMALIZATIONS:
                raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, "
                                 f"got {self.normalization!r}")
            if self.solver not in SOLVERS:
                raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
            if self.max_iter < 1:
                raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
            if not self.stop_crit > 0:
                raise ValueError(f"stop_crit must be > 0, got {self.stop_crit}")

    def __init__(self, task_names: tuple[str, ...], options: Options | None = None) -> None:
        super().__init__(task_names, options if options is not None else self.Options())
        if self.options.rep:
            # per instance: MGDA-UB needs the shared representation, not per-task parameter gradients
            self.requires = frozenset({"features"})
        self._where = "a direct aggregate() call"

    def weights(self, gramian: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        """``alpha`` (float64, CPU) from a Gramian; warns once per run if the solver did not converge."""
        o = self.options
        gn = gradient_normalizers(gramian, losses, o.normalization)
        G = gramian.detach().to("cpu", torch.float64) / (gn[:, None] * gn[None, :])
        alpha, converged, _ = find_min_norm_element(G, o.max_iter, o.stop_crit, o.solver)
        if not converged:
            hint = " (solver=pairwise converges faster)" if o.solver == "fw" else ""
            self.warn_once("mgda-solver", f"mgda: the '{o.solver}' min-norm solver did not reach stop_crit="
                                          f"{o.stop_crit} within max_iter={o.max_iter} iterations at {self._where}; "
                                          f"using its last iterate as the official code does{hint}")
        return alpha

    def aggregate(self, J, losses, generator):
        alpha = self.weights(J @ J.T, losses).to(device=J.device, dtype=J.dtype)
        return alpha @ J, alpha

    def head_weights(self, weights):
        return weights if self.options.weight_heads else None

    def step(self, ctx: StepContext) -> None:
        self._where = f"step {ctx.step + 1} (epoch {ctx.epoch})"
        if not self.options.rep:
            super().step(ctx)
            return
        # MGDA-UB: the Gramian of d L_t / d z over every feature tensor z, flattened (batch included)
        Z = torch.stack([torch.cat([g.reshape(-1) for g in task]) for task in ctx.feature_grads()])
        alpha = self.weights(Z @ Z.T, ctx.loss_values)
        w = alpha.to(device=ctx.losses[0].device, dtype=ctx.losses[0].dtype)
        ctx.backward(w)  # one backward of sum_t alpha_t L_t: shared part and heads (head t scaled by alpha_t)
        if not self.options.weight_heads and ctx.task_params:
            # top each head up to weight 1 (its own loss), adding nothing to the shared parameters
            n_shared = sum(p.numel() for p in ctx.shared_params)
            ctx.set_grads(torch.zeros(n_shared, dtype=w.dtype, device=w.device), 1.0 - w)
        self.last_weights = w.detach()
