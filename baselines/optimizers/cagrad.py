"""CAGrad: "Conflict-Averse Gradient Descent for Multi-task Learning", Liu, Liu, Jin, Stone & Liu, NeurIPS 2021
(arXiv 2110.14048).

Algorithm. With ``g_0`` the average task gradient, CAGrad picks the update that maximises the worst task's
improvement within a ball around ``g_0``: ``max_d min_t g_t . d`` s.t. ``|d - g_0| <= c |g_0|``. Its dual is a
problem over the simplex, ``min_w F(w) = g_w . g_0 + sqrt(phi) |g_w|`` with ``g_w = sum_t w_t g_t`` and
``phi = c^2 |g_0|^2``, and the primal solution is ``d = g_0 + (sqrt(phi) / |g_w|) g_w`` (the paper's Algorithm
1). Everything is a function of the Gramian ``G = J J^T``: ``g_w . g_0 = w^T G b`` with ``b = 1/T``,
``|g_w|^2 = w^T G w``, and ``d = J^T omega`` with ``omega = b + (sqrt(phi)/|g_w|) w``.

Defaults and where they come from:

- ``c = 0.5``: the default of the official ``cagrad(grads, alpha=0.5, rescale=1)`` and of the official scripts'
  ``--alpha`` (their NYUv2 run uses 0.4), and LibMTL's ``calpha``. ``c = 0`` is the average gradient; as c grows
  the direction tends to MGDA's.
- ``rescale = 1``: the official code's option: 0 keeps ``d``, 1 divides it by ``1 + c^2``, 2 by ``1 + c``.
- ``reduction = "sum"``: the official training scripts multiply the update by T "to match the sum loss"
  (``overwrite_grad``), so with ``c = 0`` CAGrad equals equal weighting (mtlbench's ``ew`` sums the losses).
  ``"mean"`` is LibMTL's and torchjd's convention (no factor T).
- Solver: the dual is solved by scipy's SLSQP, as in the official code and LibMTL, but on the Gramian divided by
  its mean diagonal (the minimiser ``w`` is scale-invariant). The official code and LibMTL pass the raw Gramian:
  with task gradients of norm ~1e-2 the objective is below SLSQP's default ``ftol = 1e-6`` and SLSQP stops at its
  start point, so the update silently becomes ``(1 + c)/(1 + c^2) g_0 = 1.2 g_0``, i.e. scaled equal weighting.
  Here SLSQP runs with ``ftol = 1e-12`` (fixed) and the analytic gradient, for at most ``max_iter = 100``
  iterations (scipy's default, which the official code inherits).
- Convergence check: ``F`` is positively homogeneous, so at the optimum ``F(w) = min_t (G omega)_t`` (strong
  duality: the worst-task improvement of ``d`` equals the dual value). The gap ``F(w) - min_t (G omega)_t >= 0``
  is computed on the normalised Gramian and certifies the solution (``F(w) - F* <= gap``) whatever SLSQP's status
  message says; while it exceeds ``tol = 1e-6`` times ``max(1, |F(w)|)`` (``F`` grows with c), SLSQP is restarted
  from its answer, at most ``RESTARTS = 2`` times (a hypothesis test found a 4-task case where the first solve
  stopped at a gap of 1.02e-6 and one restart reached 3.5e-8); if it still does, the method warns once
  per run (naming the step) and keeps SLSQP's answer, as the official code does (it uses ``res.x`` whatever the
  solver's status); a non-finite answer falls back to the start point.

Assumptions where the paper is unclear: if ``|g_0| = 0`` (e.g. two opposite gradients), or ``c = 0``, the update
is ``g_0``. If the dual optimum has ``g_w = 0`` (0 in the convex hull: Pareto-stationary), ``d`` is not defined by
the formula; we keep ``d = g_0`` (what the official code computes once ``|g_w| << 1e-8``: its extra term
``c |g_0| g_w / (|g_w| + 1e-8)`` vanishes), whereas torchjd returns ``d = 0``. Task heads follow their own loss
(weight 1), as in the official code (per-task backward passes accumulate each head's own gradient). The logged
weights are ``omega`` (after reduction and rescale): they sum to ``T (1 + sqrt(phi)/|g_w|)/(1 + c^2)`` by default,
not to 1.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
from scipy.optimize import minimize

from mtlbench import JacobianMethod, StepContext, register_optimizer

_FTOL = 1e-12
_TINY = 1e-12  # on the normalised Gramian (mean squared task-gradient norm 1): |g_0| or |g_w| below it is zero


class CAGradSolution(NamedTuple):
    """The dual solution: ``w`` on the simplex, ``omega = b + lambda w`` (mean convention, no rescale), the
    multiplier ``lambda = sqrt(phi)/|g_w|``, whether the solve passed the checks, the duality gap, SLSQP's
    iteration count."""

    w: torch.Tensor
    omega: torch.Tensor
    lam: float
    converged: bool
    gap: float
    n_iter: int


RESTARTS = 2  # warm restarts of SLSQP while the duality gap is above tolerance (first solves nearly always pass)


def cagrad_solve(gramian: torch.Tensor, c: float = 0.5, max_iter: int = 100, tol: float = 1e-6) -> CAGradSolution:
    """Solve CAGrad's dual on the normalised Gramian (float64, CPU)."""
    G = gramian.detach().to("cpu", torch.float64).numpy()
    T = G.shape[0]
    b = np.full(T, 1.0 / T)
    as_t = lambda x: torch.from_numpy(np.asarray(x, dtype=np.float64).copy())  # noqa: E731
    scale = float(np.trace(G)) / T if T else 0.0
    if T == 0 or not scale > 0.0 or not np.isfinite(G).all():
        return CAGradSolution(as_t(b), as_t(b), 0.0, True, 0.0, 0)  # all gradients zero: d = 0 anyway
    Gn = G / scale
    a = Gn @ b  # (G b)_t = g_t . g_0
    g0_norm = math.sqrt(max(float(b @ a), 0.0))
    k = c * g0_norm  # sqrt(phi)
    if k <= _TINY:
        return CAGradSolution(as_t(b), as_t(b), 0.0, True, 0.0, 0)

    def f(w):
        return float(w @ a) + k * math.sqrt(max(float(w @ Gn @ w), 0.0) + 1e-30)

    def jac(w):
        Gw = Gn @ w
        return a + k * Gw / math.sqrt(max(float(w @ Gw), 0.0) + 1e-30)

    start, n_iter = b.copy(), 0
    for _ in range(RESTARTS + 1):  # SLSQP can stop a hair above the gap tolerance; a warm restart finishes it
        res = minimize(f, start, jac=jac, method="SLSQP", bounds=[(0.0, 1.0)] * T,
                       constraints=[{"type": "eq", "fun": lambda w: np.sum(w) - 1.0,
                                     "jac": lambda w: np.ones_like(w)}],
                       options={"ftol": _FTOL, "maxiter": max_iter})
        n_iter += int(getattr(res, "nit", 0))
        w = np.asarray(res.x, dtype=np.float64)
        finite = bool(np.isfinite(w).all())
        if not finite:
            w = b.copy()
        w = np.clip(w, 0.0, None)
        w = w / w.sum() if w.sum() > 0 else b.copy()
        gw_norm = math.sqrt(max(float(w @ Gn @ w), 0.0))
        lam = k / gw_norm if gw_norm > _TINY else 0.0
        omega = b + lam * w
        value = f(w)
        gap = value - float(np.min(Gn @ omega)) if lam > 0 else 0.0
        converged = finite and gap <= tol * max(1.0, abs(value))  # the gap certifies optimality
        if converged or not finite:
            break
        start = w
    return CAGradSolution(as_t(w), as_t(omega), lam, converged, gap, n_iter)


