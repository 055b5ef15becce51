"""Single-task baseline on images: one encoder and decoder per task, nothing shared (the reference of Δm%).

Each task's network is exactly ``shared_bottom``'s encoder and that task's decoder (same ``encoder``, ``width``,
``depth`` options), so the comparison isolates the effect of sharing. The T networks have disjoint parameters and
losses, so training them in one run under equal weighting equals T separate runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mtlbench import register_arch
from mtlbench.vision.arch import ImageArch
from mtlbench.vision.nets import EncoderOptions


@register_arch("single")
class ImageSingleTask(ImageArch):
    """One encoder and decoder per task on images: the single-task baseline Δm% is measured against."""

    shares_parameters = False  # a sweep skips single x (gradient / representation methods) up front

    @dataclass
    class Options(EncoderOptions):
        # as tabular single: each task selected and stopped on its own validation metric, or one joint epoch
        selection: Literal["per_task", "joint"] = "per_task"

    def __init__(self, schema, tasks, embed_dim, options=None):
        super().__init__(schema, tasks, embed_dim, options)
        for t in self.tasks:
            enc = self.encoder()
            self.heads[t.name].update({"input": self.input_stage(), "encoder": enc, "decoder": self.head(t, enc)})

    def encode(self, batch):
        return ()

    def decode(self, features, batch):
        out = []
        for t in self.task_names:
            h = self.heads[t]
            out.append(h["decoder"](h["encoder"](h["input"](batch))))
        return out

    def feature_layouts(self):
        return ()

    def selection_groups(self):
        """Per-task model selection (as T separate runs would do); ``selection=joint``: one epoch for all."""
        if self.options is not None and getattr(self.options, "selection", "per_task") == "joint":
            return None
        return self.per_task_groups()
