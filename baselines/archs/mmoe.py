"""MMoE: "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts", Ma et al.,
KDD 2018.

Eqs. 6-8 of the paper: ``f_k(x) = sum_i g_k(x)_i f_i(x)``, ``g_k(x) = softmax(W_gk x)``, ``y_k = h_k(f_k(x))``:
n identical ReLU-MLP experts shared by all tasks, one linear-softmax gate per task on the raw input (here the
concatenated embeddings), one tower per task. Defaults (8 experts of 128-64, towers of 64, no dropout (``dropout=0.0``),
BatchNorm in the MLPs) follow the MTReclib/FuxiCTR style scaled to CPU budgets; the paper tunes sizes per dataset.
Shared parameters: input layer and experts. Task-specific: gate and tower.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mtlbench import ExpertBank, MultiTaskArch, mix, option_field, register_arch
from mtlbench.arch import FeatureLayout, tower


@register_arch("mmoe")
class MMoE(MultiTaskArch):
    """Multi-gate Mixture-of-Experts (Ma et al., KDD 2018): shared experts, one softmax gate per task."""

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

    def __init__(self, schema, tasks, embed_dim, options=None):
        super().__init__(schema, tasks, embed_dim, options)
        o = options or self.Options()
        self.shared["input"] = inp = self.input_layer()
        self.shared["experts"] = ExpertBank(o.n_experts, inp.output_dim, o.expert_units, o.dropout, o.batch_norm)
        d = self.shared["experts"].output_dim
        for t in self.tasks:
            self.heads[t.name]["gate"] = torch.nn.Linear(inp.output_dim, o.n_experts)
            self.heads[t.name]["tower"] = tower(d, o.tower_units, t, o.dropout, o.batch_norm)

    def feature_layouts(self):
        # the input vector [B, D] and the expert stack [n_experts, B, D] (experts are positions, as Rep-MTL reads)
        return (FeatureLayout(batch_axis=0, channel_axis=-1),
                FeatureLayout(batch_axis=1, channel_axis=-1, position_axes=(0,)))

    def encode(self, batch):
        x = self.shared["input"](batch)
        return x, self.shared["experts"](x)

    def decode(self, features, batch):
        x, experts = features
        out = []
        for t in self.task_names:
            g = torch.softmax(self.heads[t]["gate"](x), dim=-1)
            out.append(self.heads[t]["tower"](mix(experts, g)))
        return out
