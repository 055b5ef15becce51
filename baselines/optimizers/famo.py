"""FAMO: "FAMO: Fast Adaptive Multitask Optimization", Liu, Feng, Stone & Liu, NeurIPS 2023 (arXiv 2306.03792).

FAMO aims at an equal rate of decrease of every log-loss using only the loss values (O(1) extra space and time).
With task logits ``xi`` (initialised to 0) and ``z = softmax(xi)``:

1. Model update: minimise ``c * sum_i z_i log(L_i - b_i + eps)`` with ``c = (sum_i z_i / (L_i - b_i + eps))^-1``
   held constant. Its gradient is ``sum_i (c z_i / (L_i - b_i + eps)) grad L_i``, a convex combination of the task
   gradients (the coefficients sum to 1), so it is written as one ``ctx.backward(coefficients)``.
2. Logit update, after the model step: with ``delta_i = log(L_i^before - b_i + eps) - log(L_i^after - b_i + eps)``
   (the decrease of each log-loss over the step), ``xi`` takes one step on the gradient ``J_softmax(xi)^T delta``
   with weight decay ``gamma``: tasks whose loss fell more lose weight, the weight moves toward the tasks whose
   loss decreases slower.

Defaults: ``lr = 0.025`` (Adam on ``xi``; paper, official code ``w_lr`` / ``--method-params-lr``, LibMTL, torchjd);
``gamma = 1e-3`` (the paper's Algorithm 2, LibMTL ``FAMO_w_gamma`` and torchjd ``weight_decay``; the official
code's defaults vary: ``1e-5`` in ``methods/weight_methods.py``, ``0.01`` in its argument parser and ``famo.py``,
``1e-3`` in its QM9 ``run.sh``), applied as Adam's L2 weight decay like every implementation;
``min_loss = 0`` (the lower bound ``b_i``, official ``min_losses`` zeros) and ``eps = 1e-8`` (official code).
``logit_optimizer="sgd"`` gives the plain step of the paper's Algorithm 1, ``xi <- xi - lr (grad + gamma xi)``.
The official training scripts pass ``max_norm=1.0`` but call ``clip_grad_norm_`` before ``loss.backward()``, so
it never clips; it is not reproduced.

Where ``L^after`` comes from (``extra_forward``):

- ``True`` (default): as the official code, LibMTL and torchjd, ``ctx.forward()`` under ``torch.no_grad()`` in
  ``after_step`` recomputes the losses on the same batch at the updated parameters: exact ``delta``, one extra
  forward per step (~1.2-1.5x ``ew`` measured for the libraries). Like the official code, this forward runs in
  training mode (BatchNorm running statistics see the batch twice).
- ``False``: no extra forward. At step t+1 the losses of the new batch, at the updated parameters, serve as
  ``L^after`` against step t's losses, and ``xi`` is updated at the start of step t+1 before weighting it. Cost
  ~1.0x ``ew``, but ``delta`` then mixes the parameter step with batch-to-batch variation of the losses: measured
  on ``mmoe``/``ecommerce``, the signal is about 7x noisier and has the right sign in 65 % of steps against 92 %
  for the same-batch update. A cheaper variant, not the method of the paper; one update is lost per run (the
  last step's) and the first step has none.

Assumption where the paper is silent: a task whose loss is at or below its bound ``b_i`` in a batch (e.g. a masked
task with no labelled rows: loss 0) has no defined log-loss; it gets coefficient 0 in step 1 (``c`` is computed
over the other tasks) and ``delta_i = 0`` in step 2, with a warning in the run record. ``last_weights`` logs the
coefficients of step 1 (``log_weights="effective"``, comparable with other methods' weights on the task
gradients; they sum to 1) or ``z`` (``log_weights="softmax"``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mtlbench import MTLOptimizer, StepContext, register_optimizer

EPS = 1e-8  # the official code's offset inside the log
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


def famo_coefficients(logits: torch.Tensor, losses: torch.Tensor, min_loss: float | torch.Tensor = 0.0
                      ) -> torch.Tensor:
    """Coefficients ``c z_i / (L_i - b_i + eps)`` of the task gradients in FAMO's update (they sum to 1); tasks
    with ``L_i <= b_i`` get 0 and ``c`` is taken over the others."""
    z = torch.softmax(logits.double(), dim=0)
    shifted = losses.double() - min_loss
    valid = shifted > 0
    q = torch.where(valid, z / (shifted + EPS), torch.zeros_like(z))
    return q / q.sum().clamp(min=torch.finfo(torch.float64).tiny)


def famo_logit_grad(logits: torch.Tensor, before: torch.Tensor, after: torch.Tensor,
                    min_loss: float | torch.Tensor = 0.0) -> torch.Tensor:
    """``J_softmax(xi)^T delta`` with ``delta_i = log(before_i - b_i + eps) - log(after_i - b_i + eps)`` (0 where
    either loss is at or below its bound): the gradient FAMO's logit optimizer descends."""
    b, a = before.double() - min_loss, after.double() - min_loss
    valid = (b > 0) & (a > 0)
    delta = torch.where(valid, torch.log(b.clamp(min=0) + EPS) - torch.log(a.clamp(min=0) + EPS), torch.zeros_like(b))
    z = torch.softmax(logits.double(), dim=0)
    return z * (delta - (z * delta).sum())


