"""CGC on images: one extraction level of PLE (Tang et al., RecSys 2020) with image encoders as experts, gated as
LibMTL's ``CGC`` does (``LibMTL/architecture/CGC.py``): per task ``task_experts`` task-specific encoders and
``shared_experts`` shared ones; task k's linear-softmax gate on the flattened input weighs its own experts and the
shared ones. Same names and expert options as the tabular ``cgc``. Shared: the shared experts; per task: its
experts, gate and decoder. The shared feature is the stack of shared expert outputs ``[m_s, B, ...]``.
Multi-level ``ple`` on images is ``baselines/archs/image_ple.py`` (``levels=1`` there is this CGC, cut the same way).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtlbench import register_arch
from mtlbench.baselines.archs.image_mmoe import mix_maps
from mtlbench.vision.arch import ImageArch
from mtlbench.vision.nets import EncoderOptions


@register_arch("cgc")
class ImageCGC(ImageArch):
    """CGC on images: task-specific and shared encoder experts, a gate per task over its own + shared ones."""

    @dataclass
    class Options(EncoderOptions):
        shared_experts: int = 1
        task_experts: int = 1

        def __post_init__(self) -> None:
            super().__post_init__()
            for name in ("shared_experts", "task_experts"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def __init__(self, schema, tasks, embed_dim, options=None):
        super().__init__(schema, tasks, embed_dim, options)
        o = self.o
        self.shared["input"] = self.input_stage()
        self.shared["experts"] = nn.ModuleList(self.encoder() for _ in range(o.shared_experts))
        enc = self.shared["experts"][0]
        d_in = self.image.channels * self.image.height * self.image.width
        for t in self.tasks:
            h = self.heads[t.name]
            h["experts"] = nn.ModuleList(self.encoder() for _ in range(o.task_experts))
            h["gate"] = nn.Linear(d_in, o.task_experts + o.shared_experts)
            h["decoder"] = self.head(t, enc)

    def encode(self, batch):
        x = self.shared["input"](batch)
        return (torch.stack([e(x) for e in self.shared["experts"]]),)

    def decode(self, features, batch):
        (shared,) = features
        x = self.shared["input"](batch)
        out = []
        for t in self.task_names:
            h = self.heads[t]
            experts = torch.cat([torch.stack([e(x) for e in h["experts"]]), shared])
            out.append(h["decoder"](mix_maps(experts, torch.softmax(h["gate"](x.flatten(1)), -1))))
        return out

    def feature_layouts(self):
        return (self.layout_of(self.shared["experts"][0], lead=1),)
