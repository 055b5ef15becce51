"""HoME: "HoME: Hierarchy of Multi-Gate Experts for Multi-Task Learning at Kuaishou", Wang, Cao, Fu, Gai, Zhou,
arXiv 2408.05430 (2024).

Four mechanisms, each switchable for ablation (``expert_norm``, ``hierarchy``, ``feature_gate``, ``self_gate``);
the task towers' BatchNorm has its own switch, ``tower_norm`` (default on), so ``expert_norm=false`` changes the
experts only:

1. **Expert normalisation & Swish** (against expert collapse): every expert layer is Linear -> BatchNorm -> Swish,
   so all experts' outputs have comparable scale before gates mix them. Off: Linear -> ReLU, no normalisation.
2. **Hierarchy mask** (against expert degradation): tasks are grouped into meta-categories. Level 1 (meta layer)
   has global shared experts and per-category shared experts; a meta gate per category mixes the global and that
   category's experts into a category representation ``z_g``, and a global meta gate mixes all level-1 experts
   into ``z_0``. Level 2 (task layer) has global shared experts (input ``z_0``), per-category shared experts
   (input ``z_g``) and task-specific experts (input ``z_g`` of the task's category); each task's gate (input
   ``z_g``) sees only its own experts, its category's and the global ones. Off: all tasks form one category.
3. **Feature-gate** (expert input privatisation): each expert sees ``x * 2 * sigmoid(x B A)`` with a private
   low-rank pair ``B: d -> r``, ``A: r -> d``. ``A`` starts at zero so every gate starts as the identity.
4. **Self-gate** (gradient flow into the deeper level): each task adds a gated residual of the level-1 experts it
   can see (global + its category's) to its level-2 mixture; the gate is a softmax over those experts
   (a sigmoid when there is only one), computed from ``z_g``.

Assumptions where the paper is not explicit (we could read its abstract and third-party summaries only):
- granularity of the feature gate: one private low-rank pair per expert (rank ``feature_gate_rank``, default 16);
- the self-gate residual carries level-1 experts into level 2, so both levels share ``expert_units[-1]``;
- level-1 has no task-specific experts (the meta layer is shared), level 2 has ``task_experts`` per task;
- default grouping: by each task's ``group`` hint from the dataset (``ecommerce``: ``ctr`` -> click,
  ``cvr``/``ctcvr`` -> conversion) when every task has one, otherwise one category per task;
- with one category (``hierarchy=False`` or a single group) the category and global experts play the same role.

Shared parameters: input layer, all level-1 experts and meta gates, level-2 global and category experts (with
their feature gates). Task-specific: the task's level-2 experts, its gate, self-gate and tower.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mtlbench import ExpertBank, MtlbenchError, MultiTaskArch, mix, option_field, register_arch
from mtlbench.arch import FeatureLayout, tower


class FeatureGate(nn.Module):
    """Private input views for ``n`` experts: ``x * 2 * sigmoid(x B_e A_e)`` per expert ``e`` -> ``[n, B, d]``."""

    def __init__(self, n: int, dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.randn(n, dim, rank) / dim ** 0.5)
        self.up = nn.Parameter(torch.zeros(n, rank, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = torch.matmul(x, self.down)  # [B, d] or [n, B, d] -> [n, B, r]
        return x * (2.0 * torch.sigmoid(torch.bmm(low, self.up)))


class GatedBank(nn.Module):
    """An expert bank with optional feature gates in front of it."""

    def __init__(self, n: int, in_dim: int, units: tuple[int, ...], dropout: float, expert_norm: bool,
                 feature_gate: bool, rank: int) -> None:
        super().__init__()
        self.gate = FeatureGate(n, in_dim, rank) if feature_gate else None
        self.bank = ExpertBank(n, in_dim, units, dropout, batch_norm=expert_norm,
                               act="swish" if expert_norm else "relu")
        self.output_dim = self.bank.output_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bank(self.gate(x) if self.gate is not None else x)


def parse_groups(value: Any, task_names: tuple[str, ...]) -> list[list[str]]:
    """``"ctr|cvr,ctcvr"`` or ``[["ctr"], ["cvr", "ctcvr"]]`` -> list of groups; every task exactly once."""
    if isinstance(value, str):
        groups = [[t.strip() for t in g.split(",") if t.strip()] for g in value.split("|")]
    elif isinstance(value, (list, tuple)) and all(isinstance(g, (list, tuple)) for g in value):
        groups = [[str(t) for t in g] for g in value]
    else:
        raise MtlbenchError(f"home option 'groups' must look like 'ctr|cvr,ctcvr' (groups separated by '|'), "
                            f"got {value!r}")
    if any(not g for g in groups):
        raise MtlbenchError(f"home option 'groups' has an empty group: {value!r}")
    listed = [t for g in groups for t in g]
    unknown = [t for t in listed if t not in task_names]
    if unknown:
        raise MtlbenchError(f"home option 'groups' names unknown task(s) {', '.join(unknown)} "
                            f"(tasks of this run: {', '.join(task_names)})")
    dup = sorted({t for t in listed if listed.count(t) > 1})
    if dup:
        raise MtlbenchError(f"home option 'groups' lists task(s) {', '.join(dup)} more than once")
    missing = [t for t in task_names if t not in listed]
    if missing:
        raise MtlbenchError(f"home option 'groups' leaves out task(s) {', '.join(missing)}; every task needs a group")
    return groups


def default_groups(tasks) -> list[list[str]]:
    """Group by the datasets' ``group`` hints when every task has one, else one category per task."""
    if all(t.group for t in tasks):
        order: dict[str, list[str]] = {}
        for t in tasks:
            order.setdefault(t.group, []).append(t.name)
        return list(order.values())
    return [[t.name] for t in tasks]


