"""DB-MTL: Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Tsang, Kwok, "Dual-Balancing for Multi-Task Learning",
arXiv 2308.12029, 2023 (later in Neural Networks).

Algorithm (the paper, as implemented in LibMTL's ``DB_MTL`` by the same first author; the paper's full text was not
available to re-check the equations here, so LibMTL's code is the reference):

1. loss-scale balancing: every task loss is replaced by ``log(L_i + eps)``, so the task gradient becomes
   ``g_i / (L_i + eps)`` -- invariant to a rescaling of the loss;
2. gradient-magnitude balancing: an exponential moving average of each task's (log-loss) gradient,
   ``g_hat_i <- beta_k g_hat_i + (1 - beta_k) g_i / (L_i + eps)`` with ``beta_k = beta / k^beta_sigma`` (k = 1, 2, ...
   the step), then every averaged gradient is rescaled to the largest norm:
   ``d = sum_i alpha_i g_hat_i`` with ``alpha_i = max_j |g_hat_j| / (|g_hat_i| + eps)``.

Defaults (LibMTL ``config.py``: ``DB_beta=0.9``, ``DB_beta_sigma=0``; the paper's defaults were not checked
beyond LibMTL, which its authors maintain): ``beta = 0.9``, ``beta_sigma = 0`` (a constant EMA coefficient),
``eps = 1e-8`` (LibMTL's constant, used both in the log and in the norm ratio). The EMA starts from zero without
bias correction, as in LibMTL (the first update is ``(1 - beta)`` times the balanced gradient sum; Adam is
largely insensitive to that overall factor).

Assumptions / conventions:

- The update mixes past Jacobians, so it is not ``J^T w`` for the current J: ``aggregate`` returns weights None
  and ``last_weights`` logs the gradient-magnitude factors ``alpha`` (all 1 for the task with the largest EMA
  gradient). With ``beta = 0`` the update is exactly ``J^T (alpha / (L + eps))``.
- Task heads: LibMTL back-propagates each ``log(L_i + eps)`` through its head without EMA or rescaling, so head
  ``i`` gets ``1 / (L_i + eps)`` times its loss gradient; we do the same (weight 1 when ``log_loss=False``).
- Ablation switches (the paper's ablation study): ``log_loss`` (loss-scale balancing) and ``grad_balance``
  (gradient-magnitude balancing; off: ``d = sum_i g_hat_i``).
- Losses must be positive for the log transform; a loss with ``L + eps <= 0`` fails the run with a clear reason.
- State (EMA buffer ``[T, P]`` and step count) is saved by ``state_dict``. Note: the run record embeds
  ``optimizer_state``, so a DB-MTL record holds T x P floats (about 19 MB for mmoe at embed_dim 16).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mtlbench import JacobianMethod, StepContext, register_optimizer
from mtlbench.errors import RunFailed


def db_mtl_update(J: torch.Tensor, losses: torch.Tensor, buffer: torch.Tensor | None, step: int,
                  beta: float = 0.9, beta_sigma: float = 0.0, eps: float = 1e-8, log_loss: bool = True,
                  grad_balance: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DB-MTL step: ``(update [P], alpha [T], new EMA buffer [T, P])``.

    ``buffer`` is the previous EMA of the (log-loss) task gradients (None or zeros at the start) and ``step`` the
    1-based index of this step (it sets ``beta_k = beta / step^beta_sigma``).
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    grads = J.detach()
    if log_loss:
        grads = grads / (losses.detach().to(grads.dtype).to(grads.device) + eps)[:, None]
    beta_k = beta / step ** beta_sigma
    if buffer is None:
        buffer = torch.zeros_like(grads)
    new_buffer = grads + beta_k * (buffer.to(grads.dtype) - grads)
    if grad_balance:
        norms = new_buffer.norm(dim=1)
        alpha = norms.max() / (norms + eps)
    else:
        alpha = torch.ones(grads.shape[0], dtype=grads.dtype, device=grads.device)
    return alpha @ new_buffer, alpha, new_buffer


@register_optimizer("db_mtl")
class DBMTL(JacobianMethod):
    """DB-MTL (Lin et al., 2023): log-loss balancing plus EMA gradients rescaled to the largest norm."""

    task_state = {"buffer": 1}

    @dataclass
    class Options:
        beta: float = 0.9
        beta_sigma: float = 0.0
        eps: float = 1e-8
        log_loss: bool = True
        grad_balance: bool = True

        def __post_init__(self) -> None:
            if not 0.0 <= self.beta < 1.0:
                raise ValueError(f"beta must be in [0, 1), got {self.beta}")
            if self.beta_sigma < 0:
                raise ValueError(f"beta_sigma must be >= 0, got {self.beta_sigma}")
            if self.eps <= 0:
                raise ValueError(f"eps must be > 0, got {self.eps}")

    def __init__(self, task_names, options=None) -> None:
        super().__init__(task_names, options if options is not None else self.Options())
        self.buffer: torch.Tensor | None = None
        self.n_steps = 0
        self._alpha: torch.Tensor | None = None

    def aggregate(self, J, losses, generator):
        o = self.options
        if o.log_loss:
            bad = [i for i, v in enumerate(losses.tolist()) if not v + o.eps > 0]
            if bad:
                names = ", ".join(self.task_names[i] if i < len(self.task_names) else str(i) for i in bad)
                raise RunFailed(f"db_mtl takes log(loss + eps) but task(s) {names} have loss <= -eps "
                                f"(step {self.n_steps + 1}); use log_loss=false for losses that can be negative")
        if self.buffer is not None and self.buffer.shape != J.shape:
            raise ValueError(f"db_mtl's EMA buffer has shape {tuple(self.buffer.shape)}, the Jacobian "
                             f"{tuple(J.shape)}")
        self.n_steps += 1
        update, alpha, self.buffer = db_mtl_update(J, losses, self.buffer, self.n_steps, o.beta, o.beta_sigma,
                                                   o.eps, o.log_loss, o.grad_balance)
        self._alpha = alpha
        return update, None

    def step(self, ctx: StepContext) -> None:
        J = ctx.jacobian()
        losses = ctx.loss_values
        update, _ = self.aggregate(J, losses, ctx.generator)
        if self.options.log_loss:
            head = 1.0 / (losses.to(J.dtype) + self.options.eps)
        else:
            head = None
        ctx.set_grads(update, head)
        self.last_weights = self._alpha

    def state_dict(self) -> dict[str, Any]:
        return {"n_steps": self.n_steps, "buffer": None if self.buffer is None else self.buffer.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n_steps = int(state["n_steps"])
        buf = state.get("buffer")
        self.buffer = None if buf is None else torch.as_tensor(buf).clone()
