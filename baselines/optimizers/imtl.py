"""IMTL: "Towards Impartial Multi-task Learning", Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, ICLR 2021
(OpenReview IMPnRXEWpvr; no arXiv version).

Three modes (option ``mode``):

- ``"grad"`` = IMTL-G (gradient balance). The shared update ``d = sum_t alpha_t g_t`` with ``sum_t alpha_t = 1``
  must have equal projections onto every unit task gradient ``u_t = g_t / |g_t|``: ``d . u_t = d . u_1``. The paper
  solves it in closed form with differences, ``D = [g_1 - g_t]_{t>=2}``, ``U = [u_1 - u_t]_{t>=2}``,
  ``alpha_{2:T} = g_1 U^T (D U^T)^{-1}``, ``alpha_1 = 1 - sum alpha_{2:T}``. On the Gramian ``G = J J^T`` the
  same conditions read ``G alpha = lambda n`` with ``n_t = |g_t| = sqrt(G_tt)``, so
  ``alpha = G^+ n / (1^T G^+ n)``. **We implement this Gramian form with the pseudo-inverse** (torchjd's
  ``IMTLG`` generalisation, Quinton & Rey, arXiv 2406.16232): it equals the paper's formula whenever J has full
  row rank (then ``G^+ = G^{-1}`` and both solve the same T linear conditions), and it stays defined when J is
  rank-deficient (e.g. two identical gradients), where ``D U^T`` is singular. If ``1^T G^+ n = 0`` (e.g. two
  opposite gradients: the only direction with equal projections is 0) the weights are 0, as in torchjd, and a
  warning names the step. The common projection is ``d . u_t = 1 / (1^T G^+ n)``: with 3+ tasks the sum can be
  negative (e.g. one task's gradient much smaller than the others and with a negative coefficient), and then the
  paper's sum-1 normalisation makes ``d`` an ascent direction for every task; we keep the paper's (and torchjd's,
  LibMTL's) weights but warn once per run, naming the step. For the same reason IMTL-G's scale-invariance holds
  up to the sign of ``d``: rescaling ``g_t`` by k divides ``alpha_t`` by k before the sum-1 normalisation. The
  Gramian is divided by its mean diagonal first (the weights are scale-invariant). Heads follow their own loss
  (weight 1), as in the paper.
- ``"loss"`` = IMTL-L (loss balance): every loss is replaced by ``e^{s_t} L_t - s_t`` with a learnable ``s_t``
  (initialised to ``init_scale = 0``, as in LibMTL and torchjd's ``IMTLL``); one backward of the sum. Its
  stationary point ``e^{s_t} L_t = 1`` keeps every scaled loss at the same scale. ``parameters()`` returns ``s``;
  its gradient ``e^{s_t} L_t - 1`` is written by :meth:`IMTL.step` and the run's optimiser steps it with the model.
- ``"hybrid"`` (default) = the paper's full IMTL, its headline method (Algorithm 1): IMTL-L scales the losses,
  IMTL-G computes ``alpha`` from the gradients of the *scaled* losses ``e^{s_t} g_t``, the shared parameters get
  ``sum_t alpha_t e^{s_t} g_t``, each head gets the gradient of its own scaled loss ``e^{s_t} grad L_t``, and
  ``s`` gets ``e^{s_t} L_t - 1``. This is what LibMTL's ``IMTL`` implements.

``rep = True`` builds the Gramian from the gradients w.r.t. the shared representation (``ctx.feature_grads()``,
every feature tensor flattened over the batch) instead of the shared parameters, as the paper's Algorithm 1 does
("gradient of shared feature z"), then one backward of ``sum_t alpha_t e^{s_t} L_t`` updates everything (heads
are topped up to their own scaled loss). The default ``rep = False`` uses the exact parameter gradients, as
LibMTL's default and torchjd do; mtlbench's per-task gradients are cheap (one batched VJP through the trunk).

Logged weights (``last_weights``): the effective weight of each raw task gradient in the shared update:
``alpha`` (grad), ``e^s`` (loss), ``alpha * e^s`` (hybrid). In hybrid mode ``alpha`` sums to 1, the product does
not. Since IMTL-G is invariant to rescaling a task's gradient (``alpha_t`` scales by the inverse factor), the
hybrid's shared update lies on the same line as IMTL-G's on the raw gradients (same direction unless the sum-1
normalisation flips its sign, see above); the loss scales change its length and the heads' updates.

Assumptions: the paper does not say how ``s`` is initialised; we use 0 (LibMTL, torchjd). A task with a zero
gradient gets weight 0 from the pseudo-inverse. ``s`` is created on the CPU (the method is built before the model
is moved); its gradient is computed on the CPU from the detached losses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from mtlbench import JacobianMethod, StepContext, register_optimizer

MODES = ("hybrid", "grad", "loss")
_DEGENERATE = 1e-12  # |1^T G^+ n| below this (Gramian normalised to mean diagonal 1): no equal-projection direction


class IMTLGSolution(NamedTuple):
    """IMTL-G weights (float64, CPU; sum 1, or zeros if ``degenerate``) and the common projection ``d . u_t`` of
    the update onto the unit task gradients, on the Gramian normalised to mean diagonal 1 (``1 / (1^T G^+ n)``;
    negative means the sum-1 normalisation turned the update into an ascent direction for every task)."""

    alpha: torch.Tensor
    degenerate: bool
    projection: float


def imtl_g_solve(gramian: torch.Tensor) -> IMTLGSolution:
    """IMTL-G from the Gramian: ``alpha = G^+ n / (1^T G^+ n)`` with ``n_t = sqrt(G_tt)``."""
    G = gramian.detach().to("cpu", torch.float64)
    T = G.shape[0]
    scale = float(G.diagonal().mean()) if T else 0.0
    if T == 0 or not scale > 0.0 or not torch.isfinite(G).all():
        return IMTLGSolution(torch.zeros(T, dtype=torch.float64), True, 0.0)
    G = G / scale
    n = G.diagonal().clamp_min(0.0).sqrt()
    v = torch.linalg.pinv(G, hermitian=True) @ n
    total = float(v.sum())
    if abs(total) < _DEGENERATE:
        return IMTLGSolution(torch.zeros(T, dtype=torch.float64), True, 0.0)
    return IMTLGSolution(v / total, False, 1.0 / total)


def imtl_g_weights(gramian: torch.Tensor) -> torch.Tensor:
    """IMTL-G task weights from the Gramian ``J J^T`` (sum 1; zeros when degenerate); the update is
    ``weights @ J`` and has equal projections onto every unit task gradient (J of full row rank)."""
    return imtl_g_solve(gramian).alpha.to(device=gramian.device, dtype=gramian.dtype)


@register_optimizer("imtl")
class IMTL(JacobianMethod):
    """IMTL (Liu et al., ICLR 2021): equal-projection gradient weights (IMTL-G) + learned loss scales (IMTL-L)."""

    @dataclass
    class Options:
        mode: Literal["hybrid", "grad", "loss"] = "hybrid"
        rep: bool = False
        init_scale: float = 0.0

        def __post_init__(self) -> None:
            if self.mode not in MODES:
                raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
            if self.rep and self.mode == "loss":
                raise ValueError("rep=true needs IMTL-G (mode hybrid or grad); mode 'loss' uses no gradients")
            if not -30.0 <= self.init_scale <= 30.0:
                raise ValueError(f"init_scale must be in [-30, 30] (e^s must stay finite), got {self.init_scale}")

    def __init__(self, task_names: tuple[str, ...], options: Options | None = None) -> None:
        super().__init__(task_names, options if options is not None else self.Options())
        mode = self.options.mode
        if mode == "loss":
            self.requires = frozenset()  # per instance: one backward of the scaled losses, no per-task gradients
        elif self.options.rep:
            self.requires = frozenset({"features"})
        self.log_scales: nn.Parameter | None = None
        if mode in ("hybrid", "loss"):
            self.log_scales = nn.Parameter(torch.full((len(self.task_names),), float(self.options.init_scale)))
        self._where = "a direct aggregate() call"

    # -- learnable loss scales -------------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return [] if self.log_scales is None else [self.log_scales]

    def scales(self) -> torch.Tensor | None:
        """``e^s`` (detached) of the tasks in this step (the present ones where some are absent), or None in mode
        ``grad``."""
        if self.log_scales is None:
            return None
        s = self.log_scales.detach()
        return (s if self.active is None else s[torch.as_tensor(self.active, device=s.device)]).exp()

    def _write_scale_grad(self, losses: torch.Tensor) -> None:
        """d/ds sum_t (e^{s_t} L_t - s_t) = e^{s_t} L_t - 1."""
        s = self.log_scales
        assert s is not None
        g = self.scales() * losses.detach().to(s.device, s.dtype) - 1.0
        if self.active is not None:  # absent tasks: no gradient on their scales
            g = torch.zeros_like(s).index_copy(0, torch.as_tensor(self.active, device=s.device), g)
        s.grad = g if s.grad is None else s.grad + g

    # -- IMTL-G ----------------------------------------------------------------------------------------------
    def _alpha(self, gramian: torch.Tensor) -> torch.Tensor:
        sol = imtl_g_solve(gramian)
        if sol.degenerate:
            self.warn_once("imtl-degenerate", f"imtl: no non-zero direction has equal projections onto the task "
                                              f"gradients at {self._where} (1^T G^+ n = 0, e.g. opposite "
                                              f"gradients); the shared update is 0 there, as in torchjd")
        elif sol.projection < 0:
            self.warn_once("imtl-ascent", f"imtl: at {self._where} the IMTL-G weights, normalised to sum 1 as in "
                                          f"the paper, give equal NEGATIVE projections onto the task gradients "
                                          f"(1^T G^+ n < 0): to first order the step increases every task's loss")
        return sol.alpha

    def _raw_weights(self, gramian: torch.Tensor) -> torch.Tensor:
        """Effective weights of the raw task gradients (float64, CPU) for the current scales."""
        e = self.scales()
        if self.options.mode == "loss":
            assert e is not None
            return e.to(torch.float64).cpu()
        if e is None:
            return self._alpha(gramian)
        e = e.to(torch.float64).cpu()
        G = gramian.detach().to("cpu", torch.float64) * (e[:, None] * e[None, :])  # Gramian of e_t g_t
        return self._alpha(G) * e

    def aggregate(self, J, losses, generator):
        """Shared update and effective task weights for the current loss scales (no side effect on ``s``)."""
        w = self._raw_weights(J @ J.T if self.options.mode != "loss" else torch.empty(0, 0)).to(J.device, J.dtype)
        return w @ J, w

    def step(self, ctx: StepContext) -> None:
        self._where = f"step {ctx.step + 1} (epoch {ctx.epoch})"
        mode, dev, dtype = self.options.mode, ctx.losses[0].device, ctx.losses[0].dtype
        e = self.scales()
        if mode == "loss":
            w = e.to(dev, dtype)
            ctx.backward(w)  # grad of sum_t e^{s_t} L_t for every parameter
        elif self.options.rep:
            Z = torch.stack([torch.cat([g.reshape(-1) for g in task]) for task in ctx.feature_grads()])
            w = self._raw_weights(Z @ Z.T).to(dev, dtype)
            ctx.backward(w)  # shared part and heads, head t scaled by w_t
            head = torch.ones_like(w) if e is None else e.to(dev, dtype)
            if ctx.task_params:
                n_shared = sum(p.numel() for p in ctx.shared_params)
                ctx.set_grads(torch.zeros(n_shared, dtype=dtype, device=dev), head - w)  # heads: own scaled loss
        else:
            J = ctx.jacobian()
            w = self._raw_weights(J @ J.T).to(J.device, J.dtype)
            ctx.set_grads(w @ J, None if e is None else e.to(J.device, J.dtype))
        if self.log_scales is not None:
            self._write_scale_grad(ctx.loss_values)
        self.last_weights = w.detach()

    # -- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {} if self.log_scales is None else {"log_scales": self.log_scales.detach().cpu().tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.log_scales is None or "log_scales" not in state:
            return
        values = torch.as_tensor(state["log_scales"], dtype=self.log_scales.dtype)
        if values.shape != self.log_scales.shape:
            raise ValueError(f"imtl: state has {values.numel()} loss scales for {self.log_scales.numel()} tasks")
        with torch.no_grad():
            self.log_scales.copy_(values.to(self.log_scales.device))
