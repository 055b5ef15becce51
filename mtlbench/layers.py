"""Building blocks shared by the architectures (and available to plugins).

- :class:`InputLayer`: the one input layer every arch uses, so all archs see the same embeddings: one embedding
  table per categorical field (stored as a single table with offsets, one lookup per batch) and the dense features
  projected to one more field of the same width (the MTReclib convention).
- :class:`MLP`: ``[Linear -> (BatchNorm) -> activation -> Dropout] x L``.
- :class:`ExpertBank`: ``n`` same-shaped expert MLPs evaluated together with batched matrix products instead of
  a Python loop over expert modules.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtlbench.data import FeatureSchema

Activation = Literal["relu", "swish"]

_THREAD = threading.local()


def thread_generator() -> torch.Generator | None:
    """The generator this thread's training draws from instead of torch's global one (None: the global one).

    Set only while seeds are trained together in one process (``--vectorize-seeds``, one thread per seed): the
    global generator would then be shared by every seed. Each seed's generator is seeded as a separate run seeds
    the global one (``torch.manual_seed(seed)`` at the start of training), so the draws, and the results, are the
    same as in separate runs."""
    return getattr(_THREAD, "generator", None)


@contextlib.contextmanager
def seeded_thread(seed: int) -> Iterator[torch.Generator]:
    """Within the block, this thread's dropout draws from its own generator seeded with ``seed``."""
    old = thread_generator()
    _THREAD.generator = torch.Generator().manual_seed(seed)
    try:
        yield _THREAD.generator
    finally:
        _THREAD.generator = old


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return F.relu(x)
    if name == "swish":  # Swish with beta = 1 (SiLU)
        return F.silu(x)
    raise ValueError(f"unknown activation '{name}' (valid: relu, swish)")


