"""ESMM: "Entire Space Multi-Task Model: An Effective Approach for Estimating Post-Click Conversion Rate",
Ma, Zhao, Huang, Wang, Hu, Zhu, Gai, SIGIR 2018.

``pCTR = sigmoid(f(x; theta_ctr))``, ``pCVR = sigmoid(f(x; theta_cvr))`` from two towers over the *shared*
embedding dictionary, and ``pCTCVR = pCTR * pCVR``. The objective (eq. 3 of the paper) has no direct CVR term:
``L = sum_i l(click_i, pCTR_i) + sum_i l(click_i & conversion_i, pCTCVR_i)``, both over ALL impressions, so the
CVR tower is trained only through the CTCVR product, on the entire space (the fix for sample selection bias).

Outputs (one per task of the run, in the run's order): the ctr logit, the cvr logit, and for ctcvr the logit of
the product, ``log p - log(1 - p)`` with ``log p = logsig(a) + logsig(b)`` and
``log(1 - p) = logaddexp(logsig(-a), logsig(a) + logsig(-b))`` (since ``1 - s(a) s(b) = s(-a) + s(a) s(-b)``):
finite for any finite logits, so the CTCVR BCE never sees log(0). Evaluation is the suite's usual masked one:
CVR AUC on clicked impressions (the dataset's cvr mask, the paper's CVR AUC), CTCVR AUC on all impressions.

Losses: :meth:`loss_tasks` is ``(ctr, ctcvr)`` (in the order they appear in the run); :meth:`task_losses` gives
the masked BCE of the ctr logit on the ctr labels and of the product logit on the ctcvr labels (the ctcvr mask
is all impressions in the ``ecommerce`` dataset). The cvr task is predicted and evaluated, never trained
directly; the run may omit it (``--tasks ctr,ctcvr``), but it must contain the ctr and ctcvr tasks.

Where the parameters live (what an MTL optimizer sees): the CTR tower feeds both losses (directly, and through
the product), so it is a *shared* parameter group: ``self.shared["ctr_tower"]``, with the ctr logit exposed as a
shared feature. The CVR tower is reached by the ctcvr loss only: ``self.heads["ctcvr"]["cvr_tower"]``.
``self.heads`` is keyed by the loss tasks; ``heads["ctr"]`` is empty. Shared: input layer (embeddings) + CTR tower.

Options: the names of the three tasks (defaults ``ctr``, ``cvr``, ``ctcvr``, the ``ecommerce`` names) and the
tower shape. The paper's towers are MLPs 360 x 200 x 80 x 2 with ReLU (embedding dim 18): ``tower_units``
defaults to (200, 80) hidden units, then a 1-unit logit; BatchNorm on by default like every built-in arch
(``batch_norm=false`` for the paper's plain MLP), dropout 0. All three tasks must be binary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtlbench import MLP, MtlbenchError, MultiTaskArch, option_field, register_arch
from mtlbench.objectives import task_loss


def product_logit(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``logit(sigmoid(a) * sigmoid(b))``, computed in log space (finite for all finite ``a``, ``b``)."""
    log_p = F.logsigmoid(a) + F.logsigmoid(b)
    log_1mp = torch.logaddexp(F.logsigmoid(-a), F.logsigmoid(a) + F.logsigmoid(-b))
    return log_p - log_1mp


@register_arch("esmm")
class ESMM(MultiTaskArch):
    """ESMM (Ma et al., SIGIR 2018): pCTCVR = pCTR x pCVR; losses on ctr and ctcvr over all impressions."""

    @dataclass
    class Options:
        ctr_task: str = "ctr"
        cvr_task: str = "cvr"
        ctcvr_task: str = "ctcvr"
        tower_units: tuple[int, ...] = option_field((200, 80), "tower hidden widths", minimum=1)
        dropout: float = option_field(0.0, "dropout rate", minimum=0, maximum=1, open_maximum=True)
        batch_norm: bool = True

        def __post_init__(self) -> None:
            names = (self.ctr_task, self.cvr_task, self.ctcvr_task)
            if len(set(names)) < 3:
                raise ValueError(f"ctr_task, cvr_task and ctcvr_task must be three different tasks, got "
                                 f"{', '.join(names)}")
            if any(u < 1 for u in self.tower_units):
                raise ValueError(f"tower_units must be positive widths, got {self.tower_units}")
            if not 0.0 <= self.dropout < 1.0:
                raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def __init__(self, schema, tasks, embed_dim, options=None):
        super().__init__(schema, tasks, embed_dim, options)
        o = self.o = options or self.Options()
        roles = {"ctr_task": o.ctr_task, "cvr_task": o.cvr_task, "ctcvr_task": o.ctcvr_task}
        run = ", ".join(self.task_names)
        for role in ("ctr_task", "ctcvr_task"):
            if roles[role] not in self.task_names:
                raise MtlbenchError(f"esmm needs its {role} '{roles[role]}' in the run's tasks (got {run}); "
                                    f"list it in --tasks or set -A {role}=NAME to one of {run}")
        extra = [t for t in self.task_names if t not in roles.values()]
        if extra:
            raise MtlbenchError(f"esmm predicts only {o.ctr_task}, {o.cvr_task} and {o.ctcvr_task}; task(s) "
                                f"{', '.join(extra)} of this run have no role (set -A ctr_task/cvr_task/"
                                f"ctcvr_task, or drop them from --tasks)")
        bad = [t.name for t in self.tasks if t.kind != "binary"]
        if bad:
            raise MtlbenchError(f"esmm needs binary tasks; {', '.join(bad)} is not (kind: "
                                f"{', '.join(t.kind for t in self.tasks if t.name in bad)})")
        self._loss_tasks = tuple(t for t in self.task_names if t in (o.ctr_task, o.ctcvr_task))
        self._idx = {t: i for i, t in enumerate(self.task_names)}
        self.heads = nn.ModuleDict({t: nn.ModuleDict() for t in self._loss_tasks})
        self.shared["input"] = inp = self.input_layer()
        self.shared["ctr_tower"] = MLP(inp.output_dim, o.tower_units, o.dropout, o.batch_norm, out_dim=1)
        self.heads[o.ctcvr_task]["cvr_tower"] = MLP(inp.output_dim, o.tower_units, o.dropout, o.batch_norm,
                                                    out_dim=1)

    def describe(self) -> dict[str, Any]:
        o = self.o
        return {"loss_tasks": list(self._loss_tasks), "ctr_task": o.ctr_task, "cvr_task": o.cvr_task,
                "ctcvr_task": o.ctcvr_task, "ctr_tower": "shared", "cvr_tower": f"heads.{o.ctcvr_task}"}

    def loss_tasks(self) -> tuple[str, ...]:
        return self._loss_tasks

    def encode(self, batch):
        x = self.shared["input"](batch)
        return x, self.shared["ctr_tower"](x)

    def decode(self, features, batch):
        x, ctr = features
        cvr = self.heads[self.o.ctcvr_task]["cvr_tower"](x)
        by_role = {self.o.ctr_task: ctr, self.o.cvr_task: cvr, self.o.ctcvr_task: product_logit(ctr, cvr)}
        return [by_role[t] for t in self.task_names]

    def task_losses(self, outputs, batch):
        out = []
        for name in self._loss_tasks:
            i = self._idx[name]
            out.append(task_loss(self.tasks[i], outputs[i], batch["labels"][:, i], batch["masks"][:, i]))
        return out