def _finish(omega: torch.Tensor, T: int, c: float, rescale: int, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        omega = omega * T
    if rescale == 1:
        omega = omega / (1.0 + c * c)
    elif rescale == 2:
        omega = omega / (1.0 + c)
    return omega


def cagrad_weights(gramian: torch.Tensor, c: float = 0.5, rescale: int = 1, reduction: str = "sum",
                   max_iter: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """CAGrad's weights ``omega`` from the Gramian ``J J^T``: the update is ``omega @ J``. Warns if the solve
    did not pass the convergence checks."""
    sol = cagrad_solve(gramian, c, max_iter, tol)
    if not sol.converged:
        warnings.warn(f"cagrad: SLSQP did not converge (duality gap {sol.gap:.2e})", RuntimeWarning, stacklevel=2)
    omega = _finish(sol.omega, gramian.shape[0], c, rescale, reduction)
    return omega.to(device=gramian.device, dtype=gramian.dtype)


@register_optimizer("cagrad")
class CAGrad(JacobianMethod):
    """CAGrad (Liu et al., NeurIPS 2021): best worst-task improvement within a ball around the average gradient."""

    @dataclass
    class Options:
        c: float = 0.5
        rescale: int = 1
        reduction: Literal["sum", "mean"] = "sum"
        max_iter: int = 100
        tol: float = 1e-6

        def __post_init__(self) -> None:
            if not self.c >= 0:
                raise ValueError(f"c must be >= 0, got {self.c}")
            if self.rescale not in (0, 1, 2):
                raise ValueError(f"rescale must be 0 (none), 1 (divide by 1+c^2) or 2 (divide by 1+c), "
                                 f"got {self.rescale}")
            if self.reduction not in ("sum", "mean"):
                raise ValueError(f"reduction must be sum or mean, got {self.reduction!r}")
            if self.max_iter < 1:
                raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
            if not self.tol > 0:
                raise ValueError(f"tol must be > 0, got {self.tol}")

    def __init__(self, task_names: tuple[str, ...], options: Options | None = None) -> None:
        super().__init__(task_names, options if options is not None else self.Options())
        self._where = "a direct aggregate() call"

    def aggregate(self, J, losses, generator):
        o = self.options
        sol = cagrad_solve(J @ J.T, o.c, o.max_iter, o.tol)
        if not sol.converged:
            self.warn_once("cagrad-solver", f"cagrad: SLSQP did not solve the dual at {self._where} (duality gap "
                                            f"{sol.gap:.2e} > tol={o.tol} after at most max_iter={o.max_iter} "
                                            f"iterations); using its answer as the official code does")
        omega = _finish(sol.omega, J.shape[0], o.c, o.rescale, o.reduction).to(device=J.device, dtype=J.dtype)
        return omega @ J, omega

    def step(self, ctx: StepContext) -> None:
        self._where = f"step {ctx.step + 1} (epoch {ctx.epoch})"
        super().step(ctx)
