"""UW: "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and Semantics", Kendall, Gal &
Cipolla, CVPR 2018 (arXiv 1705.07115).

Homoscedastic uncertainty weighting. Each task i gets a learnable log-variance ``s_i = log sigma_i^2`` and the
model minimises, jointly over the network and the ``s_i``::

    L_total = sum_i exp(-s_i) * L_i + s_i                      (form="kendall", the default)
    L_total = sum_i 0.5 * exp(-s_i) * L_i + 0.5 * s_i          (form="half")

so the weight of task i is ``exp(-s_i)`` (``0.5 exp(-s_i)`` with "half"), and ``s_i`` settles where
``d L_total / d s_i = 1 - exp(-s_i) L_i = 0``, i.e. at ``s_i = log L_i``: every weighted loss tends to 1 (or 1/2).

Which form (the paper's equations differ by task type). The paper derives, from a Gaussian likelihood for
regression, ``1/(2 sigma^2) L + log sigma`` = ``0.5 exp(-s) L + 0.5 s``, and from a scaled softmax likelihood for
classification, approximately ``1/sigma^2 L + log sigma`` = ``exp(-s) L + 0.5 s``. Applying the per-type form
would make the weights depend on mtlbench's task kinds, so we use one form for every task, as every reference
implementation does:

- default ``form="kendall"``: ``exp(-s) L + s``, the form of the authors' public example (Gal's
  ``multi-task-learning-example`` notebooks: ``exp(-log_var) * loss + log_var``). It is the regression form
  times 2, with the same stationary ``s_i = log L_i`` and weights ``exp(-s_i)`` that equal 1 (as in ``ew``) at
  the initial ``s = 0``, so UW starts exactly as equal weighting and only the learned scale differs.
- ``form="half"``: ``0.5 (exp(-s) L + s)``, the paper's regression form, as in LibMTL (``UW``), torchjd
  (``scalarization.UW``) and the FAMO/Nash-MTL code bases. (LibMTL's code is this "half" form, not
  ``exp(-s)L + s``.) It halves every gradient relative to "kendall"; with Adam that mostly changes nothing.

Defaults: ``init_log_var = 0`` (``sigma^2 = 1``), as in the authors' example and torchjd (LibMTL uses -0.5; the
paper reports robustness to the initial value). The log-variances are returned by :meth:`parameters`, so the
run's torch optimizer steps them with the model, at the run's learning rate and weight decay (the official FAMO /
Nash-MTL trainers use a separate learning rate of 0.025 for them; mtlbench's contract has one learning rate for
all parameters, see the report). ``last_weights`` = ``exp(-s)`` (times 0.5 with "half"), the factor multiplying
each task loss. Cost: one backward, as ``ew``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from mtlbench import MTLOptimizer, StepContext, register_optimizer


def uw_loss(losses: torch.Tensor, log_vars: torch.Tensor, form: str = "kendall") -> torch.Tensor:
    """The UW objective for a loss vector ``[T]`` and log-variances ``s`` ``[T]`` (differentiable in both)."""
    total = torch.exp(-log_vars) * losses + log_vars
    if form == "half":
        total = 0.5 * total
    return total.sum()


def uw_weights(log_vars: torch.Tensor, form: str = "kendall") -> torch.Tensor:
    """The factor multiplying each task loss: ``exp(-s)`` (``0.5 exp(-s)`` for the "half" form)."""
    w = torch.exp(-log_vars.detach())
    return 0.5 * w if form == "half" else w


@register_optimizer("uw")
class UncertaintyWeighting(MTLOptimizer):
    """UW (Kendall et al., CVPR 2018): learned homoscedastic uncertainty, loss exp(-s_i) L_i + s_i."""

    @dataclass
    class Options:
        form: Literal["kendall", "half"] = "kendall"  # exp(-s)L + s, or 0.5 (exp(-s)L + s)
        init_log_var: float = 0.0

        def __post_init__(self) -> None:
            if not -20.0 <= self.init_log_var <= 20.0:
                raise ValueError(f"init_log_var must be within [-20, 20] (weights exp(-s)), got {self.init_log_var}")

    def __init__(self, task_names: tuple[str, ...], options: Any = None) -> None:
        super().__init__(task_names, options or self.Options())
        self.log_vars = nn.Parameter(torch.full((len(self.task_names),), float(self.options.init_log_var)))
        self._stay = False

    def parameters(self) -> list[nn.Parameter]:
        return [self.log_vars]

    def step(self, ctx: StepContext) -> None:
        device = ctx.losses[0].device
        if self.log_vars.device != device and not self._stay:
            # the method is built before the model's device is known: follow the losses (first step), in place:
            # the torch optimizer holds this same Parameter and creates its state lazily; nn.Module.to() moves
            # parameters the same way
            try:
                self.log_vars.data = self.log_vars.data.to(device)
            except RuntimeError:
                self._stay = True  # the objective is then computed on the parameter's device (autograd crosses)
        # a task absent from the batch (issue 16) is left out of the objective, so its s_t gets no gradient
        s = self.log_vars if self.active is None else self.log_vars[torch.as_tensor(self.active,
                                                                                    device=self.log_vars.device)]
        losses = torch.stack(ctx.losses).to(device=s.device, dtype=s.dtype)  # autograd flows through .to()
        ctx.plus_aux(uw_loss(losses, s, self.options.form)).backward()  # + an arch's auxiliary loss
        self.last_weights = uw_weights(s, self.options.form)

    def state_dict(self) -> dict[str, Any]:
        return {"log_vars": self.log_vars.detach().cpu().tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        values = torch.as_tensor(state["log_vars"], dtype=self.log_vars.dtype)
        if values.shape != self.log_vars.shape:
            raise ValueError(f"uw: state has {values.numel()} log-variances for {self.log_vars.numel()} tasks")
        with torch.no_grad():
            self.log_vars.copy_(values)  # in place: the torch optimizer keeps stepping the same Parameter
