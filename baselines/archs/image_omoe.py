"""OMoE on images: the one-gate Mixture-of-Experts baseline of the MMoE paper (Ma et al., KDD 2018, Fig. 1b) with
image encoders as experts, as ``mmoe`` on images (LibMTL style): ONE linear-softmax gate on the flattened input,
shared by every task. Shared: experts and the gate; per task: the decoder. The shared feature is the mixture.
"""
from __future__ import annotations

import torch
from torch import nn

from mtlbench import register_arch
from mtlbench.baselines.archs.image_mmoe import ExpertEncoderOptions, mix_maps
from mtlbench.vision.arch import ImageArch


@register_arch("omoe")
class ImageOMoE(ImageArch):
    """One-gate MoE on images: whole-encoder experts, one gate shared by all tasks."""

    Options = ExpertEncoderOptions

    def __init__(self, schema, tasks, embed_dim, options=None):
        super().__init__(schema, tasks, embed_dim, options)
        self.shared["input"] = self.input_stage()
        self.shared["experts"] = nn.ModuleList(self.encoder() for _ in range(self.o.n_experts))
        self.shared["gate"] = nn.Linear(self.image.channels * self.image.height * self.image.width,
                                        self.o.n_experts)
        enc = self.shared["experts"][0]
        for t in self.tasks:
            self.heads[t.name]["decoder"] = self.head(t, enc)

    def encode(self, batch):
        x = self.shared["input"](batch)
        experts = torch.stack([e(x) for e in self.shared["experts"]])
        return (mix_maps(experts, torch.softmax(self.shared["gate"](x.flatten(1)), -1)),)

    def decode(self, features, batch):
        (z,) = features
        return [self.heads[t]["decoder"](z) for t in self.task_names]

    def feature_layouts(self):
        return (self.layout_of(self.shared["experts"][0]),)
