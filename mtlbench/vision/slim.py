"""Width-slimmable building blocks: conv, linear and batch norm with prefix channel slicing, a slimmable SegNet
encoder and slimmable dense / classification decoders (for the controllable multi-task arch of Aich et al.,
ICCV 2023; see ``baselines/archs/slimmable.py``).

Slicing (slimmable networks, Yu et al., ICLR 2019; US-Nets, Yu & Huang, ICCV 2019): a layer holds its full-width
weights; at width multiplier ``w`` it uses the first ``channels(C, w)`` output channels and the first channels of
its input (as many as the input has), ``W[:c_out, :c_in]``. Narrower configurations are therefore nested in wider
ones, and every configuration shares its weights with the widest (the SuperNet).

Batch norm (:class:`SlimBatchNorm2d`): switchable BN (one BN per width, Yu et al. 2019) is impossible once the
encoder and every decoder pick their widths independently (|W|^(T+1) combinations), so we follow US-Nets' post-hoc
*BN recalibration*: while training, every pass normalises with its own batch statistics; the running statistics
are updated only on the passes of one configuration (the SuperNet pass of the sandwich rule, or the only
configuration of a fixed-width model), so the default (full-width) model evaluates correctly without any extra
step; a narrower configuration is evaluated after its statistics have been recomputed as plain averages over a few
training batches (:func:`recalibrate`). Its affine weights are sliced like a conv's.

FLOPs: every layer here counts its own multiply-accumulates from the shapes it actually used
(``macs(inputs, output)``, picked up by :func:`mtlbench.vision.nets.count_macs`): a conv ``H_out W_out c_out c_in
k^2``, a linear ``c_out c_in``; norms, activations, pooling, unpooling, biases are not counted (the suite's
convention).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

#: The default set of width multipliers (Aich et al. 2023 use a discrete set per encoder / decoder).
DEFAULT_WIDTHS = (0.25, 0.5, 0.75, 1.0)


def channels(c_max: int, w: float) -> int:
    """Channels used at multiplier ``w`` of a ``c_max``-channel layer: ``round(w * c_max)``, at least 1 (half-up,
    so 0.25/0.5/0.75 of 8 are 2/4/6)."""
    return max(1, min(c_max, int(c_max * w + 0.5)))


class SlimConv2d(nn.Conv2d):
    """``nn.Conv2d`` run on the first ``c_out`` filters and the first ``x.shape[1]`` input channels."""

    def forward(self, x: torch.Tensor, c_out: int | None = None) -> torch.Tensor:  # type: ignore[override]
        c_out = self.out_channels if c_out is None else c_out
        w = self.weight[:c_out, :x.shape[1]]
        b = None if self.bias is None else self.bias[:c_out]
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def macs(self, inputs: tuple[Any, ...], output: torch.Tensor) -> int:
        k = self.kernel_size[0] * self.kernel_size[1]
        return output.numel() * inputs[0].shape[1] * k


class SlimLinear(nn.Linear):
    """``nn.Linear`` on the first ``c_out`` outputs and the first ``x.shape[-1]`` inputs."""

    def forward(self, x: torch.Tensor, c_out: int | None = None) -> torch.Tensor:  # type: ignore[override]
        c_out = self.out_features if c_out is None else c_out
        b = None if self.bias is None else self.bias[:c_out]
        return F.linear(x, self.weight[:c_out, :x.shape[-1]], b)

    def macs(self, inputs: tuple[Any, ...], output: torch.Tensor) -> int:
        return output.numel() * inputs[0].shape[-1]


class SlimBatchNorm2d(nn.BatchNorm2d):
    """Batch norm over the first ``x.shape[1]`` channels.

    ``stats`` says what a training-mode pass does with the running statistics: ``"off"`` (batch statistics only,
    buffers untouched: the sandwich rule's sub-networks), ``"ema"`` (the usual exponential average with
    ``momentum``: the SuperNet pass, or a fixed-width model) or ``"average"`` (a plain cumulative average over the
    passes since :meth:`reset_running_stats`: BN recalibration of one configuration). Eval mode always uses the
    running statistics of the first channels."""

    stats = "ema"
    n_average = 0  # passes averaged since the last reset (``"average"`` mode)

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        self.n_average = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        w, b = self.weight[:c], self.bias[:c]
        if not self.training:
            return F.batch_norm(x, self.running_mean[:c], self.running_var[:c], w, b, False, 0.0, self.eps)
        if self.stats == "off":
            return F.batch_norm(x, None, None, w, b, True, 0.0, self.eps)
        if self.stats == "average":
            self.n_average += 1  # a host counter: no device sync
            momentum = 1.0 / self.n_average
        else:
            momentum = self.momentum
        # a prefix slice of a contiguous buffer is a view: batch_norm updates the first c entries in place
        return F.batch_norm(x, self.running_mean[:c], self.running_var[:c], w, b, True, momentum, self.eps)


class SlimConvBNReLU(nn.Module):
    """3x3 (or ``k``) conv without bias, slim BN, ReLU; ``max_out`` channels at width 1."""

    def __init__(self, c_in: int, max_out: int, k: int = 3) -> None:
        super().__init__()
        self.max_out = max_out
        self.conv = SlimConv2d(c_in, max_out, k, padding=k // 2, bias=False)
        self.bn = SlimBatchNorm2d(max_out)

    def forward(self, x: torch.Tensor, w: float) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x, channels(self.max_out, w))), inplace=True)


class SlimSegNet(nn.Module):
    """The suite's SegNet encoder-decoder (:class:`mtlbench.vision.nets.SegNet`, MTAN's layout: per level one 3x3
    conv-BN-ReLU, then one more in the first level and two in the others, 2x2 max-pool with indices; the decoder
    mirrors it with max-unpooling), every layer slimmable by one multiplier ``w``. Channels at width 1:
    ``width * (1, 2, 4, 8, 8, ...)``; output ``[B, channels(width, w), H, W]``. The input image's channels are
    never sliced."""

    layout = "map"

    def __init__(self, in_ch: int, width: int, depth: int) -> None:
        super().__init__()
        mult = (1, 2, 4, 8, 8, 8, 8, 8)
        f = [width * mult[i] for i in range(depth)]
        self.depth, self.filters = depth, f
        self.enc_block = nn.ModuleList([SlimConvBNReLU(in_ch, f[0])] + [SlimConvBNReLU(f[i - 1], f[i])
                                                                        for i in range(1, depth)])
        self.enc_conv = nn.ModuleList([_Seq(SlimConvBNReLU(f[0], f[0]))] + [
            _Seq(SlimConvBNReLU(f[i], f[i]), SlimConvBNReLU(f[i], f[i])) for i in range(1, depth)])
        self.dec_block = nn.ModuleList([SlimConvBNReLU(f[0], f[0])] + [SlimConvBNReLU(f[i], f[i - 1])
                                                                       for i in range(1, depth)])
        self.dec_conv = nn.ModuleList([_Seq(SlimConvBNReLU(f[0], f[0]))] + [
            _Seq(SlimConvBNReLU(f[i - 1], f[i - 1]), SlimConvBNReLU(f[i - 1], f[i - 1])) for i in range(1, depth)])
        self.out_channels, self.out_stride = f[0], 1

    def forward(self, x: torch.Tensor, w: float = 1.0) -> torch.Tensor:
        idx, sizes = [], []
        h = x
        for i in range(self.depth):
            b = self.enc_conv[i](self.enc_block[i](h, w), w)
            sizes.append(b.shape[-2:])
            h, ind = F.max_pool2d(b, 2, 2, return_indices=True)
            idx.append(ind)
        for i in reversed(range(self.depth)):
            u = F.max_unpool2d(h, idx[i], 2, 2, output_size=sizes[i])
            h = self.dec_conv[i](self.dec_block[i](u, w), w)
        return h


class _Seq(nn.ModuleList):
    """A chain of width-taking blocks."""

    def __init__(self, *blocks: nn.Module) -> None:
        super().__init__(blocks)

    def forward(self, x: torch.Tensor, w: float) -> torch.Tensor:  # type: ignore[override]
        for blk in self:
            x = blk(x, w)
        return x


class SlimDenseDecoder(nn.Module):
    """A task's dense decoder: ``layers`` 3x3 conv-BN-ReLU of ``hidden`` channels at width 1 (sliced by the
    decoder's own multiplier), then a 1x1 conv with bias to the task's ``c_out`` channels (never sliced). Reads
    however many encoder channels it is given (the encoder's width)."""

    def __init__(self, c_in: int, hidden: int, c_out: int, layers: int) -> None:
        super().__init__()
        self.blocks = _Seq(*[SlimConvBNReLU(c_in if i == 0 else hidden, hidden) for i in range(layers)])
        self.pred = SlimConv2d(hidden if layers else c_in, c_out, 1)

    def forward(self, x: torch.Tensor, w: float = 1.0) -> torch.Tensor:
        return self.pred(self.blocks(x, w))


class SlimClassDecoder(nn.Module):
    """A classification decoder: global average pooling, a slim Linear to ``hidden`` (sliced), ReLU, a Linear to
    the task's outputs (never sliced)."""

    def __init__(self, c_in: int, hidden: int, c_out: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.fc = SlimLinear(c_in, hidden)
        self.out = SlimLinear(hidden, c_out)

    def forward(self, x: torch.Tensor, w: float = 1.0) -> torch.Tensor:
        h = F.relu(self.fc(x.mean((2, 3)), channels(self.hidden, w)))
        return self.out(h)


# ------------------------------------------------------------------------------------------- BN statistics
def slim_norms(module: nn.Module) -> list[SlimBatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, SlimBatchNorm2d)]


@contextlib.contextmanager
def stats_mode(module: nn.Module, mode: str) -> Iterator[None]:
    """Every slim BN under ``module`` in ``mode`` ("off" / "ema" / "average") inside the block."""
    norms = slim_norms(module)
    old = [m.stats for m in norms]
    for m in norms:
        m.stats = mode
    try:
        yield
    finally:
        for m, s in zip(norms, old):
            m.stats = s


def save_stats(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in
            slim_norms(module)]


def load_stats(module: nn.Module, saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    for m, (mean, var, n) in zip(slim_norms(module), saved):
        m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(n)
