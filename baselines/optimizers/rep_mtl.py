"""Rep-MTL: "Rep-MTL: Unleashing the Power of Representation-level Task Saliency for Multi-Task Learning",
Zedong Wang, Siyuan Li, Dan Xu, ICCV 2025 (Highlight), arXiv 2507.21049. No official code has been released (the
repository Jacky1128/Rep-MTL holds a README only), so this follows the paper's equations.

Task saliency (Eq. 3): ``S_t = d L_t / d Z``, the gradient of each task loss w.r.t. the shared representation Z.
Two regularisers of the saliencies are added to the equal-weighting loss and the sum is backpropagated once,
through the saliencies (double backward: ``create_graph=True``), Eq. 10:
``L = sum_t L_t + lambda_tsr L_tsr + lambda_csa L_csa``.

- TSR, task-specific saliency regulation (Eqs. 4-6): the channel mean of each task's saliency at every position
  ``i`` (sample x spatial location), ``P_{i,t} = |S^_{i,t}| / sum_k |S^_{i,k}|`` and
  ``L_tsr = mean_i ( -sum_t P_{i,t} log P_{i,t} )``: minimising it favours task-specific (low-entropy) saliency.
- CSA, sample-wise cross-task saliency alignment (Eqs. 7-9): per sample b and task t the channel affinity
  ``M_t[b] = S_t[b] S_t[b]^T`` (C x C over positions); the anchor ``A_b`` (C x T: each task's saliency averaged
  over positions) and ``A^_b = A_b A_b^T``; L2-normalised, ``(A^_b, M_t[b])`` are positive pairs and
  ``(A^_b, A^_k)``, k != b, negative ones: ``L_csa = mean_b -log[exp(sim(A^_b, M_t[b]) / tau) /
  sum_{k != b} exp(sim(A^_b, A^_k) / tau)]`` with cosine similarity.

Defaults: ``lambda_tsr = lambda_csa = 0.9``: the paper grid-searches both per dataset over {0.7, ..., 1.5} and
does not list the chosen values; 0.9 is the value it holds one of them at in its sensitivity study (Fig. 7,
App. D.1), inside the range it reports as stable. ``tau = 0.1``: not stated in the paper; our choice, a common
InfoNCE temperature. ``log_losses = False``: Eq. 10 sums the raw losses; the paper's experiments (App. A) also
apply the logarithmic loss transform of IMTL-L / DB-MTL, available as ``log_losses = True`` (then the saliencies
are those of ``log L_t`` too). Switches ``tsr`` / ``csa`` turn either regulariser off (the paper's Table 4
ablation); with both off, or both lambdas 0, the step is exactly equal weighting (one backward of the sum).

Assumptions where the paper (written for B x C x H' x W' CNN maps) leaves room:
- Layout. mtlbench archs expose the shared representation as a tuple of tensors (``ctx.features``) such as
  ``[B, D]`` (Shared-Bottom) or ``[n_experts, B, D]`` (MMoE's experts). The arch declares each tensor's batch and
  channel axes (``MultiTaskArch.feature_layouts()``: every image arch and every tabular arch that returns expert
  stacks); a tensor an arch does not declare has its batch on axis 0 and channels on ``channel_axis`` (default the
  last). Until 2026-12 an undeclared batch axis was guessed as the first axis of the batch's size, which with a
  batch of 8 rows and 8 experts regularised across experts. Every other axis is a position (the paper's
  H' x W'): a ``[B, D]`` vector has one position, MMoE's experts are 8 positions of D channels.
- Several feature tensors: both regularisers are computed per tensor and averaged over the tensors (equal
  weight each); ``feature_indices`` selects tensors (empty: all).
- Eq. 9's positive term has a free task index t: it is averaged over the T tasks (B x T positive pairs, as in
  Fig. 2). Its denominator holds the negatives only, as written in Eq. 9; ``csa_positive_in_denominator = True``
  gives the usual InfoNCE form instead.
- Saliencies are rescaled by a detached constant (their RMS) before the regularisers: both are invariant to
  that scale, so only the floating-point range changes (losses are batch means, so raw saliencies are ~1/B).
  Positions where every task's saliency is exactly zero count as zero entropy (no gradient).
- Saliency is the partial derivative along the heads (mtlbench's features enter the heads through identity
  nodes), i.e. how each task's loss responds to the representation the heads read.
- Task weights logged: ones (Rep-MTL keeps equal weighting); the last regulariser values are kept in
  ``last_regularisers``. The method is stateless.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from mtlbench import MTLOptimizer, MtlbenchError, StepContext, option_field, register_optimizer

EPS = 1e-12  # floors for normalisers, applied after the RMS rescaling (saliencies of order one)


# ------------------------------------------------------------------------------------------- pure functions

def canonical_saliency(grad: torch.Tensor, batch_size: int, channel_axis: int = -1,
                       batch_axis: int | None = None) -> torch.Tensor:
    """``grad`` (any layout holding a batch axis) -> ``[B, positions, channels]``.

    The batch axis is ``batch_axis`` when the arch declares it (``MultiTaskArch.feature_layouts``), else the first
    axis of size ``batch_size``; ``channel_axis`` the channels; the rest positions."""
    if grad.dim() == 0:
        raise ValueError("a shared feature must have a batch axis, got a scalar")
    if batch_axis is not None:
        x = grad.movedim((batch_axis % grad.dim(), channel_axis % grad.dim()), (0, grad.dim() - 1))
        return x.reshape(x.shape[0], -1, x.shape[-1])
    ch = channel_axis % grad.dim()
    batch_axes = [a for a in range(grad.dim()) if grad.shape[a] == batch_size and a != ch]
    if not batch_axes:
        if grad.dim() == 1 and grad.shape[0] == batch_size:  # [B]: one position, one channel
            return grad.reshape(batch_size, 1, 1)
        raise ValueError(f"no axis of size {batch_size} (the batch) in a feature of shape {tuple(grad.shape)} "
                         f"besides channel axis {channel_axis}")
    b = batch_axes[0]
    x = grad.movedim((b, ch), (0, grad.dim() - 1))
    return x.reshape(batch_size, -1, x.shape[-1])


def _rescale(X: torch.Tensor) -> torch.Tensor:
    rms = X.detach().pow(2).mean().sqrt()
    return X / rms.clamp_min(torch.finfo(X.dtype).tiny ** 0.5)


def saliency_entropy(X: torch.Tensor) -> torch.Tensor:
    """TSR (Eqs. 4-6) for saliencies ``X`` of shape ``[T, B, P, C]``: the mean over the B*P positions of the
    entropy of ``P_t = |mean_c X_t| / sum_k |mean_c X_k|``. In ``[0, log T]``; maximal for equal magnitudes."""
    X = _rescale(X)
    s = X.mean(-1).abs()  # [T, B, P]
    p = s / s.sum(0, keepdim=True).clamp_min(EPS)
    return -(p * torch.log(p.clamp_min(EPS))).sum(0).mean()


def saliency_alignment(X: torch.Tensor, tau: float = 0.1, positive_in_denominator: bool = False) -> torch.Tensor:
    """CSA (Eqs. 7-9) for saliencies ``X`` of shape ``[T, B, P, C]`` (needs B >= 2).

    Affinities ``M_t[b] = X_t[b]^T X_t[b]`` (C x C), anchors ``A^_b = A_b A_b^T`` with ``A_b[:, t]`` the position
    mean of ``X_t[b]``; cosine similarities of the flattened C x C matrices are computed from small Gram matrices
    (``<U U^T, V V^T>_F = |U^T V|_F^2``), never forming C x C maps."""
    T, B = X.shape[0], X.shape[1]
    if B < 2:
        raise ValueError("the cross-task alignment needs at least two samples (negatives are other samples)")
    X = _rescale(X)
    A = X.mean(2).transpose(0, 1)  # [B, T, C]: column t of the anchor of sample b
    aa = torch.einsum("btc,kuc->bktu", A, A).pow(2).sum((-1, -2))  # [B, B] <A^_b, A^_k>
    am = torch.einsum("buc,tbpc->btup", A, X).pow(2).sum((-1, -2))  # [B, T] <A^_b, M_t[b]>
    if X.shape[2] <= X.shape[3]:  # |X^T X|_F = |X X^T|_F: take the smaller Gram (image maps: P = H W >> C)
        mm = torch.einsum("tbpc,tbqc->tbpq", X, X).pow(2).sum((-1, -2))  # [T, B] |M_t[b]|^2
    else:
        mm = torch.einsum("tbpc,tbpd->tbcd", X, X).pow(2).sum((-1, -2))
    norm_a = aa.diagonal().clamp_min(EPS).sqrt()  # [B]
    norm_m = mm.clamp_min(EPS).sqrt().T  # [B, T]
    pos = am / (norm_a[:, None] * norm_m)  # [B, T]
    neg = aa / (norm_a[:, None] * norm_a[None, :])  # [B, B]
    off = ~torch.eye(B, dtype=torch.bool, device=X.device)
    neg_logits = (neg / tau).masked_fill(~off, float("-inf"))  # [B, B], the diagonal excluded
    if positive_in_denominator:
        logits = torch.cat([(pos / tau)[:, :, None], neg_logits[:, None, :].expand(B, T, B)], dim=-1)
        denom = torch.logsumexp(logits, dim=-1)  # [B, T]
    else:
        denom = torch.logsumexp(neg_logits, dim=-1)[:, None]  # [B, 1]
    return (denom - pos / tau).mean()


def task_saliencies(losses: Sequence[torch.Tensor], features: Sequence[torch.Tensor],
                    create_graph: bool = True) -> list[tuple[torch.Tensor, ...]]:
    """Per task, ``d loss_t / d features`` (zeros where a loss does not reach a feature), differentiable."""
    out = []
    for loss in losses:
        grads = torch.autograd.grad(loss, tuple(features), retain_graph=True, create_graph=create_graph,
                                    allow_unused=True)
        out.append(tuple(torch.zeros_like(f) if g is None else g for f, g in zip(features, grads)))
    return out


def rep_mtl_regularisers(losses: Sequence[torch.Tensor], features: Sequence[torch.Tensor], batch_size: int,
                         tsr: bool = True, csa: bool = True, tau: float = 0.1, channel_axis: int = -1,
                         positive_in_denominator: bool = False, create_graph: bool = True,
                         layouts: Sequence[Any] | None = None) -> dict[str, torch.Tensor]:
    """``{"tsr": L_tsr, "csa": L_csa}`` (those switched on), each averaged over the feature tensors.
    ``layouts``: the arch's declared :class:`~mtlbench.arch.FeatureLayout` per tensor (batch and channel axes),
    which take precedence over ``channel_axis``; a tensor without one has its batch on axis 0."""
    sal = task_saliencies(losses, features, create_graph)
    # an undeclared tensor has its batch first (the arch contract's default for tabular vectors), never guessed
    axes = [(channel_axis, 0) if layouts is None or layouts[i] is None else
            (layouts[i].channel_axis, layouts[i].batch_axis) for i in range(len(features))]
    per_feature = [torch.stack([canonical_saliency(s[i], batch_size, *axes[i]) for s in sal])
                   for i in range(len(features))]  # each [T, B, P, C]
    out: dict[str, torch.Tensor] = {}
    if tsr:
        out["tsr"] = torch.stack([saliency_entropy(X) for X in per_feature]).mean()
    if csa:
        out["csa"] = torch.stack([saliency_alignment(X, tau, positive_in_denominator) for X in per_feature]).mean()
    return out


# ------------------------------------------------------------------------------------------------ the method

@register_optimizer("rep_mtl")
class RepMTL(MTLOptimizer):
    """Rep-MTL (Wang et al., ICCV 2025): EW plus entropy and cross-task alignment penalties on task saliency."""

    requires = frozenset({"features"})

    @dataclass
    class Options:
        lambda_tsr: float = option_field(0.9, "weight of the saliency-entropy penalty (TSR, Eq. 6)")
        lambda_csa: float = option_field(0.9, "weight of the cross-task saliency alignment (CSA, Eq. 9)")
        tau: float = option_field(0.1, "CSA temperature (not given in the paper; our choice)")
        tsr: bool = option_field(True, "use the entropy penalty (ablation switch)")
        csa: bool = option_field(True, "use the cross-task alignment (ablation switch)")
        csa_positive_in_denominator: bool = option_field(
            False, "standard InfoNCE denominator (positive + negatives) instead of Eq. 9's negatives only")
        log_losses: bool = option_field(False, "log-transform the task losses (the paper's App. A setting)")
        channel_axis: int = option_field(-1, "channel axis of each feature tensor (1 for [B, C, H, W] maps)")
        feature_indices: tuple[int, ...] = option_field((), "shared feature tensors to regularise (empty: all)")

        def __post_init__(self) -> None:
            for name in ("lambda_tsr", "lambda_csa"):
                if not getattr(self, name) >= 0:
                    raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
            if not self.tau > 0:
                raise ValueError(f"tau must be > 0, got {self.tau}")
            bad = [i for i in self.feature_indices if i < 0]
            if bad:
                raise ValueError(f"feature_indices must be >= 0, got {bad[0]}")

    def __init__(self, task_names: tuple[str, ...], options: Any = None) -> None:
        super().__init__(task_names, options if options is not None else self.Options())
        self.last_regularisers: dict[str, float] = {}

    def _features(self, ctx: StepContext) -> tuple[torch.Tensor, ...]:
        feats = tuple(ctx.features)
        if not feats:
            raise MtlbenchError("optimizer 'rep_mtl' needs a shared representation, but the architecture exposes "
                                "no shared features (use a multi-task arch, or optimizer 'ew')")
        idx = self.options.feature_indices
        if idx:
            if max(idx) >= len(feats):
                raise MtlbenchError(f"optimizer 'rep_mtl' option feature_indices names feature {max(idx)}, but "
                                    f"the architecture exposes {len(feats)} shared feature tensor(s)")
            feats = tuple(feats[i] for i in idx)
        return feats

    @staticmethod
    def _batch_size(ctx: StepContext) -> int:
        outputs = getattr(ctx.output, "outputs", None)
        if outputs:
            return int(outputs[0].shape[0])
        return int(next(iter(ctx.batch.values())).shape[0])

    def step(self, ctx: StepContext) -> None:
        o = self.options
        use_tsr = o.tsr and o.lambda_tsr > 0
        use_csa = o.csa and o.lambda_csa > 0
        T = ctx.n_tasks
        self.last_weights = torch.ones(T)
        if o.log_losses:
            task_losses = [torch.log(l.clamp_min(1e-12)) for l in ctx.losses]
        else:
            task_losses = list(ctx.losses)
        if not (use_tsr or use_csa):  # plain (log-)equal weighting, bit for bit
            if o.log_losses:
                ctx.plus_aux(torch.stack(task_losses).sum()).backward()  # + an arch's auxiliary loss
            else:
                ctx.backward()
            self.last_regularisers = {}
            return
        feats = self._features(ctx)
        B = self._batch_size(ctx)
        declared = getattr(ctx.model, "feature_layouts", None)
        layouts = declared() if callable(declared) else None
        if layouts is not None and self.options.feature_indices:
            layouts = [layouts[i] for i in self.options.feature_indices]
        csa = use_csa
        if use_csa and B < 2:
            self.warn_once("csa_batch", f"rep_mtl: step {ctx.step} has a batch of one sample, so the cross-task "
                                        f"alignment has no negatives; it is skipped for such batches")
            csa = False
        try:
            regs = rep_mtl_regularisers(task_losses, feats, B, use_tsr, csa, o.tau, o.channel_axis,
                                        o.csa_positive_in_denominator, layouts=layouts)
        except ValueError as exc:
            raise MtlbenchError(f"optimizer 'rep_mtl': {exc}") from exc
        total = torch.stack(task_losses).sum()
        if "tsr" in regs:
            total = total + o.lambda_tsr * regs["tsr"]
        if "csa" in regs:
            total = total + o.lambda_csa * regs["csa"]
        ctx.plus_aux(total).backward()  # + an arch's auxiliary loss (e.g. the slimmable arch's CIKD)
        self.last_regularisers = {k: float(v.detach()) for k, v in regs.items()}
