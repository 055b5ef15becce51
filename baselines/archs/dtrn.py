"""DTRN: "Deep Task-specific Bottom Representation Network for Multi-Task Recommendation", Liu, Zhou, Jiang, Ge,
Lian, CIKM 2023 (arXiv 2308.05996).

DTRN gives every task its own *bottom* representation, then feeds it to an ordinary multi-task network:

1. **TIM** (task-specific interest module). A hypernetwork ``H`` reads a task embedding ``e_t`` and a
   behaviour-type embedding ``e_b`` (click, cart, purchase... one per ``FeatureSchema.sequences`` entry) and
   generates the LayerNorm gains and biases of a shared Transformer encoder:
   ``[gamma_tb, beta_tb] = H([e_t ; e_b])``, ``CondLN(h) = (1 + gamma_tb) * (h - mu) / sigma + beta_tb``. The
   conditional Transformer encodes the type-b behaviour sequence once per (task, type) pair; a target attention
   with the candidate item as query pools it into the interest ``u_tb``. Every Transformer weight is shared across
   tasks and types; only the LN affine terms are generated (the "parameter-efficient" part).
2. **TRM** (task-specific representation refinement). Per task, a SENet-like network re-weights every feature
   embedding, the interests included: ``z_t = [e_1 .. e_F, u_t1 .. u_tS]`` (``F`` input fields: categorical
   fields and the projected dense vector), ``a_t = 2 sigmoid(W2_t ReLU(W1_t mean_d(z_t)))`` (one weight per field,
   squeeze = mean over the embedding width), ``x_t = flatten(a_t * z_t)``.
3. **Upper network** (``upper``): ``"mmoe"``: ``shared_experts`` experts and a softmax gate per task, both on
   ``x_t``; ``"ple"``: one CGC extraction layer (PLE with one level): ``shared_experts`` shared experts and
   ``task_experts`` experts per task, task t's gate over its own and the shared experts, all on ``x_t``. A tower
   per task on the gate's mixture. The upper network lives in this file rather than reusing a stand-alone
   ``mmoe``/``ple`` arch: its shared experts must be the field-wise experts described under "partition", which
   is also why a second PLE level is not offered.

Sources and assumptions. The paper's full text could not be read here: the architecture above follows its
abstract and two detailed summaries (both name the hypernetwork inputs, the generated LN gamma/beta inside a
Transformer, and an MLP that outputs one importance weight per embedding, multiplied onto it). Our choices where
they are silent, each switchable or documented:

- one Transformer layer (``n_layers``), ``n_heads`` = 2, FFN width ``ffn_factor`` x d, learned position
  embeddings added to the history items' embeddings; every LN of the encoder is conditional; generated terms
  are residuals around the identity (the hypernetwork's last layer starts small, so every (task, type) starts
  near a plain LN);
- ``pre_ln = True`` (default): pre-LN layers ``h + MHA(CondLN(h))``, ``h + FFN(CondLN(h))`` whose residual
  output layers start at zero, so the encoder starts as the identity and its output stays on the scale of the
  shared embeddings (std 1e-2 in mtlbench's input layer). ``pre_ln = False`` is the original post-LN layer; its
  unit-scale output dwarfs the field embeddings it is concatenated with, and in our runs it trained clearly
  worse (2 epochs of the default ``ecommerce``: test AUC ctr 0.712 vs 0.749 pre-LN). A consequence of the zero
  start: at initialisation all tasks' interests coincide and the task embeddings get no gradient until the
  first update has made the residual branches non-zero;
- pooling: scaled dot-product target attention, query ``W_q e_item`` (the candidate's embedding from the shared
  input layer; history items share that embedding table), over the valid positions; an empty history gives 0;
- hypernetwork: MLP ``2 hyper_dim -> hyper_units -> 4 d n_layers`` with ReLU; ``hyper_dim`` = 16;
- SENet: reduction ``se_reduction`` = 3, gate ``2 sigmoid`` (1 = unchanged, as SENet's sigmoid but centred on
  identity), one weight per field;
- experts are single-layer ``Linear -> BatchNorm -> ReLU`` networks of ``expert_units`` (the PLE paper's experts
  are single layers; BN as in the other archs' experts, ``batch_norm`` switches it off together with the towers'
  BN). A shared expert's BatchNorm acts on the task's own pre-activations, so it is one BatchNorm per task (a
  task-specific module: statistics and affine terms of task t's view of the experts); towers are
  ``[Linear -> BN -> ReLU] x tower_units`` then a linear output, as in the other archs;
  ``dropout`` applies to the towers only (the encoder has none);
- defaults sized for CPU like the other archs: 4 shared experts of 64 units (``shared_experts``,
  ``expert_units``), 1 task expert per task with ``upper = "ple"``, towers of 64;
- ablations: ``tim = false`` drops the interests (DTRN-TRM: refinement only, runs on data without sequences),
  ``trm = false`` sets every ``a_t`` to 1.

Shared / task-specific partition (mtlbench's contract: ``encode`` uses shared parameters only, ``decode`` task
parameters only, and each output depends on shared parameters only through the features):

- shared (``self.shared``): input layer (item embeddings too), position embeddings, behaviour-type embeddings,
  **the task-embedding table**, the hypernetwork, the Transformer and the pooling query; the shared experts'
  weights. The task embeddings are the hypernetwork's input: a task-specific parameter feeding the shared
  hypernetwork and Transformer would make those shared parameters part of each task's private computation, and
  per-task gradients through the features would then be wrong. So the table is shared; row t only ever
  receives task t's gradient (other rows get exact zeros from it).
- task-specific (``self.heads[t]``): the SENet, the BatchNorm of the shared experts' pre-activations, gate, PLE
  task experts and tower.
- features (computed in ``encode`` for all tasks at once): the field embeddings ``[B, F, d]``, the interests of
  every task and type ``[B, T, S, d]``, and the shared experts' per-field pre-activations. The experts read the
  task-specific ``x_t``: a single-layer expert is ``ReLU(BN_t(sum_f a_t[f] W_f z_t[f] + b))``, so ``encode``
  computes ``W_f z[f]`` for every field (and every task's interests) and ``decode`` only weights them by the
  task's SENet output and applies the task's BatchNorm and the ReLU. That keeps the shared experts shared, honestly, at the cost of ``F + T S``
  projections per expert. A second PLE level would feed the shared gate's mixture of task experts into shared
  experts (task parameters inside shared computation), hence one level.

Datasets without behaviour sequences get one clear line (``-A tim=false`` runs the TRM-only ablation). History
tensors follow the dataset contract: ``batch[name]`` int64 ``[B, L]`` of ``of_field`` ids shifted by +1 (0 =
padding) and ``batch[name + "_len"]``; sequences of several types may have different ``max_len``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mtlbench import ExpertBank, MtlbenchError, MultiTaskArch, option_field, register_arch
from mtlbench.arch import FeatureLayout, tower
from mtlbench.layers import ExpertBatchNorm

SEQUENCE_DATASETS = ("ecommerce",)  # built-in datasets whose schema lists behaviour sequences (for the error)
NEG = -1e9  # additive mask for invalid positions (finite, so an empty history cannot produce NaN)


class ConditionalEncoder(nn.Module):
    """Transformer layers whose LayerNorm affine terms are given per (task, type) at call time.

    ``pre_ln`` (default): ``h = h + MHA(CondLN_1(h))``, ``h = h + FFN(CondLN_2(h))``, no final LN, with the
    residual branches' output layers initialised at zero, so the encoder starts as the identity and its output
    stays on the scale of the embeddings it adds to. ``pre_ln = False``: the original post-LN layer
    ``h = CondLN_1(h + MHA(h))``, ``h = CondLN_2(h + FFN(h))`` (unit-scale output).
    """

    def __init__(self, dim: int, n_layers: int, n_heads: int, ffn_factor: int, pre_ln: bool = True) -> None:
        super().__init__()
        self.dim, self.n_heads, self.pre_ln = dim, n_heads, pre_ln
        self.qkv = nn.ModuleList([nn.Linear(dim, 3 * dim) for _ in range(n_layers)])
        self.out = nn.ModuleList([nn.Linear(dim, dim) for _ in range(n_layers)])
        self.ffn = nn.ModuleList([nn.Sequential(nn.Linear(dim, ffn_factor * dim), nn.ReLU(),
                                                nn.Linear(ffn_factor * dim, dim)) for _ in range(n_layers)])
        if pre_ln:
            with torch.no_grad():
                for lin in [*self.out, *(f[-1] for f in self.ffn)]:
                    lin.weight.zero_()
                    lin.bias.zero_()

    def attention(self, layer: int, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention of ``x [..., L, d]``; ``key_bias [..., L]`` is 0 (valid) or NEG."""
        *lead, L, d = x.shape
        h = self.n_heads
        q, k, v = self.qkv[layer](x).reshape(*lead, L, 3, h, d // h).unbind(-3)  # each [..., L, h, dh]
        q, k, v = (t.transpose(-2, -3).reshape(-1, L, d // h) for t in (q, k, v))  # [N h, L, dh]
        # scale q (L x dh values) rather than the scores (L x L), and add the key mask inside the batched matmul:
        # on CPU this halves the attention's time against div + add on the scores (L = 20, dh = 8)
        bias = key_bias.unsqueeze(-2).unsqueeze(-2).expand(*lead, h, 1, L).reshape(-1, 1, L)
        scores = torch.baddbmm(bias, q * (1.0 / math.sqrt(d // h)), k.transpose(-1, -2))  # [N h, L, L]
        att = torch.bmm(torch.softmax(scores, dim=-1), v).reshape(*lead, h, L, d // h)
        return self.out[layer](att.transpose(-2, -3).reshape(*lead, L, d))

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                n_tasks: int) -> torch.Tensor:
        """``x [S, B, L, d]`` (task-independent tokens), ``key_bias [S, B, L]``, ``gamma/beta [T, S, 2 n_layers,
        d]`` -> ``[T, S, B, L, d]``. Work that sees no task yet (the first LN, or the first attention with
        post-LN) runs once per type, not per task."""
        S, B, L, d = x.shape
        g = gamma[:, :, :, None, None, :]  # [T, S, 2n, 1, 1, d]
        b = beta[:, :, :, None, None, :]

        def cond_ln(h: torch.Tensor, i: int) -> torch.Tensor:  # broadcasts [S,B,L,d] to [T,S,B,L,d] if needed
            return (1.0 + g[:, :, i]) * F.layer_norm(h, (d,)) + b[:, :, i]

        h = x
        for layer in range(len(self.qkv)):
            if self.pre_ln:
                a = cond_ln(h, 2 * layer)  # [T, S, B, L, d]
                h = h + self.attention(layer, a, key_bias.expand(n_tasks, S, B, L))
                h = h + self.ffn[layer](cond_ln(h, 2 * layer + 1))
            else:
                bias = key_bias if h.dim() == 4 else key_bias.expand(n_tasks, S, B, L)
                h = cond_ln(h + self.attention(layer, h, bias), 2 * layer)
                h = cond_ln(h + self.ffn[layer](h), 2 * layer + 1)
        return h


class SENet(nn.Module):
    """One importance weight per field: ``2 sigmoid(W2 ReLU(W1 mean_d(z)))``, ``z [B, n_fields, d]``."""

    def __init__(self, n_fields: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, math.ceil(n_fields / reduction))
        self.net = nn.Sequential(nn.Linear(n_fields, hidden), nn.ReLU(), nn.Linear(hidden, n_fields))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sigmoid(self.net(z.mean(-1)))


class FieldwiseExperts(nn.Module):
    """Shared single-layer experts whose input is a re-weighted field stack: the per-field products ``W_f z[f]``
    are computed here (shared); a task later weights and sums them (see the module docstring)."""

    def __init__(self, n: int, n_fields: int, dim: int, units: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(n_fields * dim)  # nn.Linear's init for an input of n_fields * dim
        self.weight = nn.Parameter(torch.empty(n, n_fields, dim, units).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, units).uniform_(-bound, bound))


@register_arch("dtrn")
class DTRN(MultiTaskArch):
    """DTRN (Liu et al., CIKM 2023): per-task interests via a hypernetwork-conditioned Transformer, per-task SENet."""

    @classmethod
    def required_features(cls, options) -> tuple[str, ...]:
        """Behaviour sequences, unless the interest module is switched off (checked when the spec is built)."""
        return ("sequences",) if options is None or options.tim else ()

    @dataclass
    class Options:
        upper: Literal["mmoe", "ple"] = "mmoe"
        shared_experts: int = option_field(4, "number of shared experts", minimum=1)
        task_experts: int = option_field(1, "experts per task", minimum=0)
        expert_units: int = option_field(64, "expert width", minimum=1)
        tower_units: tuple[int, ...] = option_field((64,), "tower hidden widths", minimum=1)
        dropout: float = option_field(0.0, "dropout rate", minimum=0, maximum=1, open_maximum=True)
        batch_norm: bool = True
        n_layers: int = 1
        pre_ln: bool = True
        n_heads: int = 2
        ffn_factor: int = 2
        hyper_dim: int = 16
        hyper_units: int = 32
        se_reduction: int = 3
        tim: bool = True
        trm: bool = True

        def __post_init__(self) -> None:
            if self.upper not in ("mmoe", "ple"):
                raise ValueError(f"upper must be one of mmoe, ple; got {self.upper!r}")
            for name in ("shared_experts", "expert_units", "n_layers", "n_heads", "ffn_factor", "hyper_dim",
                         "hyper_units", "se_reduction"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
            if self.task_experts < (1 if self.upper == "ple" else 0):
                raise ValueError(f"task_experts must be at least 1 with upper 'ple', got {self.task_experts}")
            if not 0.0 <= self.dropout < 1.0:
                raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def __init__(self, schema, tasks, embed_dim, options=None):
        super().__init__(schema, tasks, embed_dim, options)
        o = self.o = options or self.Options()
        d, T = embed_dim, len(self.tasks)
        self.shared["input"] = inp = self.input_layer()
        n_fields = inp.n_fields
        self.sequences = tuple(schema.sequences) if o.tim else ()
        if o.tim:
            self._check_sequences(schema, d, o)
            names = [f.name for f in schema.categorical]
            self.register_buffer("seq_field", torch.tensor([names.index(s.of_field) for s in self.sequences]),
                                 persistent=False)
            S, L = len(self.sequences), max(s.max_len for s in self.sequences)
            self.shared["position"] = nn.Embedding(L, d)
            nn.init.normal_(self.shared["position"].weight, std=1e-2)
            self.shared["type_embedding"] = nn.Embedding(S, o.hyper_dim)
            self.shared["task_embedding"] = nn.Embedding(T, o.hyper_dim)
            self.shared["hypernetwork"] = nn.Sequential(nn.Linear(2 * o.hyper_dim, o.hyper_units), nn.ReLU(),
                                                        nn.Linear(o.hyper_units, 4 * d * o.n_layers))
            with torch.no_grad():  # generated LN terms start near the identity (gamma ~ 1, beta ~ 0)
                self.shared["hypernetwork"][-1].weight.mul_(0.1)
                self.shared["hypernetwork"][-1].bias.zero_()
            self.shared["encoder"] = ConditionalEncoder(d, o.n_layers, o.n_heads, o.ffn_factor, o.pre_ln)
            self.shared["query"] = nn.Linear(d, d)
        S = len(self.sequences)
        n_slots = n_fields + S  # fields the SENet weights and the experts read: inputs, then one interest per type
        self.shared["experts"] = FieldwiseExperts(o.shared_experts, n_slots, d, o.expert_units)
        n_gate = o.shared_experts + (o.task_experts if o.upper == "ple" else 0)
        for t in self.tasks:
            h = self.heads[t.name]
            if o.trm:
                h["senet"] = SENet(n_slots, o.se_reduction)
            if o.batch_norm:  # this task's BatchNorm of the shared experts' pre-activations (task-specific)
                h["expert_norm"] = ExpertBatchNorm(o.shared_experts, o.expert_units)
            if o.upper == "ple":
                h["experts"] = ExpertBank(o.task_experts, n_slots * d, (o.expert_units,), batch_norm=o.batch_norm)
            h["gate"] = nn.Linear(n_slots * d, n_gate)
            h["tower"] = tower(o.expert_units, o.tower_units, t, o.dropout, o.batch_norm)

    # -- checks ----------------------------------------------------------------------------------------------
    @staticmethod
    def _check_sequences(schema, d: int, o) -> None:
        if not schema.sequences:
            raise MtlbenchError("arch 'dtrn' needs behaviour sequences; this dataset has none (its feature schema "
                                "lists no sequences; datasets with sequences: " + ", ".join(SEQUENCE_DATASETS)
                                + "; -A tim=false runs the TRM-only ablation without them)")
        names = [f.name for f in schema.categorical]
        for s in schema.sequences:
            if s.of_field not in names:
                raise MtlbenchError(f"arch 'dtrn': sequence '{s.name}' holds ids of '{s.of_field}', which is not a "
                                    f"categorical field (fields: {', '.join(names) or 'none'})")
            if s.max_len < 1:
                raise MtlbenchError(f"arch 'dtrn': sequence '{s.name}' has max_len {s.max_len}; it must be >= 1")
        if d % o.n_heads:
            raise MtlbenchError(f"arch 'dtrn': the embedding width {d} is not divisible by n_heads {o.n_heads} "
                                f"(choose n_heads among the divisors of {d}, or another --embed-dim)")

    def describe(self) -> dict[str, Any]:
        return {"upper": self.o.upper, "behaviour_types": [s.name for s in self.sequences],
                "tim": self.o.tim, "trm": self.o.trm,
                "task_embedding": "shared (input of the shared hypernetwork; row t gets task t's gradient only)"}

    # -- encode: everything that touches shared parameters ------------------------------------------------------
    def _histories(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """History ids ``[S, B, L]`` (0 = padding, padded to the longest type) and lengths ``[S, B]``."""
        L = self.shared["position"].num_embeddings
        ids, lens = [], []
        for s in self.sequences:
            if s.name not in batch or s.name + "_len" not in batch:
                raise MtlbenchError(f"arch 'dtrn': the batch lacks the sequence tensors '{s.name}' / "
                                    f"'{s.name}_len' that the schema declares")
            x = batch[s.name]
            ids.append(F.pad(x, (0, L - x.shape[1])) if x.shape[1] < L else x)
            lens.append(batch[s.name + "_len"])
        return torch.stack(ids), torch.stack(lens).clamp(max=L)

    def _interests(self, fields: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``u [B, T, S, d]``: every task's interest in every behaviour type."""
        inp = self.shared["input"]
        ids, lens = self._histories(batch)  # [S, B, L], [S, B]
        S, B, L = ids.shape
        valid = torch.arange(L, device=ids.device) < lens.unsqueeze(-1)  # [S, B, L]
        rows = (ids - 1).clamp(min=0) + inp.offsets[self.seq_field].view(S, 1, 1)
        tokens = inp.embedding(rows) * valid.unsqueeze(-1).to(fields.dtype)
        tokens = tokens + self.shared["position"].weight[:L]
        key_bias = (~valid).to(fields.dtype) * NEG
        T = len(self.tasks)
        cond = torch.cat([self.shared["task_embedding"].weight.unsqueeze(1).expand(T, S, -1),
                          self.shared["type_embedding"].weight.unsqueeze(0).expand(T, S, -1)], dim=-1)
        gb = self.shared["hypernetwork"](cond).view(T, S, 2 * self.o.n_layers, 2, self.embed_dim)
        h = self.shared["encoder"](tokens, key_bias, gb[..., 0, :], gb[..., 1, :], T)  # [T, S, B, L, d]
        query = self.shared["query"](fields[:, self.seq_field].transpose(0, 1))  # candidate per type [S, B, d]
        # batched matrix-vector products (einsum would route these through many tiny bmm calls on CPU)
        scores = (h @ query.unsqueeze(-1)).squeeze(-1) / math.sqrt(self.embed_dim) + key_bias  # [T, S, B, L]
        att = torch.softmax(scores, dim=-1) * (lens > 0).to(h.dtype).unsqueeze(-1)  # empty history -> 0
        return (att.unsqueeze(-2) @ h).squeeze(-2).permute(2, 0, 1, 3)  # [B, T, S, d]

    def feature_layouts(self):
        # fields [B, F, d], expert projections [n, B, F + 1, u]; with sequences also interests [B, T, S, d] and
        # their projections [n, B, T, S, u]
        fields = FeatureLayout(batch_axis=0, channel_axis=-1, position_axes=(1,))
        proj = FeatureLayout(batch_axis=1, channel_axis=-1, position_axes=(0, 2))
        if not self.sequences:
            return (fields, proj)
        return (fields, proj, FeatureLayout(batch_axis=0, channel_axis=-1, position_axes=(1, 2)),
                FeatureLayout(batch_axis=1, channel_axis=-1, position_axes=(0, 2, 3)))

    def encode(self, batch):
        fields = self.shared["input"].fields(batch)  # [B, F, d]
        ex = self.shared["experts"]
        Fn = fields.shape[1]
        proj = torch.einsum("bfd,nfdu->nbfu", fields, ex.weight[:, :Fn])  # [n, B, F, u]
        bias = ex.bias.unsqueeze(1).unsqueeze(1).expand(-1, fields.shape[0], 1, -1)  # a constant "field"
        proj = torch.cat([proj, bias], dim=2)  # [n, B, F + 1, u]
        if not self.sequences:
            return fields, proj
        u = self._interests(fields, batch)  # [B, T, S, d]
        proj_u = torch.einsum("btsd,nsdu->nbtsu", u, ex.weight[:, Fn:])  # [n, B, T, S, u]
        return fields, proj, u, proj_u

    # -- decode: task-specific parameters on the features --------------------------------------------------------
    def decode(self, features, batch):
        fields, proj = features[0], features[1]
        u, proj_u = (features[2], features[3]) if self.sequences else (None, None)
        B, Fn = fields.shape[0], fields.shape[1]
        ones = fields.new_ones(B, 1)
        out = []
        for i, t in enumerate(self.task_names):
            h = self.heads[t]
            z = fields if u is None else torch.cat([fields, u[:, i]], dim=1)  # [B, F + S, d]
            a = h["senet"](z) if "senet" in h else z.new_ones(z.shape[:2])  # [B, F + S]
            x = (z * a.unsqueeze(-1)).flatten(1)
            pre = (torch.cat([a[:, :Fn], ones], dim=1).unsqueeze(1) @ proj).squeeze(2)  # sum_f a_f W_f z_f + b
            if proj_u is not None:
                pre = pre + (a[:, Fn:].unsqueeze(1) @ proj_u[:, :, i]).squeeze(2)
            if "expert_norm" in h:
                pre = h["expert_norm"](pre)
            experts = torch.relu(pre)  # the shared experts applied to this task's x_t
            if "experts" in h:
                experts = torch.cat([h["experts"](x), experts], dim=0)
            g = torch.softmax(h["gate"](x), dim=-1)
            out.append(h["tower"]((g.unsqueeze(1) @ experts.transpose(0, 1)).squeeze(1)))  # gate mixture [B, u]
        return out
