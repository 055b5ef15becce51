"""Image building blocks: the input stage (normalisation on the device), three encoders, dense and
classification heads, and the analytical FLOPs counter.

Encoders (``build_encoder``), all with ``width`` and ``depth`` options:

- ``segnet``: the SegNet encoder-decoder as MTAN uses it (Badrinarayanan et al., TPAMI 2017; Liu et al., CVPR 2019,
  ``model_segnet_single.py``): per level a 3x3 conv-BN-ReLU block (two more convs from the second level on,
  one in the first, as MTAN), 2x2 max-pool with indices; the decoder mirrors it with max-unpooling. Channels
  ``width * (1, 2, 4, 8, 8)`` per level (MTAN: width 64, 5 levels). Output: full-resolution map ``[B, width, H, W]``.
  Needs H and W divisible by ``2 ** depth``.
- ``resnet``: a small ResNet (He et al., CVPR 2016): a 3x3 stem and ``depth`` stages of two BasicBlocks, widths
  ``width * 2 ** i``, stride 2 from the second stage on. Output ``[B, width * 2 ** (depth - 1), H / s, W / s]``
  with ``s = 2 ** (depth - 1)``; needs H and W divisible by ``s``.
- ``vit``: a tiny ViT (Dosovitskiy et al., ICLR 2021): ``patch x patch`` patch embedding, learned position
  embeddings, ``depth`` pre-norm blocks (multi-head self-attention, MLP with ratio ``mlp_ratio`` and GELU), final
  LayerNorm; no class token (dense tasks read every token). Output tokens ``[B, N, dim]``; ``forward_blocks``
  returns the tokens after every block (TaskExpert taps them). Needs H and W divisible by ``patch``.
- ``lenet``: the LeNet of the F-MTL / Pareto-MTL MultiMNIST experiments (official code ``VietHoang1512/FS-MTL``,
  ``multi-mnist/model_lenet.py``): conv 9x9 to 10 channels, ReLU, 2x2 max-pool, conv 5x5 to 20, ReLU, 2x2
  max-pool, flatten, linear to 50, ReLU (on 36x36: 20 x 5 x 5 = 500 inputs, as the official ``fc1``). Output a
  vector ``[B, 50]`` that keeps where each digit is (a pooled CNN map does not, which is why left/right digit
  tasks need it). Fixed sizes (``width``/``depth`` do not apply); classification heads only; needs H, W >= 18.

FLOPs (:func:`count_macs`): multiply-accumulates of every conv, linear layer and attention matrix product, from
the layers' shapes on one sample; batch norm, activations, pooling, unpooling and interpolation are not counted,
nor are bias additions. A module with a ``macs(inputs, output) -> int`` method counts itself (its children are
skipped), which is how width-sliced or custom layers plug in. ``flops = 2 * macs``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from mtlbench.data import ImageSpec

ENCODERS = ("segnet", "resnet", "vit", "lenet")


class ImageInput(nn.Module):
    """``(images / 255 - mean) / std`` per channel, on the batch's device: uint8 ``[B, C, H, W]`` -> float.
    With ``channels_last`` the result is laid out NHWC in memory (same shape and values; see
    :meth:`mtlbench.vision.arch.ImageArch.use_channels_last`)."""

    channels_last = False

    def __init__(self, spec: ImageSpec) -> None:
        super().__init__()
        c = spec.channels
        mean = torch.tensor(spec.mean or (0.5,) * c, dtype=torch.float32).reshape(1, c, 1, 1)
        std = torch.tensor(spec.std or (0.5,) * c, dtype=torch.float32).reshape(1, c, 1, 1)
        scale = 255.0 if spec.dtype == "uint8" else 1.0
        self.register_buffer("scale", (1.0 / (scale * std)), persistent=False)
        self.register_buffer("shift", (-mean / std), persistent=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["images"]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # the (cheap) uint8 copy; addcmul keeps the layout
        return torch.addcmul(self.shift, x.to(self.scale.dtype), self.scale)


def conv_bn_relu(c_in: int, c_out: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


# ------------------------------------------------------------------------------------------------------ SegNet
class SegNet(nn.Module):
    """SegNet as in MTAN's ``model_segnet_*.py`` (fewer channels by default)."""

    layout = "map"

    def __init__(self, in_ch: int, width: int, depth: int) -> None:
        super().__init__()
        mult = (1, 2, 4, 8, 8, 8, 8, 8)
        self.filters = f = [width * mult[i] for i in range(depth)]
        self.depth = depth
        self.enc_block = nn.ModuleList([conv_bn_relu(in_ch, f[0])] + [conv_bn_relu(f[i - 1], f[i])
                                                                      for i in range(1, depth)])
        self.enc_conv = nn.ModuleList([conv_bn_relu(f[0], f[0])] + [
            nn.Sequential(conv_bn_relu(f[i], f[i]), conv_bn_relu(f[i], f[i])) for i in range(1, depth)])
        # decoder level i (deepest first in use) maps f[i] -> f[i-1] (f[0] at the top)
        self.dec_block = nn.ModuleList([conv_bn_relu(f[0], f[0])] + [conv_bn_relu(f[i], f[i - 1])
                                                                     for i in range(1, depth)])
        self.dec_conv = nn.ModuleList([conv_bn_relu(f[0], f[0])] + [
            nn.Sequential(conv_bn_relu(f[i - 1], f[i - 1]), conv_bn_relu(f[i - 1], f[i - 1]))
            for i in range(1, depth)])
        self.out_channels, self.out_stride = f[0], 1

    def forward_blocks(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Every block's outputs, as MTAN's attention modules read them: ``enc0`` (first conv of level i),
        ``enc1`` (level i's output before pooling), ``up`` (unpooled input of decoder step j, deepest first),
        ``dec1`` (decoder step j's output)."""
        enc0, enc1, idx, up, dec1 = [], [], [], [], []
        h = x
        for i in range(self.depth):
            a = self.enc_block[i](h)
            b = self.enc_conv[i](a)
            h, ind = F.max_pool2d(b, 2, 2, return_indices=True)
            enc0.append(a), enc1.append(b), idx.append(ind)
        for j in range(self.depth):
            i = self.depth - 1 - j
            u = F.max_unpool2d(h, idx[i], 2, 2, output_size=enc1[i].shape[-2:])
            h = self.dec_conv[i](self.dec_block[i](u))
            up.append(u), dec1.append(h)
        return {"enc0": enc0, "enc1": enc1, "up": up, "dec1": dec1}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_blocks(x)["dec1"][-1]


# ------------------------------------------------------------------------------------------------------ ResNet
class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                      if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(h)) + self.short(x), inplace=True)


class ResNet(nn.Module):
    layout = "map"

    def __init__(self, in_ch: int, width: int, depth: int) -> None:
        super().__init__()
        self.stem = conv_bn_relu(in_ch, width)
        stages, c = [], width
        for i in range(depth):
            c_out = width * 2 ** i
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(c, c_out, stride), BasicBlock(c_out, c_out, 1)))
            c = c_out
        self.stages = nn.ModuleList(stages)
        self.out_channels, self.out_stride = c, 2 ** (depth - 1)

    def forward_blocks(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, out = self.stem(x), []
        for s in self.stages:
            h = s(h)
            out.append(h)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_blocks(x)[-1]


# --------------------------------------------------------------------------------------------------------- ViT
class Attention(nn.Module):
    """Multi-head self-attention; counts its own two matrix products (``2 N^2 D`` MACs per sample)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))

    def own_macs(self, x: torch.Tensor) -> int:
        _, N, D = x.shape
        return 2 * N * N * D


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    layout = "tokens"

    def __init__(self, in_ch: int, hw: tuple[int, int], patch: int, dim: int, depth: int, heads: int,
                 mlp_ratio: float) -> None:
        super().__init__()
        self.patch = patch
        self.grid = (hw[0] // patch, hw[1] // patch)
        self.embed = nn.Conv2d(in_ch, dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.out_channels, self.out_stride = dim, patch

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x).flatten(2).transpose(1, 2) + self.pos

    def forward_blocks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Tokens ``[B, N, dim]`` after every block (the last one after the final norm)."""
        h, out = self.tokens(x), []
        for i, blk in enumerate(self.blocks):
            h = blk(h)
            out.append(self.norm(h) if i == len(self.blocks) - 1 else h)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_blocks(x)[-1]


# ------------------------------------------------------------------------------------------------------- LeNet
class LeNet(nn.Module):
    """The F-MTL MultiMNIST LeNet (``LenetModel.encode``); ``stages`` are the three levels cross-stitch joins."""

    layout = "vector"
    min_size = 18  # (H - 8) // 2 - 4 >= 2 so that the second pooling has a 2x2 window

    def __init__(self, in_ch: int, hw: tuple[int, int]) -> None:
        super().__init__()
        h, w = (((s - 8) // 2 - 4) // 2 for s in hw)
        self.stages = nn.ModuleList([
            nn.Sequential(nn.Conv2d(in_ch, 10, 9), nn.ReLU(inplace=True), nn.MaxPool2d(2)),
            nn.Sequential(nn.Conv2d(10, 20, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2)),
            nn.Sequential(nn.Flatten(), nn.Linear(20 * h * w, 50), nn.ReLU(inplace=True))])
        self.out_channels, self.out_stride = 50, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for s in self.stages:
            x = s(x)
        return x


def tokens_to_map(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, N, D]`` -> ``[B, D, h, w]``."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)


@dataclass
class EncoderOptions:
    """The image encoder of an arch (shared by every image arch's ``Options``)."""

    encoder: str = "segnet"
    width: int = 8  # 64x64 SegNet: ~37 M MACs per image with scenes' 5 heads (MTAN uses 64 at 288x384)
    depth: int = 3
    patch: int = 8
    vit_dim: int = 64
    vit_heads: int = 4
    mlp_ratio: float = 2.0
    head_width: int = 0  # classification heads' hidden width; 0: the encoder's channels

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        for name in ("width", "depth", "patch", "vit_dim", "vit_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.encoder == "segnet" and self.depth > 8:
            raise ValueError(f"depth of a segnet encoder must be at most 8, got {self.depth}")
        if self.vit_dim % self.vit_heads:
            raise ValueError(f"vit_dim ({self.vit_dim}) must be divisible by vit_heads ({self.vit_heads})")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")


def resolution_constraint(o: EncoderOptions) -> int:
    """H and W must be multiples of this for encoder ``o``."""
    if o.encoder == "segnet":
        return 2 ** o.depth
    if o.encoder == "resnet":
        return 2 ** (o.depth - 1)
    if o.encoder == "lenet":
        return 1
    return o.patch


def build_encoder(o: EncoderOptions, spec: ImageSpec) -> nn.Module:
    if o.encoder == "segnet":
        return SegNet(spec.channels, o.width, o.depth)
    if o.encoder == "resnet":
        return ResNet(spec.channels, o.width, o.depth)
    if o.encoder == "lenet":
        return LeNet(spec.channels, (spec.height, spec.width))
    return ViT(spec.channels, (spec.height, spec.width), o.patch, o.vit_dim, o.depth, o.vit_heads, o.mlp_ratio)


# ------------------------------------------------------------------------------------------------------ stages
# An encoder as a sequence of stages, for archs that act between them (cross-stitch units, PLE's extraction levels):
# SegNet: its L pooling levels, then its L unpooling levels; ResNet: its stages (the stem joins the first); ViT: its
# blocks (patch embedding before the first, the final norm after the last); LeNet: its three levels.
def n_stages(enc: nn.Module) -> int:
    if isinstance(enc, SegNet):
        return 2 * enc.depth
    if isinstance(enc, (ResNet, LeNet)):
        return len(enc.stages)
    return len(enc.blocks)


def stages_of_options(o: "EncoderOptions") -> int:
    """:func:`n_stages` of the encoder ``o`` builds, known before it is built."""
    return {"segnet": 2 * o.depth, "lenet": 3}.get(o.encoder, o.depth)


def run_stage(enc: nn.Module, k: int, h: torch.Tensor, state: dict) -> torch.Tensor:
    """Stage ``k`` of encoder ``enc`` on ``h``; ``state`` (one dict per pass through the encoder) keeps SegNet's
    pooling indices for its unpooling stages."""
    if isinstance(enc, SegNet):
        L = enc.depth
        if k < L:
            b = enc.enc_conv[k](enc.enc_block[k](h))
            p, ind = F.max_pool2d(b, 2, 2, return_indices=True)
            state.setdefault("idx", []).append((ind, b.shape[-2:]))
            return p
        i = 2 * L - 1 - k
        ind, size = state["idx"][i]
        return enc.dec_conv[i](enc.dec_block[i](F.max_unpool2d(h, ind, 2, 2, output_size=size)))
    if isinstance(enc, ResNet):
        return enc.stages[k](enc.stem(h) if k == 0 else h)
    if isinstance(enc, LeNet):
        return enc.stages[k](h)
    h = enc.tokens(h) if k == 0 else h
    h = enc.blocks[k](h)
    return enc.norm(h) if k == len(enc.blocks) - 1 else h


class _Holder(nn.Module):
    """Registers a bare parameter (the ViT's position embeddings) inside a stage's module group."""

    def __init__(self, p: nn.Parameter) -> None:
        super().__init__()
        self.p = p


def stage_modules(enc: nn.Module, k: int) -> nn.ModuleList:
    """The modules that hold every parameter and buffer stage ``k`` of ``enc`` uses (each in exactly one stage)."""
    if isinstance(enc, SegNet):
        L = enc.depth
        i = k if k < L else 2 * L - 1 - k
        return nn.ModuleList([enc.enc_block[i], enc.enc_conv[i]] if k < L else [enc.dec_block[i], enc.dec_conv[i]])
    if isinstance(enc, ResNet):
        return nn.ModuleList(([enc.stem] if k == 0 else []) + [enc.stages[k]])
    if isinstance(enc, LeNet):
        return nn.ModuleList([enc.stages[k]])
    last = len(enc.blocks) - 1
    return nn.ModuleList(([enc.embed, _Holder(enc.pos)] if k == 0 else []) + [enc.blocks[k]]
                         + ([enc.norm] if k == last else []))


# ------------------------------------------------------------------------------------------------------- heads
class DenseHead(nn.Module):
    """MTAN's prediction layer (``conv_layer(..., pred=True)``): 3x3 conv then 1x1 conv to the task's channels;
    token inputs are laid out as their patch grid first, and the output is upsampled bilinearly to the image size
    when the features are coarser."""

    def __init__(self, c_in: int, c_out: int, out_hw: tuple[int, int], grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_in, 3, padding=1)
        self.pred = nn.Conv2d(c_in, c_out, 1)
        self.out_hw, self.grid = out_hw, grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = tokens_to_map(x, self.grid)
        y = self.pred(self.conv(x))
        if tuple(y.shape[-2:]) != tuple(self.out_hw):
            y = F.interpolate(y, size=self.out_hw, mode="bilinear", align_corners=False)
        return y


class ClassHead(nn.Module):
    """Global average pooling (over positions or tokens; a vector feature is read as it is), then
    Linear-ReLU-Linear to the task's outputs (MGDA's ``MultiLeNetO`` head; F-MTL's LeNet head is one Linear)."""

    def __init__(self, c_in: int, c_out: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x if x.dim() == 2 else x.mean(1) if x.dim() == 3 else x.mean((2, 3))
        return self.net(pooled)


# ------------------------------------------------------------------------------------------------------- FLOPs
def _layer_macs(m: nn.Module, inputs: tuple[Any, ...], output: Any) -> int:
    if isinstance(m, nn.Conv2d):
        k = m.kernel_size[0] * m.kernel_size[1]
        return output.numel() * (m.in_channels // m.groups) * k
    if isinstance(m, nn.ConvTranspose2d):
        k = m.kernel_size[0] * m.kernel_size[1]
        return inputs[0].numel() * (m.out_channels // m.groups) * k
    if isinstance(m, nn.Linear):
        return output.numel() * m.in_features
    return 0


def count_macs(model: nn.Module, run: Callable[[], Any], groups: dict[str, nn.Module]) -> dict[str, int]:
    """MACs of one call of ``run`` (a forward on ONE sample), attributed to the named module ``groups``.

    Counts ``nn.Conv2d``, ``nn.ConvTranspose2d`` and ``nn.Linear`` from their shapes, plus any module's own
    ``macs(inputs, output)`` (then its children are not visited) and :class:`Attention`'s matrix products."""
    owner: dict[int, str] = {}
    for gname, g in groups.items():
        for sub in g.modules():
            owner.setdefault(id(sub), gname)
    counts = {g: 0 for g in groups}
    skip: set[int] = set()
    for m in model.modules():
        if hasattr(m, "macs") and callable(m.macs):
            skip |= {id(s) for s in m.modules() if s is not m}
    handles = []

    def hook(m: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if id(m) in skip:
            return
        if hasattr(m, "macs") and callable(m.macs):
            n = int(m.macs(inputs, output))
        else:
            n = _layer_macs(m, inputs, output)
            if isinstance(m, Attention):
                n += m.own_macs(inputs[0])
        g = owner.get(id(m))
        if g is not None and n:
            counts[g] += n

    for m in model.modules():
        handles.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return counts
