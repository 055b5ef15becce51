"""Shared-Bottom on images (hard parameter sharing; Caruana 1997): one shared encoder, one decoder per task.

The encoder is the ``encoder`` option (``segnet`` default, ``resnet``, ``vit``; see ``mtlbench.vision.nets``);
dense tasks get MTAN's prediction layer (3x3 conv, 1x1 conv, upsampled to the image), classification tasks a
pooled two-layer head. This is the "Multi-Task (Split)" baseline of MTAN's paper and LibMTL's HPS. Shared: the
encoder; per task: its decoder. The shared feature is the encoder's output (layout declared).
"""
from __future__ import annotations

from dataclasses import dataclass

from mtlbench import register_arch
from mtlbench.vision.arch import ImageArch
from mtlbench.vision.nets import EncoderOptions


@register_arch("shared_bottom")
class ImageSharedBottom(ImageArch):
    """Shared-Bottom on images: one shared encoder (SegNet, ResNet or ViT), one decoder per task."""

    @dataclass
    class Options(EncoderOptions):
        pass

    def __init__(self, schema, tasks, embed_dim, options=None):
        super().__init__(schema, tasks, embed_dim, options)
        self.shared["input"] = self.input_stage()
        self.shared["encoder"] = enc = self.encoder()
        for t in self.tasks:
            self.heads[t.name]["decoder"] = self.head(t, enc)

    def encode(self, batch):
        return (self.shared["encoder"](self.shared["input"](batch)),)

    def decode(self, features, batch):
        (z,) = features
        return [self.heads[t]["decoder"](z) for t in self.task_names]

    def feature_layouts(self):
        return (self.layout_of(self.shared["encoder"]),)
