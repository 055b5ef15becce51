"""GradNorm: "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask Networks", Chen,
Badrinarayanan, Lee & Rabinovich, ICML 2018 (arXiv 1711.02257).

The network minimises ``sum_i w_i(t) L_i(t)`` while the loss weights ``w_i`` (initialised to 1) are learned so
that each task's weighted gradient norm tracks a common norm scaled by its relative inverse training rate
(Section 3 and Algorithm 1 of the paper)::

    G_i = || grad_W (w_i L_i) || = w_i ||grad_W L_i||,      G_bar = mean_j G_j
    r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0))
    L_grad = sum_i | G_i - G_bar * r_i^alpha |              (the target G_bar r_i^alpha is held constant)

Each step: the model update uses the current weights ``w(t)``; then ``w`` takes one optimizer step on
``d L_grad / d w_i = sign(G_i - target_i) ||grad_W L_i||`` and is renormalised so that ``sum_i w_i = T``
(Algorithm 1). A task that trains slower than the others (larger loss ratio) gets a larger target norm.

Defaults and where they come from:

- ``alpha = 1.5`` (the paper's value for its NYUv2 experiments; LibMTL's default).
- ``W``, the weights whose gradient norms are balanced (``grad_source``): the paper uses the last shared layer's
  weights, which mtlbench's architecture contract does not single out. Two choices are offered:
  ``"features"`` (default) — the norm of ``d L_i / d features``, the gradient with respect to the whole shared
  representation that the heads read (``ctx.feature_grads()``: T backward passes through the heads only, cheap;
  this is the "representation" variant LibMTL allows for GradNorm with ``rep_grad=True``); ``"shared_params"`` —
  the norm of the full per-task gradient of all shared parameters (``ctx.jacobian()``: T VJPs through the trunk,
  costly, the most literal reading of "W = shared weights"). This choice is an assumption; the norms differ in
  scale but GradNorm only uses their ratios to their mean.
- Optimiser of ``w``: we found no optimiser or learning rate for ``w`` stated in the paper; default
  ``optimizer="adam"`` with ``lr = 0.025`` (Adam betas 0.9/0.999, eps 1e-8), the learning rate the FAMO / Nash-MTL
  code bases give to method parameters (``--method-params-lr 0.025``); ``optimizer="sgd"`` is plain gradient
  descent. Assumption. (LibMTL instead parameterises ``w = T softmax(logits)``.)
- ``L_i(0)``: the paper uses the loss at the start of training; ``initial_loss="first_step"`` (default) takes
  each task's first positive batch loss. ``"first_epoch"`` follows LibMTL instead: equal weights during the first
  epoch and ``L_i(0)`` = that epoch's mean training loss.

Assumptions where the paper is unclear: a task whose batch loss is 0 (e.g. no labelled rows in the batch) is left
out of ``G_bar``, ``r`` and the weight update for that step; a weight driven below ``1e-3`` (mean weight 1) is
clamped there before renormalising, with a warning in the run record (the paper's renormalisation alone cannot
keep weights positive). Cost: T head-only backward passes plus one full backward (``"features"``), or T trunk VJPs
and no extra backward (``"shared_params"``: the update is written as ``J^T w``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mtlbench import MTLOptimizer, StepContext, register_optimizer

MIN_WEIGHT = 1e-3  # floor on a weight before renormalisation (weights average 1)
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


def gradnorm_weight_grad(weights: torch.Tensor, grad_norms: torch.Tensor, loss_ratios: torch.Tensor,
                         alpha: float = 1.5, active: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dL_grad/dw, L_grad, targets)`` for weights ``w``, unweighted norms ``||grad_W L_i||`` and loss ratios
    ``L_i / L_i(0)``, with the targets ``G_bar r_i^alpha`` held constant. Tasks where ``active`` is False are
    left out of ``G_bar``, the mean ratio and ``L_grad`` and get a zero gradient."""
    w, n, ratio = weights.double(), grad_norms.double(), loss_ratios.double()
    if active is None:
        active = torch.ones_like(w, dtype=torch.bool)
    k = active.sum().clamp(min=1)
    G = w * n
    G_bar = torch.where(active, G, torch.zeros_like(G)).sum() / k
    mean_ratio = torch.where(active, ratio, torch.zeros_like(ratio)).sum() / k
    r = torch.where(active, ratio / mean_ratio, torch.ones_like(ratio))
    targets = G_bar * r.pow(alpha)
    diff = torch.where(active, G - targets, torch.zeros_like(G))
    return torch.sign(diff) * n, diff.abs().sum(), targets


def renormalize(weights: torch.Tensor, floor: float = MIN_WEIGHT) -> tuple[torch.Tensor, bool]:
    """Clamp to ``floor`` and rescale so the weights sum to T; also says whether any weight was clamped."""
    clamped = bool((weights < floor).any())
    w = weights.clamp(min=floor)
    return w * (w.numel() / w.sum()), clamped


def _adam(param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], lr: float) -> torch.Tensor:
    """One step of Adam (torch.optim.Adam's arithmetic, no weight decay) on a plain tensor; returns the new value."""
    b1, b2 = ADAM_BETAS
    state["t"] += 1
    state["m"] = b1 * state["m"] + (1 - b1) * grad
    state["v"] = b2 * state["v"] + (1 - b2) * grad * grad
    denom = (state["v"].sqrt() / math.sqrt(1 - b2 ** state["t"])) + ADAM_EPS
    return param - (lr / (1 - b1 ** state["t"])) * state["m"] / denom


