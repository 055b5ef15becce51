"""Aligned-MTL: Senushkin, Patakin, Kuznetsov, Konushin, "Independent Component Alignment for Multi-Task
Learning", CVPR 2023 (arXiv 2305.19000).

Algorithm (the paper's Algorithm 1, on the shared parameters): the task gradients ``J`` (``[T, P]``) are replaced
by aligned gradients ``J_hat = B J`` whose Gram matrix is ``lambda_s * I`` -- orthogonal, equal norms, i.e. a
linear system with condition number 1 -- and the update is ``J_hat^T w = J^T (B w)`` for task preferences ``w``
(all ones). ``B`` comes from the eigendecomposition of the Gramian ``G = J J^T = V diag(lambda) V^T``:
``B = sqrt(lambda_s) V diag(lambda)^(-1/2) V^T``, so ``B G B = lambda_s V V^T``. The task weights logged are
``B w``.

Defaults and choices (official code SamsungLabs/MTL ``optim/aligned``; LibMTL ``Aligned_MTL``):

- ``scale_mode = "min"`` (official default): ``lambda_s`` is the smallest kept eigenvalue, so each aligned gradient
  has the norm of the smallest singular value of J. ``"median"`` uses ``torch.median`` of the kept eigenvalues
  (the lower middle one for an even count, as the official code) and ``"rmse"`` their mean (the root mean square
  of the singular values).
- Rank deficiency: eigenvalues ``<= rank_rtol * lambda_max`` are dropped (their directions get weight 0). The
  default ``rank_rtol = None`` is the official rule ``T * eps(dtype of J) * lambda_max`` (float32 Jacobians:
  ``T * 1.19e-7``); the eigendecomposition itself is done in float64. If every eigenvalue is dropped (all
  gradients zero), ``B = I`` as in torchjd.
- Preference ``w = 1`` (the official code and LibMTL sum the aligned gradients; torchjd's default ``1/T``
  gives the same direction, T times shorter).
- Task heads follow their own loss (weight 1) by default, as the official ``scale_decoder_grad=False``;
  ``scale_heads=True`` multiplies head ``t``'s gradient by weight ``t`` (the official ``scale_decoder_grad``).
- The paper's "UB" variant (alignment on the shared representation instead of the shared parameters) is not
  implemented here; this is the parameter-space method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mtlbench import JacobianMethod, register_optimizer

ScaleMode = Literal["min", "median", "rmse"]


def balance_transformation(gramian: torch.Tensor, scale_mode: str = "min", rank_rtol: float | None = None,
                           eps_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The T x T matrix ``B`` that aligns the task gradients: ``(B J)(B J)^T = lambda_s * (projector)``."""
    G = gramian.detach().to("cpu", torch.float64)
    G = 0.5 * (G + G.T)
    T = G.shape[0]
    lam, V = torch.linalg.eigh(G)
    lam_max = lam.max()
    if rank_rtol is None:
        rank_rtol = T * torch.finfo(eps_dtype or gramian.dtype).eps
    keep = lam > rank_rtol * lam_max
    if not bool(keep.any()) or float(lam_max) <= 0.0:
        return torch.eye(T, dtype=torch.float64)
    lam, V = lam[keep], V[:, keep]
    if scale_mode == "min":
        scale = lam.min()
    elif scale_mode == "median":
        scale = torch.median(lam)
    elif scale_mode == "rmse":
        scale = lam.mean()
    else:
        raise ValueError(f"unknown scale_mode {scale_mode!r} (valid: min, median, rmse)")
    return (V * (scale / lam).sqrt()) @ V.T


def aligned_mtl_weights(gramian: torch.Tensor, scale_mode: str = "min", rank_rtol: float | None = None,
                        pref: torch.Tensor | None = None, eps_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Weights ``w = B pref`` (``pref`` = ones) such that the Aligned-MTL update is ``J^T w``."""
    B = balance_transformation(gramian, scale_mode, rank_rtol, eps_dtype)
    p = torch.ones(B.shape[0], dtype=torch.float64) if pref is None else pref.to(torch.float64)
    return B @ p


@register_optimizer("aligned_mtl")
class AlignedMTL(JacobianMethod):
    """Aligned-MTL (Senushkin et al., CVPR 2023): align task gradients to an orthogonal, equal-norm system."""

    @dataclass
    class Options:
        scale_mode: ScaleMode = "min"
        rank_rtol: float | None = None
        scale_heads: bool = False

        def __post_init__(self) -> None:
            if self.scale_mode not in ("min", "median", "rmse"):
                raise ValueError(f"scale_mode must be min, median or rmse, got {self.scale_mode!r}")
            if self.rank_rtol is not None and not 0.0 <= self.rank_rtol < 1.0:
                raise ValueError(f"rank_rtol must be in [0, 1), got {self.rank_rtol}")

    def __init__(self, task_names, options=None) -> None:
        super().__init__(task_names, options if options is not None else self.Options())

    def aggregate(self, J, losses, generator):
        Jd = J.detach().double()
        w = aligned_mtl_weights(Jd @ Jd.T, self.options.scale_mode, self.options.rank_rtol, eps_dtype=J.dtype)
        w = w.to(J.dtype).to(J.device)
        return w @ J, w

    def head_weights(self, weights):
        return weights if self.options.scale_heads else None
