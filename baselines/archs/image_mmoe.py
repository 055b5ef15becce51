"""MMoE on images (Ma et al., KDD 2018), as LibMTL applies it to dense prediction (``LibMTL/architecture/MMoE.py``).

Experts are ``n_experts`` whole image encoders (the ``encoder`` option); each task's gate is a linear-softmax
layer on the flattened normalised input image (LibMTL: ``Linear(prod(img_size), num_experts)``), giving one
weight per expert per image; task t's decoder reads the gate-weighted sum of the experts' feature maps (or token
sets). Same name and expert/gate options as the tabular ``mmoe`` (``n_experts``). Shared: the experts; per task:
gate and decoder. The shared feature is the stack of expert outputs ``[E, B, ...]`` (layout: the expert axis is a
position axis). Default 2 experts on CPU budgets (LibMTL's NYUv2 example sets the number per run).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtlbench import register_arch
from mtlbench.vision.arch import ImageArch
from mtlbench.vision.nets import EncoderOptions


def mix_maps(experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``experts [E, B, ...]``, ``weights [B, E]`` -> ``[B, ...]``."""
    return torch.einsum("eb...,be->b...", experts, weights)


@dataclass
class ExpertEncoderOptions(EncoderOptions):
    """The image encoder's options plus the number of whole-encoder experts (image ``mmoe`` and ``omoe``)."""

    n_experts: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_experts < 1:
            raise ValueError(f"n_experts must be at least 1, got {self.n_experts}")


@register_arch("mmoe")
class ImageMMoE(ImageArch):
    """MMoE on images (LibMTL style): whole-encoder experts, one gate per task on the flattened input."""

    Options = ExpertEncoderOptions

    def __init__(self, schema, tasks, embed_dim, options=None):
        super().__init__(schema, tasks, embed_dim, options)
        self.shared["input"] = self.input_stage()
        self.shared["experts"] = nn.ModuleList(self.encoder() for _ in range(self.o.n_experts))
        enc = self.shared["experts"][0]
        d_in = self.image.channels * self.image.height * self.image.width
        for t in self.tasks:
            self.heads[t.name]["gate"] = nn.Linear(d_in, self.o.n_experts)
            self.heads[t.name]["decoder"] = self.head(t, enc)

    def encode(self, batch):
        x = self.shared["input"](batch)
        return (torch.stack([e(x) for e in self.shared["experts"]]),)

    def decode(self, features, batch):
        (experts,) = features
        x = self.shared["input"](batch).flatten(1)  # parameter-free normalisation
        return [self.heads[t]["decoder"](mix_maps(experts, torch.softmax(self.heads[t]["gate"](x), -1)))
                for t in self.task_names]

    def feature_layouts(self):
        return (self.layout_of(self.shared["experts"][0], lead=1),)