class InputLayer(nn.Module):
    """Embeds every categorical field to ``embed_dim`` and projects the dense vector to one extra field."""

    def __init__(self, schema: FeatureSchema, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        sizes = [f.vocab_size for f in schema.categorical]
        self.n_fields = len(sizes) + (1 if schema.n_dense else 0)
        if self.n_fields == 0:
            raise ValueError("the schema has no features")
        offsets = torch.tensor([0] + sizes[:-1], dtype=torch.long).cumsum(0) if sizes else torch.zeros(0).long()
        self.register_buffer("offsets", offsets, persistent=False)
        self.embedding = nn.Embedding(sum(sizes), embed_dim) if sizes else None
        if self.embedding is not None:
            nn.init.normal_(self.embedding.weight, std=1e-2 if embed_dim > 0 else 1.0)
        self.dense = nn.Linear(schema.n_dense, embed_dim) if schema.n_dense else None

    @property
    def output_dim(self) -> int:
        return self.n_fields * self.embed_dim

    def fields(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-field embeddings ``[B, n_fields, embed_dim]``."""
        parts = []
        if self.embedding is not None:
            parts.append(self.embedding(batch["categorical"] + self.offsets))
        if self.dense is not None:
            parts.append(self.dense(batch["dense"]).unsqueeze(1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Flattened embeddings ``[B, n_fields * embed_dim]``."""
        return self.fields(batch).flatten(1)


class MLP(nn.Module):
    """``[Linear -> (BatchNorm1d) -> activation -> Dropout]`` per hidden layer; optional final linear output."""

    def __init__(self, in_dim: int, units: Sequence[int], dropout: float = 0.0, batch_norm: bool = True,
                 act: Activation = "relu", out_dim: int | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for u in units:
            layers.append(nn.Linear(d, u))
            if batch_norm:
                layers.append(nn.BatchNorm1d(u))
            layers.append(nn.SiLU() if act == "swish" else nn.ReLU())
            if dropout > 0:
                layers.append(Dropout(dropout))
            d = u
        if out_dim is not None:
            layers.append(nn.Linear(d, out_dim))
            d = out_dim
        self.net = nn.Sequential(*layers)
        self.output_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout of the expert banks: each element zeroed with probability ``p``, the rest scaled so the
    expectation is unchanged. Draws from :func:`thread_generator` when one is set (the same stream as the global
    generator seeded alike).

    On the CPU the mask comes from 16-bit random lanes, four per 64-bit draw: torch's CPU generator (mt19937)
    costs per draw, so a mask of 8.4M elements takes 18 ms instead of 41 ms with one float per element (issue 13;
    ``F.dropout``'s Bernoulli sampler: 66 ms). ``p`` is thereby rounded to a multiple of 2^-16 (``k / 65536``,
    |error| <= 7.6e-6: 0.2 drops 0.19999695) and the scale is the exact ``65536 / (65536 - k)``. Elsewhere a
    float uniform mask (one draw per element; GPUs draw them in parallel)."""
    if not training or p <= 0.0:
        return x
    g = thread_generator()
    if x.device.type == "cpu":
        k = round(p * 65536)
        if k >= 65536:
            return x * 0.0
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None, generator=g)
        lanes = words.view(torch.int16)[:n].view(x.shape)  # uniform on [-32768, 32767]
        keep = torch.ge(lanes, k - 32768, out=torch.empty(x.shape, dtype=x.dtype))  # 1.0 kept, 0.0 dropped
        return x * keep.mul_(65536 / (65536 - k))
    u = torch.rand_like(x) if g is None else torch.empty_like(x).uniform_(0.0, 1.0, generator=g)
    return x * ((u >= p).to(x.dtype) * (1.0 / (1.0 - p)))


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU masks come from :func:`dropout`'s sampler (16-bit lanes, drawn from
    :func:`thread_generator` when one is set, so a seed trained in a group draws what its separate run draws;
    ``F.dropout``'s CPU Bernoulli sampler is 3.7x slower). On other devices it is ``nn.Dropout`` itself; the seed
    groups run such seeds one by one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return dropout(x, self.p, self.training)
        if thread_generator() is not None and self.training and self.p > 0.0:
            raise RuntimeError("per-thread dropout generators exist on the CPU only")
        return super().forward(x)


class ExpertBatchNorm(nn.Module):
    """BatchNorm of ``[n_experts, B, units]`` with independent statistics per expert and unit: one
    ``BatchNorm1d(n * units)`` applied to the ``[B, n * units]`` view (a cheap copy; reducing over the middle axis
    in place is ~10x slower on CPU)."""

    def __init__(self, n: int, units: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(n * units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, B, u = x.shape
        return self.flat(x.transpose(0, 1).reshape(B, n * u)).reshape(B, n, u).transpose(0, 1)

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """The same normalisation of ``[B, n * units]`` (expert-major columns), for a caller already in that
        layout."""
        return self.norm(x)


class ExpertBank(nn.Module):
    """``n`` expert MLPs with identical shapes, evaluated with batched matmuls.

    Input ``[B, in]`` (every expert sees the same input) or ``[n, B, in]`` (a private input per expert, as with
    HoME's feature gates). Output ``[n, B, units[-1]]``. Per layer: Linear -> (BatchNorm) -> activation ->
    Dropout, as in :class:`MLP` (every layer, the last included, gets the BatchNorm when ``batch_norm``).
    """

    def __init__(self, n: int, in_dim: int, units: Sequence[int], dropout: float = 0.0, batch_norm: bool = True,
                 act: Activation = "relu") -> None:
        super().__init__()
        if n < 1 or not units:
            raise ValueError("an expert bank needs at least one expert and one layer")
        self.n, self.act, self.dropout = n, act, dropout
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.norms = nn.ModuleList()
        d = in_dim
        for u in units:
            w = torch.empty(n, d, u)
            b = torch.empty(n, 1, u)
            bound = 1.0 / math.sqrt(d)  # nn.Linear's default init, per expert
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))
            self.norms.append(ExpertBatchNorm(n, u) if batch_norm else nn.Identity())
            d = u
        self.output_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Bias, BatchNorm, activation and dropout run on the contiguous ``[B, n * units]`` layout BatchNorm needs,
        # and the layer's output is its ``[n, B, units]`` view: elementwise ops (and their backward) on a permuted
        # layout, or on two operands of different layouts, are several times slower on CPU (issue 13: ~45 ms of a
        # 420 ms MMoE step). The values are bit for bit those of the per-expert layout.
        h = x
        for w, b, norm in zip(self.weights, self.biases, self.norms):
            bn = isinstance(norm, ExpertBatchNorm)
            if h.dim() == 2:  # shared input: one matmul against all experts' weights at once
                flat = h @ w.permute(1, 0, 2).reshape(w.shape[1], -1) + b.transpose(0, 1).reshape(1, -1)
            elif bn:
                flat = torch.baddbmm(b, h, w).transpose(0, 1).reshape(h.shape[1], -1)
            else:  # no BatchNorm after a per-expert matmul: stay in its layout
                h = dropout(activation(self.act, torch.baddbmm(b, h, w)), self.dropout, self.training)
                continue
            flat = dropout(activation(self.act, norm.flat(flat) if bn else flat), self.dropout, self.training)
            h = flat.reshape(flat.shape[0], self.n, -1).transpose(0, 1)
        return h


def mix(experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum of expert outputs: ``experts [n, B, d]``, ``weights [B, n]`` -> ``[B, d]``."""
    return torch.einsum("nbd,bn->bd", experts, weights)
