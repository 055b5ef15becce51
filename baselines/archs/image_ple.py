"""PLE on images: "Progressive Layered Extraction (PLE)", Tang, Liu, Zhao, Gong, RecSys 2020 (eqs. 2-7), with image
encoders as experts and gates over feature maps (or token sets) as LibMTL applies it to dense prediction
(``LibMTL/architecture/PLE.py``). Same name and options as the tabular ``ple`` (``levels``, ``shared_experts``,
``task_experts``) plus the image encoder's options.

Experts. Each expert is a whole encoder (the ``encoder`` option) cut into ``levels`` extraction levels along its
stages (:func:`mtlbench.vision.nets.n_stages`: SegNet's pooling then unpooling levels, ResNet's stages, ViT's
blocks, LeNet's three levels), split as evenly as possible, earlier levels taking the extra stage. LibMTL cuts
its ResNet experts at every stage (stem + 4 layers = 5 levels); ``levels`` equal to the encoder's stage count is
that choice. Default ``levels`` 2, the tabular ``ple``'s and the paper's default depth (for the default SegNet:
its encoder half, then its decoder half). A SegNet expert's unpooling reuses the pooling indices of its own
earlier levels, whatever mixture reaches it.

Gates (LibMTL): ``softmax(Linear(flatten(g)))`` over the flattened level input ``g`` (the normalised image at
level 1), one weight per expert per image; the mixture is the weighted sum of the experts' maps.

Level ``j`` (the paper's eqs. 6-7, ``shared_gate=true``, the default): task k's experts and gate read
``g_(k,j-1)``; the shared experts read ``g_(s,j-1)``; task k's gate mixes its own experts and the shared ones into
``g_(k,j)``; a shared gate (selector ``g_(s,j-1)``) over ALL the level's experts gives ``g_(s,j)``, except at the
last level (nothing would read it). Task k's decoder reads ``g_(k,levels)``. ``shared_gate=false`` is LibMTL's
form: no shared gate and no shared path; at each level the shared experts run on each task's own ``g_(k,j-1)``
(T times), and task k's gate mixes them with task k's experts.

Shared/task split (a parameter is task-specific only if no other task's loss reaches it), as the tabular ``ple``
derives it: with the shared gate, every expert of the levels before the last and the shared gates are shared, and
task k's gate at level j is shared for ``j < levels - 1`` (its output feeds task k's experts at level j + 1, which
the shared gate reads); task k's head is its gate at level ``levels - 1``, its experts' last level and its gate
there, and its decoder. Without the shared gate, the shared experts are shared and everything of task k is its
own. So that the split is exact, each expert's levels are registered where they belong (``shared.levels`` /
``heads.<task>.levels``), not as one module.

Features. The levels run inside :meth:`encode`, which returns each task's last mixture ``g_(k,levels)`` (task t's
layout says only t reads it), as ``mtan`` does: per-task gradients of the shared parameters are exact VJPs through
them. Defaults: 1 shared and 1 task expert (image ``cgc``'s, for CPU budgets; the tabular ``ple`` uses 2 shared);
``levels=1`` is CGC.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtlbench import register_arch
from mtlbench.baselines.archs.image_mmoe import mix_maps
from mtlbench.vision import nets
from mtlbench.vision.arch import ImageArch
from mtlbench.vision.nets import EncoderOptions


def level_stages(n_stages: int, levels: int) -> list[list[int]]:
    """``n_stages`` stages cut into ``levels`` contiguous groups, sizes differing by at most one (earlier larger)."""
    base, extra = divmod(n_stages, levels)
    out, k = [], 0
    for j in range(levels):
        size = base + (j < extra)
        out.append(list(range(k, k + size)))
        k += size
    return out


class _Column:
    """One expert encoder; held outside the module tree (its stages are registered per level by the arch)."""

    def __init__(self, enc: nn.Module) -> None:
        self.enc = enc

    def run(self, stages: list[int], h: torch.Tensor, state: dict) -> torch.Tensor:
        for k in stages:
            h = nets.run_stage(self.enc, k, h, state)
        return h


@register_arch("ple")
class ImagePLE(ImageArch):
    """PLE on images: stacked extraction levels of encoder-stage experts, task and shared gates over feature maps."""

    @dataclass
    class Options(EncoderOptions):
        levels: int = 2
        shared_experts: int = 1
        task_experts: int = 1
        shared_gate: bool = True  # the paper's shared gate and shared path; false: LibMTL's form

        def __post_init__(self) -> None:
            super().__post_init__()
            for name in ("levels", "shared_experts", "task_experts"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
            n = nets.stages_of_options(self)
            if self.levels > n:
                raise ValueError(f"levels must be at most {n} (the stages of a {self.encoder} encoder of depth "
                                 f"{self.depth}), got {self.levels}")

    def __init__(self, schema, tasks, embed_dim, options=None):
        super().__init__(schema, tasks, embed_dim, options)
        o = self.o
        T, N = len(self.tasks), o.levels
        self.shared["input"] = self.input_stage()
        self._shared_cols = [_Column(self.encoder()) for _ in range(o.shared_experts)]
        self._task_cols = {t: [_Column(self.encoder()) for _ in range(o.task_experts)] for t in self.task_names}
        enc = self._shared_cols[0].enc
        self.level_groups = level_stages(nets.n_stages(enc), N)
        d_in = self._level_input_sizes(enc)
        n_task_gate = o.task_experts + o.shared_experts

        def stages(col: _Column, j: int) -> nn.ModuleList:
            return nn.ModuleList(m for k in self.level_groups[j] for m in nets.stage_modules(col.enc, k))

        shared_levels = nn.ModuleList()
        for j in range(N):
            lv = nn.ModuleDict({"shared_experts": nn.ModuleList(stages(c, j) for c in self._shared_cols)})
            task_shared = o.shared_gate and j < N - 1  # these levels' task experts feed the shared gate
            if task_shared:
                lv["task_experts"] = nn.ModuleDict({t: nn.ModuleList(stages(c, j) for c in self._task_cols[t])
                                                    for t in self.task_names})
                lv["shared_gate"] = nn.Linear(d_in[j], o.shared_experts + T * o.task_experts)
            if o.shared_gate and j < N - 2:
                lv["task_gates"] = nn.ModuleDict({t: nn.Linear(d_in[j], n_task_gate) for t in self.task_names})
            shared_levels.append(lv)
        self.shared["levels"] = shared_levels
        for t in self.tasks:
            own = nn.ModuleDict()
            for j in range(N):
                if o.shared_gate and j < N - 2:
                    continue  # this gate is shared (above)
                lv = nn.ModuleDict({"gate": nn.Linear(d_in[j], n_task_gate)})
                if not (o.shared_gate and j < N - 1):
                    lv["experts"] = nn.ModuleList(stages(c, j) for c in self._task_cols[t.name])
                own[str(j)] = lv
            self.heads[t.name]["levels"] = own
            self.heads[t.name]["decoder"] = self.head(t, enc)

    def _level_input_sizes(self, enc: nn.Module) -> list[int]:
        """Per level, the number of values per image its gates read (LibMTL: the flattened level input)."""
        C, H, W = self.image.shape
        h, state, sizes = torch.zeros(1, C, H, W), {}, []
        was = enc.training
        enc.eval()
        with torch.no_grad():
            for grp in self.level_groups:
                sizes.append(h[0].numel())
                for k in grp:
                    h = nets.run_stage(enc, k, h, state)
        enc.train(was)
        return sizes

    def _task_gate(self, t: str, j: int) -> nn.Module:
        own = self.heads[t]["levels"]
        return own[str(j)]["gate"] if str(j) in own else self.shared["levels"][j]["task_gates"][t]

    def encode(self, batch):
        o = self.o
        x = self.shared["input"](batch)
        names = self.task_names
        g_task = {t: x for t in names}
        g_shared = x
        states: dict[tuple, dict] = {}
        for j, grp in enumerate(self.level_groups):
            run = lambda col, h, key: col.run(grp, h, states.setdefault(key, {}))  # noqa: E731
            new = {}
            if o.shared_gate:
                shared = [run(c, g_shared, ("s", i)) for i, c in enumerate(self._shared_cols)]
                own = {t: [run(c, g_task[t], (t, i)) for i, c in enumerate(self._task_cols[t])] for t in names}
                for t in names:
                    w = torch.softmax(self._task_gate(t, j)(g_task[t].flatten(1)), -1)
                    new[t] = mix_maps(torch.stack(own[t] + shared), w)
                if j < len(self.level_groups) - 1:
                    w = torch.softmax(self.shared["levels"][j]["shared_gate"](g_shared.flatten(1)), -1)
                    g_shared = mix_maps(torch.stack([e for t in names for e in own[t]] + shared), w)
            else:  # LibMTL: shared experts on each task's own representation
                for t in names:
                    h = g_task[t]
                    experts = ([run(c, h, (t, i)) for i, c in enumerate(self._task_cols[t])]
                               + [run(c, h, ("s", i, t)) for i, c in enumerate(self._shared_cols)])
                    w = torch.softmax(self._task_gate(t, j)(h.flatten(1)), -1)
                    new[t] = mix_maps(torch.stack(experts), w)
            g_task = new
        return tuple(g_task[t] for t in names)

    def decode(self, features, batch):
        return [self.heads[t]["decoder"](z) for t, z in zip(self.task_names, features)]

    def feature_layouts(self):
        enc = self._shared_cols[0].enc
        return tuple(self.layout_of(enc, (t,)) for t in self.task_names)

    def describe(self):
        return {**super().describe(), "levels": len(self.level_groups), "stages_per_level": [len(g) for g in self.level_groups],
                "shared_gate": self.o.shared_gate}
