"""OMoE: the one-gate Mixture-of-Experts baseline of "Modeling Task Relationships in Multi-task Learning with
Multi-gate Mixture-of-Experts", Ma et al., KDD 2018 (Fig. 1b; eq. 5 of the paper).

``g(x) = softmax(W_g x)``, ``z = sum_i g(x)_i f_i(x)``, ``y_k = h_k(z)``: n identical ReLU-MLP experts and ONE
linear-softmax gate on the raw input (here the concatenated embeddings), shared by every task, so all tasks see
the same mixture; one tower per task. This is MMoE with its per-task gates tied into a single one, which is what
the MMoE paper compares against (Fig. 4/5: OMoE degrades as task correlation drops, MMoE does not).

Options and defaults are MMoE's (``mmoe.py``): 8 experts of 128-64, towers of 64, dropout 0, BatchNorm in the
MLPs (MTReclib/FuxiCTR style scaled to CPU budgets; the paper's synthetic study uses 8 single-layer experts of 16
units and towers of 8, and tunes sizes per dataset on real data).

Shared parameters: input layer, experts and the gate (the gate feeds every task). Task-specific: the tower.
The shared feature is the gate-weighted mixture ``z``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mtlbench import ExpertBank, MultiTaskArch, mix, option_field, register_arch
from mtlbench.arch import tower


@register_arch("omoe")
class OMoE(MultiTaskArch):
    """One-gate Mixture-of-Experts (MMoE paper, Fig. 1b): shared experts, one softmax gate shared by all tasks."""

    @dataclass
    class Options:
        n_experts: int = option_field(8, "number of experts", minimum=1)
        expert_units: tuple[int, ...] = option_field((128, 64), "expert hidden widths", minimum=1)
        tower_units: tuple[int, ...] = option_field((64,), "tower hidden widths", minimum=1)
        dropout: float = option_field(0.0, "dropout rate", minimum=0, maximum=1, open_maximum=True)
        batch_norm: bool = True

        def __post_init__(self) -> None:
            if self.n_experts < 1:
                raise ValueError(f"n_experts must be at least 1, got {self.n_experts}")
            if not self.expert_units or any(u < 1 for u in self.expert_units):
                raise ValueError(f"expert_units must be one or more positive widths, got {self.expert_units}")
            if any(u < 1 for u in self.tower_units):
                raise ValueError(f"tower_units must be positive widths, got {self.tower_units}")
            if not 0.0 <= self.dropout < 1.0:
                raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def __init__(self, schema, tasks, embed_dim, options=None):
        super().__init__(schema, tasks, embed_dim, options)
        o = options or self.Options()
        self.shared["input"] = inp = self.input_layer()
        self.shared["experts"] = ExpertBank(o.n_experts, inp.output_dim, o.expert_units, o.dropout, o.batch_norm)
        self.shared["gate"] = torch.nn.Linear(inp.output_dim, o.n_experts)
        d = self.shared["experts"].output_dim
        for t in self.tasks:
            self.heads[t.name]["tower"] = tower(d, o.tower_units, t, o.dropout, o.batch_norm)

    def encode(self, batch):
        x = self.shared["input"](batch)
        return (mix(self.shared["experts"](x), torch.softmax(self.shared["gate"](x), dim=-1)),)

    def decode(self, features, batch):
        (z,) = features
        return [self.heads[t]["tower"](z) for t in self.task_names]
