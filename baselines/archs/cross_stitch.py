"""Cross-stitch networks: "Cross-stitch Networks for Multi-task Learning", Misra, Shrivastava, Gupta, Hebert,
CVPR 2016 (arXiv 1604.03539).

One network per task (here each task's column is the ``encoder`` option: SegNet, ResNet or ViT, with the
``shared_bottom`` decoder on top), joined by cross-stitch units after every level: after each pooling and
unpooling level of SegNet (the paper puts units after every pooling layer of AlexNet), after each ResNet stage,
after each ViT block, after each of LeNet's three levels. A unit mixes the T columns' activations linearly, ``x~_t = sum_s alpha_ts x_s``, with one
scalar per task pair per unit, as in the paper (Eq. 1; LibMTL learns one per channel instead). Initialisation:
the paper's best setting (alpha_S, alpha_D) = (0.9, 0.1) for two tasks, Sec. 4.1; for T tasks the off-diagonal
0.1 is split as ``0.1 / (T - 1)`` so each row sums to 1 (our generalisation, option ``alpha_same``). The paper
boosts the learning rate of the alphas by 10^2-10^3 under SGD; with Adam, whose steps do not scale with the
gradient's size, the same learning rate is used for every parameter (an assumption, stated).

Partition: every column feeds every task through the units, so all columns and units are shared (as LibMTL's
``Cross_stitch`` encoder); each task's decoder is its own. The features are the T columns' final outputs (task
t's decoder reads column t).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtlbench import register_arch
from mtlbench.vision import nets
from mtlbench.vision.arch import ImageArch
from mtlbench.vision.nets import EncoderOptions


class CrossStitch(nn.Module):
    """One unit: ``x~_t = sum_s alpha[t, s] x_s`` for T stacked activations ``[T, B, ...]``."""

    def __init__(self, T: int, same: float) -> None:
        super().__init__()
        other = (1.0 - same) / (T - 1) if T > 1 else 0.0
        self.alpha = nn.Parameter(torch.full((T, T), other).fill_diagonal_(same))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        x = torch.stack(xs)
        return list(torch.einsum("ts,s...->t...", self.alpha, x).unbind(0))


@register_arch("cross_stitch")
class CrossStitchNet(ImageArch):
    """Cross-stitch networks (Misra et al., CVPR 2016): one column per task, linear units mixing them per level."""

    @dataclass
    class Options(EncoderOptions):
        alpha_same: float = 0.9  # initial weight of a column's own activation (paper: 0.9, others 0.1)

        def __post_init__(self) -> None:
            super().__post_init__()
            if not 0.0 <= self.alpha_same <= 1.0:
                raise ValueError(f"alpha_same must be in [0, 1], got {self.alpha_same}")

    def __init__(self, schema, tasks, embed_dim, options=None):
        super().__init__(schema, tasks, embed_dim, options)
        T = len(self.tasks)
        self.shared["input"] = self.input_stage()
        self.shared["columns"] = nn.ModuleList(self.encoder() for _ in range(T))
        enc = self.shared["columns"][0]
        self.shared["units"] = nn.ModuleList(CrossStitch(T, self.o.alpha_same) for _ in range(nets.n_stages(enc)))
        for t in self.tasks:
            self.heads[t.name]["decoder"] = self.head(t, enc)

    def encode(self, batch):
        x = self.shared["input"](batch)
        cols = self.shared["columns"]
        hs = [x] * len(cols)
        states = [dict() for _ in cols]
        for k, unit in enumerate(self.shared["units"]):
            hs = unit([nets.run_stage(c, k, h, s) for c, h, s in zip(cols, hs, states)])
        return tuple(hs)

    def decode(self, features, batch):
        return [self.heads[t]["decoder"](z) for t, z in zip(self.task_names, features)]

    def feature_layouts(self):
        enc = self.shared["columns"][0]
        return tuple(self.layout_of(enc, (t,)) for t in self.task_names)

    def describe(self):
        return {**super().describe(), "units": len(self.shared["units"])}
