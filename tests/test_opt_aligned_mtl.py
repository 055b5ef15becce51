"""Aligned-MTL (baselines/optimizers/aligned_mtl.py): hand-built cases, alignment properties, torchjd, a run."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mtlbench.baselines.optimizers.aligned_mtl import AlignedMTL, aligned_mtl_weights, balance_transformation
from mtlbench.errors import MtlbenchError
from mtlbench.registry import get

from conftest import make_method, short_run

NAME = "aligned_mtl"
D = torch.float64


def _jac(seed: int, T: int, P: int) -> torch.Tensor:
    return torch.randn(T, P, generator=torch.Generator().manual_seed(seed), dtype=D)


# --------------------------------------------------------------------------------------------- hand-built cases

def test_orthogonal_gradients_by_hand():
    # g1 = (2, 0), g2 = (0, 1): G = diag(4, 1), V = I. "min": lambda_s = 1, B = diag(sqrt(1/4), sqrt(1/1)) =
    # diag(1/2, 1): the aligned gradients are (1, 0), (0, 1) (orthonormal), w = B 1 = (1/2, 1), update (1, 1).
    # "median" of [1, 4] is the lower middle value 1 (torch.median, as the official code): same as "min".
    # "rmse": lambda_s = mean(4, 1) = 5/2, B = diag(sqrt(5/8), sqrt(5/2)), update (sqrt(5/2), sqrt(5/2)).
    J = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=D)
    for mode in ("min", "median"):
        w = aligned_mtl_weights(J @ J.T, mode)
        torch.testing.assert_close(w, torch.tensor([0.5, 1.0], dtype=D))
        torch.testing.assert_close(w @ J, torch.tensor([1.0, 1.0], dtype=D))
    w = aligned_mtl_weights(J @ J.T, "rmse")
    torch.testing.assert_close(w, torch.tensor([math.sqrt(5 / 8), math.sqrt(5 / 2)], dtype=D))
    torch.testing.assert_close(w @ J, torch.full((2,), math.sqrt(5 / 2), dtype=D))


def test_dominating_gradient_is_cut_down_to_the_weakest():
    # Orthogonal g1 = (a, 0), g2 = (0, 1): with "min" the aligned gradients have norm min(a, 1), so growing the
    # already larger g1 (a = 2 -> 20) leaves the update (1, 1) unchanged: no task dominates.
    for a in (2.0, 20.0):
        J = torch.tensor([[a, 0.0], [0.0, 1.0]], dtype=D)
        torch.testing.assert_close(aligned_mtl_weights(J @ J.T) @ J, torch.tensor([1.0, 1.0], dtype=D))


def test_identical_gradients_rank_one():
    # g1 = g2 = (1, 0): G = [[1, 1], [1, 1]], eigenvalues 2 and 0; the zero one is dropped (rank 1).
    # Kept: lambda = 2, v = (1, 1)/sqrt(2); B = sqrt(2) v v^T / sqrt(2) = v v^T = [[1/2, 1/2], [1/2, 1/2]],
    # w = B 1 = (1, 1): the update is g1 + g2 = (2, 0).
    J = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=D)
    torch.testing.assert_close(balance_transformation(J @ J.T), torch.full((2, 2), 0.5, dtype=D))
    w = aligned_mtl_weights(J @ J.T)
    torch.testing.assert_close(w, torch.ones(2, dtype=D))
    torch.testing.assert_close(w @ J, torch.tensor([2.0, 0.0], dtype=D))


def test_opposite_gradients_cancel():
    # g1 = (1, 0), g2 = (-1, 0): eigenvalues 2 and 0, kept v = (1, -1)/sqrt(2), B = v v^T, w = B 1 = 0.
    J = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=D)
    w = aligned_mtl_weights(J @ J.T)
    torch.testing.assert_close(w, torch.zeros(2, dtype=D))


def test_zero_gradients_give_identity():
    assert aligned_mtl_weights(torch.zeros(3, 3, dtype=D)).tolist() == [1.0, 1.0, 1.0]


def test_float32_rank_tolerance_drops_round_off_directions():
    # g2 differs from g1 by 1e-5 in one coordinate: the second eigenvalue (~5e-11 of the first) is below the
    # official tolerance T * eps(float32) ~ 2.4e-7, so for a float32 Jacobian the system is treated as rank 1:
    # w = (1, 1) as for identical gradients. Keeping it (float64 tolerance) would scale everything by
    # sqrt(lambda_min) ~ 7e-6 -- the round-off direction would decide the update.
    J = torch.tensor([[1.0, 0.0], [1.0, 1e-5]], dtype=torch.float32)
    m = AlignedMTL(("a", "b"))
    _, w = m.aggregate(J, torch.ones(2), torch.Generator())
    torch.testing.assert_close(w, torch.ones(2), rtol=0, atol=1e-5)
    w64 = aligned_mtl_weights(J.double() @ J.double().T, eps_dtype=torch.float64)
    assert float(w64.abs().max()) < 1e-4


# ---------------------------------------------------------------------------------------------- properties

@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 6), st.integers(0, 6), st.sampled_from(["min", "median", "rmse"]))
def test_aligned_gradients_are_orthogonal_with_equal_norms(seed, T, extra, mode):
    # Full row rank (P >= T): (B J)(B J)^T = lambda_s I -- condition number 1.
    J = _jac(seed, T, T + extra)
    G = J @ J.T
    B = balance_transformation(G, mode)
    A = B @ J
    gram = A @ A.T
    lam = torch.linalg.eigvalsh(G)
    scale = {"min": lam.min(), "median": torch.median(lam), "rmse": lam.mean()}[mode]
    torch.testing.assert_close(gram, scale * torch.eye(T, dtype=D), rtol=0, atol=1e-8 * float(lam.max()))
    torch.testing.assert_close(aligned_mtl_weights(G, mode) @ J, A.sum(0))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(3, 6), st.integers(1, 2))
def test_rank_deficient_aligned_system_is_a_scaled_projector(seed, T, P):
    # P < T: G has T - P zero eigenvalues; they are dropped, B G B = lambda_min * (projector onto range(G)),
    # and the weights lie in range(G) (no weight on the null directions of the Gramian).
    J = _jac(seed, T, P)
    G = J @ J.T
    B = balance_transformation(G)
    lam, V = torch.linalg.eigh(G)
    Vr = V[:, -P:]
    proj = Vr @ Vr.T
    torch.testing.assert_close(B @ G @ B, lam[-P:].min() * proj, rtol=0, atol=1e-8 * float(lam.max()))
    w = aligned_mtl_weights(G)
    torch.testing.assert_close(proj @ w, w, rtol=0, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 6), st.integers(1, 8), st.integers(0, 10_000))
def test_task_order_invariance(seed, T, P, pseed):
    J = _jac(seed, T, P)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(pseed))
    w = aligned_mtl_weights(J @ J.T)
    wp = aligned_mtl_weights(J[perm] @ J[perm].T)
    torch.testing.assert_close(wp, w[perm], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(wp @ J[perm], w @ J, rtol=1e-7, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 6), st.integers(1, 8), st.floats(0.01, 100.0))
def test_global_scale_leaves_weights_unchanged(seed, T, P, c):
    # lambda -> c^2 lambda, so B = sqrt(lambda_s) V lambda^(-1/2) V^T is unchanged and the update scales with c.
    J = _jac(seed, T, P)
    torch.testing.assert_close(aligned_mtl_weights((c * J) @ (c * J).T), aligned_mtl_weights(J @ J.T),
                               rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------------------------------------ torchjd agreement

@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("seed,T,P", [(0, 2, 5), (1, 3, 7), (2, 4, 4), (3, 5, 12), (4, 4, 2), (5, 3, 1)])
def test_matches_torchjd_aligned_mtl(mode, seed, T, P):
    # torchjd's AlignedMTL uses the preference 1/T (its weights sum like a mean); the official code and LibMTL
    # (and we) use 1, so ours = T * theirs. Same eigendecomposition and rank rule (T * eps(float64) here),
    # including the rank-deficient cases P < T.
    from torchjd.aggregation import AlignedMTL as TjAlignedMTL, AlignedMTLWeighting

    J = _jac(seed, T, P)
    ours = aligned_mtl_weights(J @ J.T, mode)
    theirs = AlignedMTLWeighting(scale_mode=mode)(J @ J.T)
    torch.testing.assert_close(ours, T * theirs, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ours @ J, T * TjAlignedMTL(scale_mode=mode)(J), rtol=1e-9, atol=1e-10)


# -------------------------------------------------------------------------------------------- the method

def test_heads_follow_their_own_loss_unless_scale_heads():
    w = torch.tensor([0.5, 2.0])
    assert make_method(NAME, ("a", "b")).head_weights(w) is None
    m = make_method(NAME, ("a", "b"), scale_heads=True)
    assert m.head_weights(w) is w


def test_short_training_run(tmp_path):
    rec = short_run(tmp_path, NAME)
    for c in rec["curves"]:
        assert set(c["task_weights"]) == {"ctr", "cvr", "ctcvr"}
        assert all(math.isfinite(v) for v in c["task_weights"].values())


@pytest.mark.parametrize("opts,match", [({"scale_mode": "max"}, "max"), ({"rank_rtol": -1.0}, "rank_rtol"),
                                        ({"rank_rtol": 2.0}, "rank_rtol"), ({"scale": "min"}, "scale")])
def test_bad_options_are_one_line_errors(opts, match):
    with pytest.raises(MtlbenchError, match=match) as exc:
        get("optimizer", NAME).resolve_options(opts)
    assert "\n" not in str(exc.value)


def test_defaults_resolve():
    assert get("optimizer", NAME).resolve_options({}) == {"scale_mode": "min", "rank_rtol": None,
                                                          "scale_heads": False}