@register_arch("home")
class HoME(MultiTaskArch):
    """HoME (Kuaishou, arXiv 2408.05430): expert norm + Swish, hierarchy mask, feature-gates and self-gates."""

    @dataclass
    class Options:
        groups: Any = None
        global_experts: int = option_field(2, "number of global (all-task) experts", minimum=1)
        group_experts: int = option_field(2, "experts per task group", minimum=1)
        task_experts: int = option_field(1, "experts per task", minimum=1)
        expert_units: tuple[int, ...] = option_field((128, 64), "expert hidden widths", minimum=1)
        tower_units: tuple[int, ...] = option_field((64,), "tower hidden widths", minimum=1)
        dropout: float = option_field(0.0, "dropout rate", minimum=0, maximum=1, open_maximum=True)
        feature_gate_rank: int = option_field(16, "rank of the feature-gate projection", minimum=1)
        expert_norm: bool = True
        tower_norm: bool = True
        hierarchy: bool = True
        feature_gate: bool = True
        self_gate: bool = True

        def __post_init__(self) -> None:
            for name in ("global_experts", "group_experts", "task_experts", "feature_gate_rank"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def __init__(self, schema, tasks, embed_dim, options=None):
        super().__init__(schema, tasks, embed_dim, options)
        o = self.o = options or self.Options()
        groups = parse_groups(o.groups, self.task_names) if o.groups is not None else default_groups(self.tasks)
        self.groups = groups if o.hierarchy else [list(self.task_names)]
        self.group_of = {t: gi for gi, g in enumerate(self.groups) for t in g}
        K, ng, nc, nt = len(self.groups), o.global_experts, o.group_experts, o.task_experts
        bank = lambda n, d: GatedBank(n, d, o.expert_units, o.dropout, o.expert_norm, o.feature_gate,  # noqa: E731
                                      o.feature_gate_rank)
        self.shared["input"] = inp = self.input_layer()
        d0 = inp.output_dim
        # level 1 (meta layer): [global experts | category 0 experts | category 1 experts | ...], input x
        self.shared["level1"] = bank(ng + K * nc, d0)
        d1 = self.shared["level1"].output_dim
        self.shared["meta_gates"] = nn.ModuleList([nn.Linear(d0, ng + nc) for _ in range(K)])
        self.shared["global_meta_gate"] = nn.Linear(d0, ng + K * nc)
        # level 2 shared experts, same layout; global ones read z_0, category ones read z_g
        self.shared["level2"] = bank(ng + K * nc, d1)
        for g in range(K):
            self.register_buffer(f"visible_{g}", torch.tensor(self._visible(g)), persistent=False)
        self.register_buffer("level2_input", torch.tensor([0] * ng + [1 + g for g in range(K) for _ in range(nc)]),
                             persistent=False)
        for t in self.tasks:
            h = self.heads[t.name]
            h["experts"] = bank(nt, d1)
            h["gate"] = nn.Linear(d1, nt + nc + ng)
            if o.self_gate:
                h["self_gate"] = nn.Linear(d1, ng + nc)
            h["tower"] = tower(d1, o.tower_units, t, o.dropout, o.tower_norm)

    def _visible_index(self, g: int) -> torch.Tensor:
        """:meth:`_visible` as an index tensor on the model's device (a buffer), for ``index_select``: the same
        values as indexing with the list, and a backward (``index_add``) several times cheaper on the CPU than
        advanced indexing's ``index_put`` with accumulation (HoME's step: about 6% less CPU time)."""
        return getattr(self, f"visible_{g}")

    def _visible(self, g: int) -> list[int]:
        """Indices (in a level's shared layout) of the global experts and category ``g``'s experts."""
        ng, nc = self.o.global_experts, self.o.group_experts
        return list(range(ng)) + list(range(ng + g * nc, ng + (g + 1) * nc))

    def describe(self) -> dict[str, Any]:
        return {"groups": self.groups}

    def feature_layouts(self):
        # z_all, level-1 and level-2 expert stacks [n, B, D]
        return (FeatureLayout(batch_axis=1, channel_axis=-1, position_axes=(0,)),) * 3

    def encode(self, batch):
        x = self.shared["input"](batch)
        e1 = self.shared["level1"](x)  # [ng + K nc, B, d]
        z = [mix(e1, torch.softmax(self.shared["global_meta_gate"](x), dim=-1))]
        for g, gate in enumerate(self.shared["meta_gates"]):
            z.append(mix(e1.index_select(0, self._visible_index(g)), torch.softmax(gate(x), dim=-1)))
        z_all = torch.stack(z)  # [1 + K, B, d]: z_0, then one per category
        e2 = self.shared["level2"](z_all.index_select(0, self.level2_input))
        return z_all, e1, e2

    def decode(self, features, batch):
        z_all, e1, e2 = features
        out = []
        for t in self.task_names:
            h, g = self.heads[t], self.group_of[t]
            zg = z_all[1 + g]
            vis = self._visible_index(g)
            experts = torch.cat([h["experts"](zg), e2.index_select(0, vis)], dim=0)
            r = mix(experts, torch.softmax(h["gate"](zg), dim=-1))
            if "self_gate" in h:
                s = h["self_gate"](zg)
                s = torch.sigmoid(s) if s.shape[-1] == 1 else torch.softmax(s, dim=-1)
                r = r + mix(e1.index_select(0, vis), s)
            out.append(h["tower"](r))
        return out
