"""UPGrad: Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (arXiv 2406.16232).

Algorithm (the paper's Eq. 3 and Proposition 1): every task gradient ``g_i`` is projected onto the dual cone of
all task gradients, ``{d : g_j . d >= 0 for all j}``, and the projections are averaged:
``A(J) = (1/T) sum_i pi_J(g_i)``. Because the projection of ``J^T u`` is ``J^T v`` with
``v = argmin_v v^T G v  s.t.  v >= u`` (``G = J J^T``), everything happens in weight space on the T x T Gramian:
``w = (1/T) sum_i v(e_i)`` and the update is ``J^T w``. The result never conflicts with any task gradient
(``g_j . d = (G w)_j >= 0``, the QP's KKT condition), and equals the plain mean when no two gradients conflict.

Solver: with ``v = u + z`` (``z >= 0``) and ``G = A^T A`` (``A = Lambda^(1/2) V^T`` from an eigendecomposition,
which also works for a singular Gramian), the QP is the non-negative least-squares problem
``min_z ||A z + A u||^2``, solved exactly (active set, Lawson-Hanson) by ``scipy.optimize.nnls``. The KKT
conditions are checked afterwards (``G v >= -tol``, ``z_j (G v)_j ~ 0``); if they fail, a warning names the step
and the (feasible, ``v >= u``) NNLS point is kept -- torchjd raises in that case instead of training on.

Defaults (torchjd 0.18 ``QuadprogProjector``, copied by LibMTL's ``UPGrad``):

- ``norm_eps = 1e-4``: the Gramian is divided by its trace (the squared Frobenius norm of J); if the trace is below
  ``norm_eps`` the Gramian is replaced by zeros, so the projection is skipped and the update is the mean gradient.
  This is torchjd's behaviour; we keep it for equivalence but warn once per run when it happens, since with small
  gradients it silently turns UPGrad into plain averaging (set ``norm_eps=0`` to always project).
- ``reg_eps = 1e-4``: ``reg_eps * I`` is added to the normalised Gramian so that the QP is strictly convex.
- Weights are the average of the projections (the paper's preference vector ``1/T``; torchjd's default), so they
  sum to about 1, not T. Task heads follow their own loss (weight 1), as in torchjd's ``mtl_backward``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.optimize import nnls

from mtlbench import JacobianMethod, register_optimizer

_KKT_TOL = 1e-7  # on the trace-normalised Gramian, whose entries are O(1)


def _project_weights(G: np.ndarray, U: np.ndarray) -> tuple[np.ndarray, float]:
    """For each row ``u`` of ``U``: ``argmin_v v^T G v s.t. v >= u``; also the worst KKT violation."""
    lam, V = np.linalg.eigh(G)
    A = np.sqrt(np.clip(lam, 0.0, None))[:, None] * V.T  # A^T A = G (negative round-off eigenvalues clipped)
    out = np.empty_like(U)
    worst = 0.0
    for k, u in enumerate(U):
        z, _ = nnls(A, -A @ u)
        v = u + z
        grad = G @ v
        worst = max(worst, float(-grad.min()), float(np.max(np.abs(z * grad))))
        out[k] = v
    return out, worst


def upgrad_weights(gramian: torch.Tensor, norm_eps: float = 1e-4, reg_eps: float = 1e-4,
                   warn: Callable[[str], None] | None = None) -> torch.Tensor:
    """Weights ``w`` such that the UPGrad update is ``J^T w``, from the Gramian ``J J^T`` (``[T, T]``).

    ``warn`` receives a message if the QP's optimality conditions do not hold at the solver's answer or the
    Gramian is below ``norm_eps`` (default: ``warnings.warn``).
    """
    warn = warn or (lambda m: warnings.warn(m, RuntimeWarning, stacklevel=3))
    G = gramian.detach().to("cpu", torch.float64).numpy()
    G = 0.5 * (G + G.T)
    T = G.shape[0]
    trace = float(np.trace(G))
    if trace < norm_eps:
        if trace > 0.0:
            warn(f"upgrad: Gramian trace {trace:.3g} < norm_eps={norm_eps:g}; the projection is skipped and the "
                 f"update is the mean gradient (torchjd's convention; set norm_eps=0 to always project)")
        G = np.zeros_like(G)
    else:
        G = G / trace
    G = G + reg_eps * np.eye(T)
    V, worst = _project_weights(G, np.eye(T))
    if not worst <= _KKT_TOL:
        warn(f"upgrad: the dual-cone projection QP did not reach its optimality conditions (violation "
             f"{worst:.2e} > {_KKT_TOL:g}); the feasible NNLS point is used")
    w = V.mean(axis=0)
    return torch.as_tensor(w, dtype=torch.float64)


@register_optimizer("upgrad")
class UPGrad(JacobianMethod):
    """UPGrad (Quinton & Rey, 2024): average of the task gradients projected onto their dual cone."""

    @dataclass
    class Options:
        norm_eps: float = 1e-4
        reg_eps: float = 1e-4

        def __post_init__(self) -> None:
            if self.norm_eps < 0:
                raise ValueError(f"norm_eps must be >= 0, got {self.norm_eps}")
            if self.reg_eps < 0:
                raise ValueError(f"reg_eps must be >= 0, got {self.reg_eps}")

    def __init__(self, task_names, options=None) -> None:
        super().__init__(task_names, options if options is not None else self.Options())
        self._step = 0

    def aggregate(self, J, losses, generator):
        self._step += 1
        step = self._step

        def warn(msg: str) -> None:
            key = "upgrad-norm" if "norm_eps" in msg else "upgrad-kkt"
            self.warn_once(key, f"{msg} (first at step {step})")

        G = J.detach().double() @ J.detach().double().T
        w = upgrad_weights(G, self.options.norm_eps, self.options.reg_eps, warn).to(J.dtype).to(J.device)
        return w @ J, w
