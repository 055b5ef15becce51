"""DWA: Dynamic Weight Average, from "End-to-End Multi-Task Learning with Attention", Liu, Johns & Davison,
CVPR 2019 (MTAN, arXiv 1803.10704), section "Dynamic Weight Average".

At epoch t the loss of task k is weighted by::

    w_k(t) = K exp(r_k(t-1) / T) / sum_j exp(r_j(t-1) / T),     r_k(t-1) = L_k(t-1) / L_k(t-2)

where ``L_k(t)`` is task k's average training loss over epoch t (the mean of the per-batch losses, which
mtlbench's loop passes to :meth:`end_epoch`), K the number of tasks and T the temperature. The weights sum to
K; a task whose loss dropped less over the last epoch (larger ratio) gets more weight. For the first two epochs
(no two previous averages yet) every weight is 1, as in the paper and the official MTAN code
(``lambda_weight[:, epoch] = 1`` for epochs 0 and 1). The weighted loss is ``sum_k w_k L_k`` (a sum, as in the
official code), one backward per step.

Defaults: temperature ``T = 2`` (the paper's setting; official MTAN code ``T = 2``, LibMTL ``T=2.0``, torchjd
``temperature=2.0``).

Assumptions where the paper is silent: the weights use the unweighted epoch-mean training losses of the two
previous epochs actually run (after a resume, the stored history), whatever happened to the weights; if a task's
older average is not a positive finite number (e.g. a task with no labelled training rows, loss 0) its ratio is
taken as 1 and a warning is recorded, instead of dividing by zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mtlbench import MTLOptimizer, StepContext, register_optimizer


def dwa_weights(previous: torch.Tensor, before_previous: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """DWA weights from the epoch-average losses ``L(t-1)`` (``previous``) and ``L(t-2)`` (``before_previous``).

    Returns ``K * softmax(r / T)`` with ``r = L(t-1) / L(t-2)``; a ratio whose denominator is not a positive finite
    number is taken as 1.
    """
    prev = previous.to(torch.float64)
    old = before_previous.to(torch.float64)
    ok = torch.isfinite(old) & (old > 0) & torch.isfinite(prev)
    ratio = torch.where(ok, prev / torch.where(ok, old, torch.ones_like(old)), torch.ones_like(old))
    return prev.numel() * torch.softmax(ratio / temperature, dim=0)


@register_optimizer("dwa")
class DynamicWeightAverage(MTLOptimizer):
    """DWA (Liu et al., CVPR 2019): weights from the ratio of the last two epochs' losses, temperature 2."""

    task_state = {"_weights": 1}  # a task absent from a batch keeps its weight out of that step

    @dataclass
    class Options:
        temperature: float = 2.0

        def __post_init__(self) -> None:
            if self.temperature <= 0:
                raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def __init__(self, task_names: tuple[str, ...], options: Any = None) -> None:
        super().__init__(task_names, options or self.Options())
        self.history: list[list[float]] = []  # epoch-average losses of the last (up to) two epochs, oldest first
        self._weights = torch.ones(len(self.task_names))

    def _refresh(self) -> None:
        T = len(self.task_names)
        if len(self.history) < 2:
            self._weights = torch.ones(T)
            return
        old, prev = (torch.tensor(h, dtype=torch.float64) for h in self.history[-2:])
        bad = [n for n, v in zip(self.task_names, old.tolist()) if not (math.isfinite(v) and v > 0)]
        if bad or not bool(torch.isfinite(prev).all()):
            self.warn_once("dwa-ratio", f"dwa: epoch-average loss not positive and finite for task(s) "
                                        f"{', '.join(bad) or 'in the last epoch'}; their loss ratio is taken as 1")
        self._weights = dwa_weights(prev, old, self.options.temperature).float()

    def current_weights(self) -> torch.Tensor:
        """The weights used for every step of the current epoch."""
        return self._weights.clone()

    def step(self, ctx: StepContext) -> None:
        device = ctx.losses[0].device
        if self._weights.device != device:
            self._weights = self._weights.to(device)
        ctx.backward(self._weights)
        self.last_weights = self._weights

    def end_epoch(self, epoch: int, train_losses: dict[str, float]) -> None:
        missing = [n for n in self.task_names if n not in train_losses]
        if missing:
            raise ValueError(f"dwa: end_epoch got no training loss for task(s) {', '.join(missing)}")
        self.history = (self.history + [[float(train_losses[n]) for n in self.task_names]])[-2:]
        self._refresh()

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        history = [[float(v) for v in h] for h in state.get("history", [])][-2:]
        if any(len(h) != len(self.task_names) for h in history):
            raise ValueError(f"dwa: state history does not have {len(self.task_names)} tasks per epoch")
        self.history = history
        self._refresh()