@register_optimizer("famo")
class FAMO(MTLOptimizer):
    """FAMO (Liu et al., NeurIPS 2023): softmax task weights learned from the decrease of the log-losses."""

    task_state = {"logits": 1, "_m": 1, "_v": 1, "_before": 1}

    @dataclass
    class Options:
        lr: float = 0.025
        gamma: float = 1e-3
        min_loss: float = 0.0
        extra_forward: bool = True
        logit_optimizer: Literal["adam", "sgd"] = "adam"
        log_weights: Literal["effective", "softmax"] = "effective"

        def __post_init__(self) -> None:
            if self.lr < 0:
                raise ValueError(f"lr must be >= 0, got {self.lr}")
            if self.gamma < 0:
                raise ValueError(f"gamma must be >= 0, got {self.gamma}")

    def __init__(self, task_names: tuple[str, ...], options: Any = None) -> None:
        super().__init__(task_names, options or self.Options())
        T = len(self.task_names)
        self.logits = torch.zeros(T, dtype=torch.float64)
        self._m = torch.zeros(T, dtype=torch.float64)
        self._v = torch.zeros(T, dtype=torch.float64)
        self._t = 0
        self._before: torch.Tensor | None = None  # the losses the next logit update compares against

    @property
    def z(self) -> torch.Tensor:
        """The current task weights ``softmax(xi)``."""
        return torch.softmax(self.logits, dim=0)

    def update_logits(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """One logit step from the losses before and after a model update (FAMO's step 2)."""
        g = famo_logit_grad(self.logits, before, after, self.options.min_loss)
        g = g + self.options.gamma * self.logits  # L2 weight decay, as torch.optim.Adam(weight_decay=gamma)
        lr = self.options.lr
        if self.options.logit_optimizer == "sgd":
            self.logits = self.logits - lr * g
            return
        b1, b2 = ADAM_BETAS
        self._t += 1
        self._m = b1 * self._m + (1 - b1) * g
        self._v = b2 * self._v + (1 - b2) * g * g
        denom = self._v.sqrt() / math.sqrt(1 - b2 ** self._t) + ADAM_EPS
        self.logits = self.logits - (lr / (1 - b1 ** self._t)) * self._m / denom

    def _check_bounds(self, L: torch.Tensor, ctx: StepContext) -> None:
        if not bool((L > self.options.min_loss).all()):
            names = [n for n, v in zip(self.task_names, L.tolist()) if not v > self.options.min_loss]
            self.warn_once("famo-bound", f"famo: loss of task(s) {', '.join(names)} at or below min_loss "
                                         f"{self.options.min_loss} at step {ctx.step + 1}; left out of that step's "
                                         f"weighting and logit update")

    def step(self, ctx: StepContext) -> None:
        L = ctx.loss_values.double()
        if self.logits.device != L.device:
            self.logits, self._m, self._v = self.logits.to(L.device), self._m.to(L.device), self._v.to(L.device)
            if self._before is not None:
                self._before = self._before.to(L.device)
        self._check_bounds(L, ctx)
        if not self.options.extra_forward and self._before is not None:
            self.update_logits(self._before, L)
        coef = famo_coefficients(self.logits, L, self.options.min_loss)
        ctx.backward(coef)
        self._before = L
        self.last_weights = (coef if self.options.log_weights == "effective" else self.z).float()

    def after_step(self, ctx: StepContext) -> None:
        if not self.options.extra_forward or self._before is None:
            return
        with torch.no_grad():
            _, losses = ctx.forward()
            after = torch.stack([l.detach() for l in losses]).double()
        self.update_logits(self._before, after)
        self._before = None

    # -- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"logits": self.logits.cpu().tolist(), "adam_m": self._m.cpu().tolist(),
                "adam_v": self._v.cpu().tolist(), "adam_t": self._t,
                "before": None if self._before is None else self._before.cpu().tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        T = len(self.task_names)
        dev = self.logits.device
        logits = torch.tensor(state["logits"], dtype=torch.float64, device=dev)
        if logits.numel() != T:
            raise ValueError(f"famo: state has {logits.numel()} logits for {T} tasks")
        self.logits = logits
        self._m = torch.tensor(state["adam_m"], dtype=torch.float64, device=dev)
        self._v = torch.tensor(state["adam_v"], dtype=torch.float64, device=dev)
        self._t = int(state["adam_t"])
        before = state.get("before")
        self._before = None if before is None else torch.tensor(before, dtype=torch.float64, device=dev)
