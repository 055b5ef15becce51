"""PLE and CGC: "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for Personalized
Recommendations", Tang, Liu, Zhao, Gong, RecSys 2020.

**CGC** (one extraction level, eqs. 2-5): per task ``k`` ``m_t`` task-specific experts (option ``task_experts``)
and ``m_s`` shared experts (``shared_experts``);
task k's gate ``w_k(x) = softmax(W_k x)`` mixes *its own* experts and the shared ones only,
``g_k(x) = w_k(x) [E_(k,1..m_t), E_(s,1..m_s)]``, and its tower reads ``g_k``: ``y_k = t_k(g_k(x))``.

**PLE** (``levels`` stacked extraction networks, eqs. 6-7). At level ``j``:

- task k's experts and task k's gate read ``g_(k,j-1)``, the task-k output of the previous level (``x`` at level 1):
  the gate's selector is the previous level's output, not the raw input;
- the shared experts read ``g_(s,j-1)``, the shared output of the previous level (``x`` at level 1);
- task k's gate mixes task k's experts + the shared experts into ``g_(k,j)``;
- at every level but the last, a **shared gate** over ALL experts of the level (every task's specific experts and
  the shared ones, ``m_s + T m_t`` of them), with selector ``g_(s,j-1)``, produces ``g_(s,j)``, the next level's
  shared input;
- the last level has no shared gate (nothing would read it). Towers read ``g_(k,levels)``.

Two common library deviations are avoided on purpose (see the reference notes): a shared gate that sees only the
shared experts (FuxiCTR), and gates/experts that are built but never used (DeepCTR-Torch's shared-expert count
bug, MTReclib's unregistered gate lists before 2022-11). Tests check the gate widths and that every parameter
gets a gradient.

Defaults: ``levels`` 2 (the paper's multi-level models all use 2 levels for equal depth); 1 task-specific expert
per task and 2 shared experts per level (``task_experts``/``shared_experts``, the names HoME uses) (the paper's expert-utilisation study uses 1 expert per module; the
experts are single-layer networks in the paper, as here: ``expert_units`` (64,)); towers of (64,) like the other
built-in archs, on CPU budgets (the paper uses 3-layer towers [256, 128, 64] for every model); linear-softmax
gates; BatchNorm in experts and towers (the suite's common MLP block, off with ``batch_norm=false``); dropout 0.
Every level's experts share one width (``expert_units``); level 1 reads the concatenated embeddings.

Shared/task split (what an MTL optimizer sees; a parameter is task-specific only if no other task's loss
reaches it): the input layer, all shared experts and the shared gates are shared. Because the shared gate of
level j reads the task-specific experts of level j, those experts feed every task for j < levels and are
therefore *shared* parameters; so is task k's gate at level j < levels - 1 (its output feeds task k's experts at
level j + 1, which the shared gate of level j + 1 reads). Task k's head: its gate at level ``levels - 1`` (for
levels >= 2), its experts and gate at the last level, and its tower. For CGC (one level) this is the usual
split: shared experts shared; task experts, gate and tower per task.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mtlbench import ExpertBank, MultiTaskArch, mix, option_field, register_arch
from mtlbench.arch import FeatureLayout, tower


def _check(o: Any) -> None:
    """Validation shared by PLE's and CGC's options (a ValueError becomes one line via the registry)."""
    for name in ("shared_experts", "task_experts"):
        if getattr(o, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(o, name)}")
    if not o.expert_units or any(u < 1 for u in o.expert_units):
        raise ValueError(f"expert_units must be one or more positive widths, got {o.expert_units}")
    if any(u < 1 for u in o.tower_units):
        raise ValueError(f"tower_units must be positive widths, got {o.tower_units}")
    if not 0.0 <= o.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {o.dropout}")


@register_arch("ple")
class PLE(MultiTaskArch):
    """PLE (Tang et al., RecSys 2020): stacked CGC levels, shared gates over all experts except at the last level."""

    @dataclass
    class Options:
        levels: int = option_field(2, "extraction levels (1 is CGC)", minimum=1)
        shared_experts: int = option_field(2, "number of shared experts", minimum=1)
        task_experts: int = option_field(1, "experts per task", minimum=1)
        expert_units: tuple[int, ...] = option_field((64,), "expert hidden widths", minimum=1)
        tower_units: tuple[int, ...] = option_field((64,), "tower hidden widths", minimum=1)
        dropout: float = option_field(0.0, "dropout rate", minimum=0, maximum=1, open_maximum=True)
        batch_norm: bool = True

        def __post_init__(self) -> None:
            if self.levels < 1:
                raise ValueError(f"levels must be at least 1 (1 is CGC), got {self.levels}")
            _check(self)

    def __init__(self, schema, tasks, embed_dim, options=None):
        super().__init__(schema, tasks, embed_dim, options)
        o = self.o = options or self.Options()
        self.levels = N = int(getattr(o, "levels", 1))
        T, ns, nt = len(self.tasks), o.shared_experts, o.task_experts
        bank = lambda d: ExpertBank(nt, d, o.expert_units, o.dropout, o.batch_norm)  # noqa: E731
        self.shared["input"] = inp = self.input_layer()
        d_in = [inp.output_dim] + [o.expert_units[-1]] * (N - 1)  # input width of each level
        # levels 1 .. N-1: everything but task k's gate at level N-1 feeds every task (see the module docstring)
        levels = nn.ModuleList()
        for j in range(N - 1):
            lv = nn.ModuleDict()
            lv["shared_experts"] = ExpertBank(ns, d_in[j], o.expert_units, o.dropout, o.batch_norm)
            lv["task_experts"] = nn.ModuleDict({t: bank(d_in[j]) for t in self.task_names})
            if j < N - 2:
                lv["task_gates"] = nn.ModuleDict({t: nn.Linear(d_in[j], nt + ns) for t in self.task_names})
            lv["shared_gate"] = nn.Linear(d_in[j], ns + T * nt)  # over ALL experts of the level
            levels.append(lv)
        self.shared["levels"] = levels
        # last level: shared experts only (no shared gate)
        self.shared["last_shared_experts"] = ExpertBank(ns, d_in[N - 1], o.expert_units, o.dropout, o.batch_norm)
        d = o.expert_units[-1]
        for t in self.tasks:
            h = self.heads[t.name]
            if N >= 2:
                h["prev_gate"] = nn.Linear(d_in[N - 2], nt + ns)  # task t's gate at level N-1
            h["experts"] = bank(d_in[N - 1])
            h["gate"] = nn.Linear(d_in[N - 1], nt + ns)
            h["tower"] = tower(d, o.tower_units, t, o.dropout, o.batch_norm)

    def describe(self) -> dict[str, Any]:
        o, T = self.o, len(self.tasks)
        return {"levels": self.levels, "experts_per_level": o.shared_experts + T * o.task_experts,
                "shared_gates": self.levels - 1,
                "shared_gate_width": o.shared_experts + T * o.task_experts if self.levels > 1 else None}

    def _own(self, k: int) -> list[int]:
        """Indices of task k's experts and the shared ones in a level's stacked layout
        ``[task 0 experts | task 1 experts | ... | shared experts]``."""
        nt, T = self.o.task_experts, len(self.tasks)
        return list(range(k * nt, (k + 1) * nt)) + list(range(T * nt, T * nt + self.o.shared_experts))

    def feature_layouts(self):
        # as encode returns them: CGC (x [B, D], last shared experts [n, B, D]); PLE (selectors: x [B, D] with two
        # levels, else per-task inputs [T, B, D]; level experts [n, B, D]; last shared experts [n, B, D])
        vec, stack = FeatureLayout(batch_axis=0, channel_axis=-1), FeatureLayout(batch_axis=1, channel_axis=-1, position_axes=(0,))
        if self.levels == 1:
            return (vec, stack)
        return (vec if self.levels == 2 else stack, stack, stack)

    def encode(self, batch):
        x = self.shared["input"](batch)
        task_in: list[torch.Tensor] = [x] * len(self.tasks)  # g_(k, j-1)
        shared_in = x                                         # g_(s, j-1)
        experts = None
        levels = self.shared["levels"]
        for j, lv in enumerate(levels):
            experts = torch.cat([lv["task_experts"][t](task_in[k]) for k, t in enumerate(self.task_names)]
                                + [lv["shared_experts"](shared_in)], dim=0)  # [T nt + ns, B, d]
            next_shared = mix(experts, torch.softmax(lv["shared_gate"](shared_in), dim=-1))
            if j < len(levels) - 1:  # task gates of the levels before N-1 are shared (their outputs feed all)
                task_in = [mix(experts[self._own(k)], torch.softmax(lv["task_gates"][t](task_in[k]), dim=-1))
                           for k, t in enumerate(self.task_names)]
            shared_in = next_shared
        last_shared = self.shared["last_shared_experts"](shared_in)
        if experts is None:  # CGC: one level
            return x, last_shared
        # task k's gate at level N-1 reads g_(k, N-2) (x when N = 2) and mixes the level-(N-1) experts
        selectors = x if len(levels) == 1 else torch.stack(task_in)
        return selectors, experts, last_shared

    def decode(self, features, batch):
        if self.levels == 1:
            x, last_shared = features
            inputs = [x] * len(self.tasks)
        else:
            selectors, experts, last_shared = features
            inputs = []
            for k, t in enumerate(self.task_names):
                sel = selectors if selectors.dim() == 2 else selectors[k]
                w = torch.softmax(self.heads[t]["prev_gate"](sel), dim=-1)
                inputs.append(mix(experts[self._own(k)], w))  # g_(k, N-1)
        out = []
        for k, t in enumerate(self.task_names):
            h = self.heads[t]
            e = torch.cat([h["experts"](inputs[k]), last_shared], dim=0)
            out.append(h["tower"](mix(e, torch.softmax(h["gate"](inputs[k]), dim=-1))))
        return out


@register_arch("cgc")
class CGC(PLE):
    """CGC (Tang et al., RecSys 2020): one PLE level; task gates over own + shared experts, no shared gate."""

    @dataclass
    class Options:
        shared_experts: int = option_field(2, "number of shared experts", minimum=1)
        task_experts: int = option_field(1, "experts per task", minimum=1)
        expert_units: tuple[int, ...] = option_field((64,), "expert hidden widths", minimum=1)
        tower_units: tuple[int, ...] = option_field((64,), "tower hidden widths", minimum=1)
        dropout: float = option_field(0.0, "dropout rate", minimum=0, maximum=1, open_maximum=True)
        batch_norm: bool = True

        def __post_init__(self) -> None:
            _check(self)
