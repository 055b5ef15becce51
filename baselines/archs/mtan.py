"""MTAN: "End-to-End Multi-Task Learning with Attention", Liu, Johns, Davison, CVPR 2019 (arXiv 1803.10704);
official code lorenmt/mtan, ``im2im_pred/model_segnet_mtan.py``.

A shared SegNet (``mtlbench.vision.nets.SegNet``: per level a conv block, more convs, 2x2 max-pool with indices;
the decoder mirrors it with max-unpooling) and, per task, soft attention modules at every encoder and decoder
level. At encoder level j task t computes the mask ``a = att(cat(g_j^0, p_{j-1}))`` (``att``: 1x1 conv-BN-ReLU,
1x1 conv-BN-sigmoid; level 0 reads ``g_0^0`` alone) from the level's first shared block output ``g_j^0`` and its
own previous output, multiplies the level's output ``g_j^1`` by it, and passes ``a * g_j^1`` through a 3x3
conv-BN-ReLU ``f_j`` (shared by all tasks, as in the official code's ``encoder_block_att``) and a 2x2 max-pool.
The decoder does the same in reverse: bilinear x2 upsampling (``align_corners=True``), the shared ``f'_j``
(``decoder_block_att``), the mask from ``cat(unpooled shared input, that)`` and the product with the level's
shared output. Each task's last attended map goes to its prediction layer (3x3 conv, 1x1 conv).

Channel counts generalise the official ones to any ``depth`` and ``width`` (channels ``width * (1, 2, 4, 8, 8)``;
official: width 64, depth 5, NYUv2 288x384). The official deepest decoder mask reads ``f[4] + f[3]`` channels,
which equals the concatenated width only because ``f[4] = f[3]``; here the mask at the deepest level reads
``2 f[L-1]`` (what is concatenated) and outputs ``f[L-2]``. Defaults: ``width`` 8, ``depth`` 3 (64x64 scenes on
CPU); the paper trains with equal weights or DWA (``--optimizer dwa``).

Partition: the shared SegNet and the shared ``f``/``f'`` convs are shared; each task's attention modules and
prediction layer are that task's. The attention paths run inside :meth:`encode` (they read the shared blocks'
intermediate outputs), so :meth:`encode` also uses task parameters: the features it returns are the T attended
maps (task t's layout says only t reads it). Per-task gradients of the shared parameters are still exact VJPs
through those features; MGDA-UB/Rep-MTL see per-task representations (disjoint across tasks), which is what MTAN
has to offer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtlbench import register_arch
from mtlbench.vision.arch import ImageArch, map_layout
from mtlbench.vision.nets import EncoderOptions, conv_bn_relu


def attention(c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    """MTAN's ``att_layer``: 1x1 conv-BN-ReLU, 1x1 conv-BN-sigmoid."""
    return nn.Sequential(nn.Conv2d(c_in, c_mid, 1), nn.BatchNorm2d(c_mid), nn.ReLU(inplace=True),
                         nn.Conv2d(c_mid, c_out, 1), nn.BatchNorm2d(c_out), nn.Sigmoid())


@register_arch("mtan")
class MTAN(ImageArch):
    """MTAN (Liu et al., CVPR 2019): a shared SegNet with per-task soft attention at every level."""

    encoders = ("segnet",)

    @dataclass
    class Options(EncoderOptions):
        def __post_init__(self) -> None:
            super().__post_init__()
            if self.encoder != "segnet":
                raise ValueError(f"mtan is defined on a SegNet encoder (encoder=segnet), got encoder={self.encoder!r}")
            if self.depth < 2:
                raise ValueError(f"depth of mtan must be at least 2, got {self.depth}")

    def __init__(self, schema, tasks, embed_dim, options=None):
        super().__init__(schema, tasks, embed_dim, options)
        self.shared["input"] = self.input_stage()
        self.shared["encoder"] = net = self.encoder()
        f, L = net.filters, net.depth
        self.shared["enc_f"] = nn.ModuleList(conv_bn_relu(f[j], f[j + 1] if j < L - 1 else f[j]) for j in range(L))
        self.shared["dec_f"] = nn.ModuleList(
            [conv_bn_relu(f[0], f[0])] + [conv_bn_relu(f[k], f[k - 1]) for k in range(1, L - 1)]
            + [conv_bn_relu(f[L - 1], f[L - 1])])
        for t in self.tasks:
            h = self.heads[t.name]
            h["enc_att"] = nn.ModuleList([attention(f[0], f[0], f[0])] + [attention(2 * f[j], f[j], f[j])
                                                                          for j in range(1, L)])
            u = [f[0]] + [f[k - 1] for k in range(1, L - 1)] + [f[L - 1]]  # channels of f'_k's output
            h["dec_att"] = nn.ModuleList([attention(f[k] + u[k], f[max(k - 1, 0)], f[max(k - 1, 0)])
                                          for k in range(L)])
            h["decoder"] = self.head(t, net)

    def encode(self, batch):
        net = self.shared["encoder"]
        g = net.forward_blocks(self.shared["input"](batch))
        L = net.depth
        out = []
        for t in self.task_names:
            h = self.heads[t]
            p = None
            for j in range(L):
                a = h["enc_att"][j](g["enc0"][j] if j == 0 else torch.cat([g["enc0"][j], p], 1))
                p = F.max_pool2d(self.shared["enc_f"][j](a * g["enc1"][j]), 2, 2)
            for j in range(L):
                k = L - 1 - j
                u = self.shared["dec_f"][k](F.interpolate(p, scale_factor=2, mode="bilinear", align_corners=True))
                a = h["dec_att"][k](torch.cat([g["up"][j], u], 1))
                p = a * g["dec1"][j]
            out.append(p)
        return tuple(out)

    def decode(self, features, batch):
        return [self.heads[t]["decoder"](z) for t, z in zip(self.task_names, features)]

    def feature_layouts(self):
        return tuple(map_layout((t,)) for t in self.task_names)