@register_optimizer("gradnorm")
class GradNorm(MTLOptimizer):
    """GradNorm (Chen et al., ICML 2018): learn loss weights that balance the tasks' gradient norms, alpha 1.5."""

    task_state = {"weights": 1, "initial_losses": 1, "_opt.m": 1, "_opt.v": 1}

    @dataclass
    class Options:
        alpha: float = 1.5
        lr: float = 0.025
        optimizer: Literal["adam", "sgd"] = "adam"
        grad_source: Literal["features", "shared_params"] = "features"
        initial_loss: Literal["first_step", "first_epoch"] = "first_step"

        def __post_init__(self) -> None:
            if self.alpha < 0:
                raise ValueError(f"alpha must be >= 0, got {self.alpha}")
            if self.lr <= 0:
                raise ValueError(f"lr must be > 0, got {self.lr}")

    def __init__(self, task_names: tuple[str, ...], options: Any = None) -> None:
        super().__init__(task_names, options or self.Options())
        # instance attribute: what is needed depends on the option (check_compatible reads it)
        self.requires = frozenset({"shared_grads"} if self.options.grad_source == "shared_params" else {"features"})
        T = len(self.task_names)
        self.weights = torch.ones(T, dtype=torch.float64)
        self.initial_losses = torch.full((T,), math.nan, dtype=torch.float64)
        self._opt: dict[str, Any] = {"t": 0, "m": torch.zeros(T, dtype=torch.float64),
                                     "v": torch.zeros(T, dtype=torch.float64)}
        self.last_grad_norms: torch.Tensor | None = None
        self.last_gradnorm_loss: float | None = None

    # -- the step --------------------------------------------------------------------------------------------
    def _grad_norms(self, ctx: StepContext) -> torch.Tensor:
        if self.options.grad_source == "shared_params":
            return ctx.jacobian().double().norm(dim=1)
        return torch.stack([torch.sqrt(sum((g.double() ** 2).sum() for g in fg)) for fg in ctx.feature_grads()])

    def _to(self, device: torch.device) -> None:
        if self.weights.device != device:
            self.weights = self.weights.to(device)
            self.initial_losses = self.initial_losses.to(device)
            self._opt["m"], self._opt["v"] = self._opt["m"].to(device), self._opt["v"].to(device)

    def step(self, ctx: StepContext) -> None:
        L = ctx.loss_values.double()
        self._to(L.device)
        if self.options.initial_loss == "first_step":
            self.initial_losses = torch.where(torch.isnan(self.initial_losses) & (L > 0), L, self.initial_losses)
        elif bool(torch.isnan(self.initial_losses).all()):  # "first_epoch": equal weights until L(0) is known
            ctx.backward()
            self.last_weights = torch.ones(len(self.task_names))
            return
        w = self.weights.clone()
        norms = self._grad_norms(ctx)
        L0 = self.initial_losses
        active = torch.isfinite(L0) & (L0 > 0) & (L > 0)
        grad, lgrad, _ = gradnorm_weight_grad(w, norms, L / torch.where(active, L0, torch.ones_like(L0)),
                                              self.options.alpha, active)
        # model update with w(t), before the weights move (Algorithm 1)
        if self.options.grad_source == "shared_params":
            J = ctx.jacobian()
            ctx.set_grads(w.to(J.dtype) @ J, w.to(J.dtype))
        else:
            ctx.backward(w)
        # weight update, then renormalisation to sum T
        if self.options.optimizer == "adam":
            new = _adam(w, grad, self._opt, self.options.lr)
        else:
            new = w - self.options.lr * grad
        self.weights, clamped = renormalize(new)
        if clamped:
            names = [n for n, v in zip(self.task_names, new.tolist()) if v < MIN_WEIGHT]
            self.warn_once("gradnorm-floor", f"gradnorm: weight of task(s) {', '.join(names)} fell below "
                                             f"{MIN_WEIGHT} at step {ctx.step + 1}; clamped before renormalising")
        self.last_grad_norms = norms.detach()
        self.last_gradnorm_loss = float(lgrad)
        self.last_weights = w.float()

    def end_epoch(self, epoch: int, train_losses: dict[str, float]) -> None:
        if self.options.initial_loss == "first_epoch" and bool(torch.isnan(self.initial_losses).all()):
            vals = torch.tensor([float(train_losses[n]) for n in self.task_names], dtype=torch.float64)
            self.initial_losses = torch.where(vals > 0, vals, torch.full_like(vals, math.nan)).to(
                self.initial_losses.device)

    # -- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.cpu().tolist(),
                "initial_losses": [None if math.isnan(v) else v for v in self.initial_losses.cpu().tolist()],
                "opt_t": self._opt["t"], "opt_m": self._opt["m"].cpu().tolist(),
                "opt_v": self._opt["v"].cpu().tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        T = len(self.task_names)
        dev = self.weights.device
        weights = torch.tensor(state["weights"], dtype=torch.float64, device=dev)
        if weights.numel() != T:
            raise ValueError(f"gradnorm: state has {weights.numel()} weights for {T} tasks")
        self.weights = weights
        self.initial_losses = torch.tensor([math.nan if v is None else float(v) for v in state["initial_losses"]],
                                           dtype=torch.float64, device=dev)
        self._opt = {"t": int(state["opt_t"]),
                     "m": torch.tensor(state["opt_m"], dtype=torch.float64, device=dev),
                     "v": torch.tensor(state["opt_v"], dtype=torch.float64, device=dev)}
