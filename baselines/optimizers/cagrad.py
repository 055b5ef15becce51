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
- Many tasks (issue 16: SLSQP did not converge at T = 139 and one seed took 1,144 s): SLSQP's dense subproblems
  cost O(T^3) per iteration. An answer SLSQP leaves uncertified is polished by accelerated projected gradient on
  the same dual (FISTA with backtracking, Euclidean projection on the simplex, stopped by the same duality gap);
  where every SLSQP solve certifies (every published run), nothing changes. Past ``SLSQP_MAX_TASKS = 32`` tasks
  projected gradient runs first (at most 3,000 iterations) and SLSQP only finishes what it leaves. Measured on
  one CPU thread, 3 random Gramians each: T = 139 with gradients near a 6-dimensional subspace, SLSQP alone
  9.6 s per solve, this 0.48 s; full-rank gradients, 0.76 s and 0.92 s; all certified (gap <= 1e-6).

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
SLSQP_MAX_TASKS = 32  # beyond, SLSQP's dense O(T^3) subproblems are slow and stop short: projected gradient only
PG_FIRST_ITER = 3_000  # projected-gradient iterations before SLSQP when T > SLSQP_MAX_TASKS
PG_MAX_ITER = 20_000  # iterations of the projected-gradient polish after SLSQP (checked against the gap every 25)


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the probability simplex (sort-based, O(T log T))."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    idx = np.arange(1, v.size + 1)
    rho = np.nonzero(u - css / idx > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1.0), 0.0)


def _projected_gradient(Gn: np.ndarray, a: np.ndarray, k: float, w: np.ndarray, tol: float,
                        max_iter: int) -> np.ndarray:
    """Accelerated projected gradient (FISTA with backtracking and restarts) on the dual
    ``F(w) = a.w + k |g_w|`` over the simplex, stopped by the duality gap. Scales to hundreds of tasks (T x T
    products only), where SLSQP's dense subproblems stop short (issue 16: no convergence at T = 139)."""
    def value_grad(x):
        Gx = Gn @ x
        nrm = math.sqrt(max(float(x @ Gx), 0.0) + 1e-30)
        return float(x @ a) + k * nrm, a + k * Gx / nrm

    def gap_of(x):
        nrm = math.sqrt(max(float(x @ Gn @ x), 0.0))
        if nrm <= _TINY:
            return 0.0, float(x @ a)
        val = float(x @ a) + k * nrm
        return val - float(np.min(Gn @ (np.full_like(x, 1.0 / x.size) + (k / nrm) * x))), val

    L = max(float(np.abs(Gn).sum(1).max()), 1e-12) * (1.0 + k)  # a first guess of the curvature, adapted below
    y, x_prev, t = w.copy(), w.copy(), 1.0
    fx, _ = value_grad(w)
    for it in range(1, max_iter + 1):
        fy, gy = value_grad(y)
        while True:  # backtracking: the quadratic model at y must majorise F at the step
            x = project_simplex(y - gy / L)
            fx_new, _ = value_grad(x)
            d = x - y
            if fx_new <= fy + float(gy @ d) + 0.5 * L * float(d @ d) + 1e-15 * abs(fy):
                break
            L *= 2.0
        if fx_new > fx:  # not monotone: restart the momentum from the last good point
            y, t = x_prev.copy(), 1.0
            continue
        t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        y = x + ((t - 1.0) / t_next) * (x - x_prev)
        x_prev, fx, t = x, fx_new, t_next
        L *= 0.9  # let the step grow again
        if it % 25 == 0:
            gap, val = gap_of(x_prev)
            if gap <= tol * max(1.0, abs(val)):
                break
    return x_prev


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

    def certify(w):
        gw_norm = math.sqrt(max(float(w @ Gn @ w), 0.0))
        lam = k / gw_norm if gw_norm > _TINY else 0.0
        omega = b + lam * w
        value = f(w)
        gap = value - float(np.min(Gn @ omega)) if lam > 0 else 0.0
        return lam, omega, gap, gap <= tol * max(1.0, abs(value))

    def slsqp(start):
        res = minimize(f, start, jac=jac, method="SLSQP", bounds=[(0.0, 1.0)] * T,
                       constraints=[{"type": "eq", "fun": lambda w: np.sum(w) - 1.0,
                                     "jac": lambda w: np.ones_like(w)}],
                       options={"ftol": _FTOL, "maxiter": max_iter})
        w = np.asarray(res.x, dtype=np.float64)
        if not np.isfinite(w).all():
            return None, int(getattr(res, "nit", 0))
        w = np.clip(w, 0.0, None)
        return (w / w.sum() if w.sum() > 0 else b.copy()), int(getattr(res, "nit", 0))

    n_iter, w = 0, b.copy()
    if T > SLSQP_MAX_TASKS:  # many tasks: projected gradient first (T x T products only), SLSQP to finish
        w = _projected_gradient(Gn, a, k, w, tol, PG_FIRST_ITER)
        lam, omega, gap, converged = certify(w)
        if converged:
            return CAGradSolution(as_t(w), as_t(omega), lam, True, gap, n_iter)
    for _ in range(RESTARTS + 1):  # SLSQP can stop a hair above the gap tolerance; a warm restart finishes it
        new, nit = slsqp(w)
        n_iter += nit
        if new is None:  # a non-finite answer: keep the start
            break
        w = new
        lam, omega, gap, converged = certify(w)
        if converged:
            return CAGradSolution(as_t(w), as_t(omega), lam, True, gap, n_iter)
    w = _projected_gradient(Gn, a, k, w, tol, PG_MAX_ITER)  # not certified: polish by projected gradient
    lam, omega, gap, converged = certify(w)
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
