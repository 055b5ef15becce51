"""TaskExpert (Ye & Xu, ICCV 2023, "TaskExpert: Dynamically Assembling Multi-Task Representations with Memorial
Mixture-of-Experts", arXiv 2307.15324) on the tiny ViT. A RE-IMPLEMENTATION: no official code was ever released
(github.com/prismformore/Multi-Task-Transformer holds only InvPT, TaskPrompter and DiffusionMTL; its issue #28 asking
for the code is open), and only the abstract and the Fig. 2 caption of the paper could be read, so every detail
below that is not in that text is our choice, named here, with the main ones as options.

From the paper (abstract and Fig. 2 caption):

- a set of expert networks decomposes a backbone feature into several task-generic features;
- one dynamic (input-dependent) gating network per task weighs them into that task's feature;
- Memorial Mixture-of-Experts (MMoE) modules sit at several backbone layers; a multi-task feature memory (one
  feature per task) is *read* as one more expert of the module and *written* (updated) at that layer;
- after the last layer, each task's memory is decoded into that task's prediction.

Our choices (the paper's text does not fix them):

- The MMoE modules read the backbone's tokens at the tapped blocks and do not feed back into the backbone (Fig. 2
  draws them beside it): the backbone is the plain ViT that ``shared_bottom`` uses, so a comparison isolates the
  decoding. Tapped blocks (``layers``, 1-based block numbers): default every other block ending at the last
  (depth 4: blocks 2 and 4), as InvPT/TaskPrompter by the same authors tap evenly spaced ViT layers; the switch
  ``last_only`` keeps only the last block (the paper's "last layer only" ablation).
- Each module first applies a LayerNorm (shared) to the tapped tokens: a pre-norm ViT's intermediate residual
  stream is not normalised, and the last block's output is.
- Expert: a token-wise two-layer MLP ``Linear(D, H) - GELU - Linear(H, De)`` (``expert_dim`` ``De``, hidden ``H =
  expert_dim``), K of them (``n_experts``, default 8, as our MMoE), evaluated with batched matmuls. Experts are
  shared by all tasks (they are the "task-generic" feature spaces).
- Gate: per task and module, ``softmax(Linear(D, K + 1))`` of each token's (normalised) backbone feature: a dense
  softmax per token (``gate_input = "token"``; ``"image"`` gates once per image from the mean token); no top-k, no
  load-balancing loss (the paper names none).
- Memory read: the task's memory ``M_t`` is the (K+1)-th expert: ``F_t = sum_k w_k E_k + w_mem M_t``. At the first
  module the memory is empty, so its gate has K outputs (an all-zero expert would only take gate mass).
- Memory write (``memory_write``): ``"replace"`` (default) ``M_t <- LayerNorm_t(F_t)``: the memory carries the latest
  task feature forward, and long-range accumulation happens through the gated read at the next module;
  ``"add"``: ``M_t <- LayerNorm_t(M_t + F_t)``. The per-task LayerNorm is the memory path's own parameters.
- Decoder: each task's dense head (MTAN's 3x3 conv + 1x1 conv, upsampled; ``mtlbench.vision.nets.DenseHead``) on
  its final memory laid out as the token grid; a classification task gets the pooled head.
- ``memory = False`` (the paper's ablation, = MMoE on tokens at the same layers): gates have K outputs, nothing is
  read or written, and the decoder reads the mean of the task's features over the tapped modules (with one tapped
  module: plain MMoE on the last tokens); so every module still reaches the loss, as with the memory.

Shared parameters: input stage, ViT, per-module LayerNorm and experts. Per task: its gates, its memory path (write
norms), its decoder. The shared features are, per tapped module, the normalised tokens ``[B, N, D]`` (the gates read
them) and the expert outputs ``[K, B, N, De]``.

Expert usage: :meth:`record_extras` runs the selected model over the test split and stores, per task and tapped
block, the mean gate weight of each expert and of the memory, and the mean per-token gate entropy (nats), in the
record's ``arch_info["expert_usage"]`` (the leaderboard draws it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtlbench import register_arch
from mtlbench.data import Split
from mtlbench.loader import BatchLoader
from mtlbench.vision.arch import ImageArch, token_layout
from mtlbench.vision.nets import EncoderOptions, ViT

WRITES = ("replace", "add")
GATE_INPUTS = ("token", "image")


def tapped_blocks(depth: int, layers: tuple[int, ...], last_only: bool) -> tuple[int, ...]:
    """The 1-based ViT blocks carrying an MMoE module: ``layers``, or every other block ending at the last."""
    if last_only:
        return (depth,)
    if layers:
        return tuple(sorted(set(layers)))
    return tuple(range(depth, 0, -2))[::-1]


class ExpertMLPs(nn.Module):
    """K token-wise MLPs ``Linear(D, H) - GELU - Linear(H, De)`` in batched matmuls: ``[B, N, D] -> [K, B, N, De]``."""

    def __init__(self, k: int, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(k, d_in, hidden))
        self.b1 = nn.Parameter(torch.empty(k, 1, 1, hidden))
        self.w2 = nn.Parameter(torch.empty(k, hidden, d_out))
        self.b2 = nn.Parameter(torch.empty(k, 1, 1, d_out))
        for w, b, fan_in in ((self.w1, self.b1, d_in), (self.w2, self.b2, hidden)):  # nn.Linear's init
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(torch.einsum("bnd,kdh->kbnh", x, self.w1) + self.b1)
        return torch.einsum("kbnh,khe->kbne", h, self.w2) + self.b2

    def macs(self, inputs: tuple[Any, ...], output: torch.Tensor) -> int:
        k, b, n, _ = output.shape
        return b * n * k * (self.w1.shape[1] * self.w1.shape[2] + self.w2.shape[1] * self.w2.shape[2])


class Mix(nn.Module):
    """Gate-weighted sum of the experts and the memory (no parameters; a module so the FLOPs counter sees it)."""

    def forward(self, experts: torch.Tensor, w: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        k = experts.shape[0]
        f = torch.einsum("kbne,bnk->bne", experts, w[..., :k])
        return f if memory is None else f + w[..., k:] * memory

    def macs(self, inputs: tuple[Any, ...], output: torch.Tensor) -> int:
        w = inputs[1]
        return output.numel() * w.shape[-1]


@register_arch("taskexpert")
class TaskExpert(ImageArch):
    """TaskExpert (Ye & Xu, ICCV 2023; re-implementation): Memorial MoE on ViT tokens, a per-task feature memory."""

    encoders = ("vit",)

    @dataclass
    class Options(EncoderOptions):
        encoder: str = "vit"
        depth: int = 4
        n_experts: int = 8
        expert_dim: int = 0          # 0: the ViT width
        layers: tuple[int, ...] = ()  # 1-based tapped blocks; empty: every other block ending at the last
        last_only: bool = False
        memory: bool = True
        memory_write: str = "replace"
        gate_input: str = "token"

        def __post_init__(self) -> None:
            if self.encoder != "vit":
                raise ValueError(f"encoder must be 'vit' (TaskExpert taps the ViT's token blocks; CNN encoders "
                                 f"segnet/resnet are not supported), got {self.encoder!r}")
            super().__post_init__()
            if self.n_experts < 1:
                raise ValueError(f"n_experts must be at least 1, got {self.n_experts}")
            if self.expert_dim < 0:
                raise ValueError(f"expert_dim must be >= 0 (0: the ViT width), got {self.expert_dim}")
            bad = [b for b in self.layers if not 1 <= b <= self.depth]
            if bad:
                raise ValueError(f"layers {list(self.layers)}: block(s) {bad} outside the ViT's depth; valid blocks "
                                 f"are 1..{self.depth}")
            if self.last_only and self.layers:
                raise ValueError(f"last_only taps block {self.depth} only; drop layers={list(self.layers)} or "
                                 f"last_only")
            if self.memory_write not in WRITES:
                raise ValueError(f"memory_write must be one of {', '.join(WRITES)}, got {self.memory_write!r}")
            if self.gate_input not in GATE_INPUTS:
                raise ValueError(f"gate_input must be one of {', '.join(GATE_INPUTS)}, got {self.gate_input!r}")

    def __init__(self, schema, tasks, embed_dim, options=None):
        super().__init__(schema, tasks, embed_dim, options)
        o = self.o
        self.shared["input"] = self.input_stage()
        self.shared["encoder"] = vit = self.encoder()
        assert isinstance(vit, ViT)
        D, K = o.vit_dim, o.n_experts
        De = o.expert_dim or D
        self.blocks = tapped_blocks(o.depth, tuple(o.layers), o.last_only)
        self.shared["norms"] = nn.ModuleList(nn.LayerNorm(D) for _ in self.blocks)
        self.shared["experts"] = nn.ModuleList(ExpertMLPs(K, D, De, De) for _ in self.blocks)
        for t in self.tasks:
            h = self.heads[t.name]
            # the first module has no memory to read; later ones read it as expert K+1
            h["gates"] = nn.ModuleList(nn.Linear(D, K + (1 if o.memory and i > 0 else 0))
                                       for i in range(len(self.blocks)))
            h["mix"] = Mix()
            if o.memory:
                h["write"] = nn.ModuleList(nn.LayerNorm(De) for _ in self.blocks)
            h["decoder"] = self.head(t, vit, De)
        self._usage: dict[str, list[list[torch.Tensor]]] | None = None

    def encode(self, batch):
        tokens = self.shared["encoder"].forward_blocks(self.shared["input"](batch))
        out: list[torch.Tensor] = []
        for i, b in enumerate(self.blocks):
            x = self.shared["norms"][i](tokens[b - 1])
            out += [x, self.shared["experts"][i](x)]
        return tuple(out)

    def decode(self, features, batch):
        o = self.o
        outs = []
        for t in self.task_names:
            h = self.heads[t]
            memory, feats = None, []
            for i in range(len(self.blocks)):
                x, experts = features[2 * i], features[2 * i + 1]
                g = h["gates"][i](x.mean(1, keepdim=True) if o.gate_input == "image" else x)
                w = torch.softmax(g, dim=-1).expand(x.shape[0], x.shape[1], -1)
                f = h["mix"](experts, w, memory if o.memory else None)
                if self._usage is not None:
                    self._record_usage(t, i, w)
                if o.memory:
                    memory = h["write"][i](f if memory is None or o.memory_write == "replace" else memory + f)
                else:
                    feats.append(f)
            z = memory if o.memory else torch.stack(feats).mean(0)
            outs.append(h["decoder"](z))
        return outs

    def feature_layouts(self):
        return tuple(lay for _ in self.blocks for lay in (token_layout(), token_layout(lead=1)))

    def describe(self):
        return {**super().describe(), "tapped_blocks": list(self.blocks), "reimplementation": True}

    # -- expert usage --------------------------------------------------------------------------------------
    def _record_usage(self, task: str, i: int, w: torch.Tensor) -> None:
        ent = -(w * torch.log(w.clamp_min(1e-12))).sum(-1)
        acc = self._usage[task][i]
        acc[0] += w.sum((0, 1), dtype=torch.float64)
        acc[1] += ent.sum(dtype=torch.float64)
        acc[2] += w.shape[0] * w.shape[1]

    def record_extras(self, split: Split, device: str) -> dict[str, Any]:
        """Expert usage of the trained model on ``split`` (the test split): per task and tapped block, the mean
        gate weight of each expert (``experts``, K values) and of the memory (``memory``; null where the module
        reads none), and the mean per-token gate entropy in nats (``entropy``; ``max_entropy`` = log of the
        number of choices)."""
        K = self.o.n_experts
        self._usage = {t: [[torch.zeros(len(g.bias), dtype=torch.float64, device=device),
                            torch.zeros((), dtype=torch.float64, device=device), 0]
                           for g in self.heads[t]["gates"]] for t in self.task_names}
        self.eval()
        try:
            with torch.no_grad():
                for batch in BatchLoader(split, self.eval_batch_size, device=device):
                    self(batch)
            usage = {}
            for t in self.task_names:
                rows = []
                for b, (wsum, esum, n) in zip(self.blocks, self._usage[t]):
                    mean = (wsum / max(n, 1)).cpu().tolist()
                    rows.append({"block": b, "experts": mean[:K], "memory": mean[K] if len(mean) > K else None,
                                 "entropy": float(esum) / max(n, 1), "max_entropy": math.log(len(mean))})
                usage[t] = rows
        finally:
            self._usage = None
        return {"expert_usage": {"split": "test", "tokens_per_image": self.shared["encoder"].grid[0]
                                 * self.shared["encoder"].grid[1], "tasks": usage}}
