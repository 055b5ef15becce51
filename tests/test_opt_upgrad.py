"""UPGrad (baselines/optimizers/upgrad.py): hand-built cases, the paper's properties, torchjd equivalence, a run."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mtlbench.baselines.optimizers.upgrad import UPGrad, upgrad_weights
from mtlbench.errors import MtlbenchError
from mtlbench.registry import get

from conftest import short_run

NAME = "upgrad"


def _jac(seed: int, T: int, P: int) -> torch.Tensor:
    return torch.randn(T, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _w(J: torch.Tensor, **kw) -> torch.Tensor:
    return upgrad_weights(J @ J.T, **kw)


# --------------------------------------------------------------------------------------------- hand-built cases

def test_orthogonal_gradients_give_the_mean():
    # g1 = (2, 0), g2 = (0, 1) do not conflict: each is already in the dual cone, so pi(g_i) = g_i and the
    # update is their mean (1, 0.5), weights (1/2, 1/2). The regularised QP keeps v = e_i (G + eps I is diagonal).
    J = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    w = _w(J)
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(w @ J, torch.tensor([1.0, 0.5], dtype=torch.float64), rtol=0, atol=1e-12)


def test_identical_gradients_give_that_gradient():
    # g1 = g2 = (1, 0): no conflict, update = mean = g, weights (1/2, 1/2).
    J = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    w = _w(J)
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5], dtype=torch.float64), rtol=0, atol=1e-12)


def test_opposite_gradients_give_zero():
    # g1 = (1, 0), g2 = (-1, 0): the dual cone is {d : d_x = 0}, both projections vanish, update 0.
    # (With reg_eps the weights are (1+t)/2 each, t = 1/(1+2 reg_eps) on the trace-normalised Gramian, so the
    # update J^T w = (1+t)/2 (g1 + g2) is still exactly 0.)
    J = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    w = _w(J)
    t = 1.0 / (1.0 + 2e-4)
    torch.testing.assert_close(w, torch.full((2,), (1 + t) / 2, dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(w @ J, torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)


def test_conflicting_pair_by_hand():
    # g1 = (1, 0), g2 = (-1, 1), g1.g2 = -1. Dual cone = {d : d_x >= 0, d_y >= d_x}.
    # pi(g1) = g1 - (g1.g2)/|g2|^2 g2 = (1,0) + (-1,1)/2 = (1/2, 1/2) = 1 g1 + 1/2 g2      -> v1 = (1, 1/2)
    # pi(g2) = g2 - (g2.g1)/|g1|^2 g1 = (-1,1) + (1,0)   = (0, 1)     = 1 g1 + 1 g2        -> v2 = (1, 1)
    # mean: w = (1, 3/4), update = (1/4, 3/4). Exact without regularisation; within O(reg_eps) with it.
    J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    w = _w(J, norm_eps=0.0, reg_eps=0.0)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.75], dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(w @ J, torch.tensor([0.25, 0.75], dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(_w(J), w, rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------------------------- properties

jacobians = st.tuples(st.integers(0, 10_000), st.integers(2, 6), st.integers(1, 10))


@settings(max_examples=60, deadline=None)
@given(jacobians)
def test_update_never_conflicts_exactly_without_regularisation(args):
    # KKT of min v^T G v s.t. v >= e_i gives (G v)_j >= 0, so g_j . d = (G w)_j >= 0 for every task j,
    # including rank-deficient J (P < T).
    J = _jac(*args)
    G = J @ J.T
    w = upgrad_weights(G, norm_eps=0.0, reg_eps=0.0)
    assert float((G @ w).min()) >= -1e-9 * float(G.trace())


@settings(max_examples=60, deadline=None)
@given(jacobians)
def test_update_conflict_bounded_by_regularisation(args):
    # With reg_eps the KKT condition is (G_n + reg I) v >= 0, i.e. g_j . d >= -reg_eps * trace(G) * w_j.
    J = _jac(*args)
    G = J @ J.T
    w = upgrad_weights(G)
    bound = -1e-4 * float(G.trace()) * w.abs() - 1e-9 * float(G.trace())
    assert bool(((G @ w) >= bound).all())
    assert bool((w >= 1.0 / J.shape[0] - 1e-12).all())  # v >= e_i for each i, averaged: w >= 1/T


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 6), st.integers(1, 8))
def test_non_conflicting_gradients_give_the_mean(seed, T, P):
    J = _jac(seed, T, P).abs()  # non-negative entries: every pair has g_i . g_j >= 0
    w = upgrad_weights(J @ J.T)
    torch.testing.assert_close(w, torch.full((T,), 1.0 / T, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(w @ J, J.mean(0), rtol=0, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(jacobians, st.integers(0, 10_000))
def test_task_order_invariance(args, pseed):
    J = _jac(*args)
    perm = torch.randperm(J.shape[0], generator=torch.Generator().manual_seed(pseed))
    w = upgrad_weights(J @ J.T)
    wp = upgrad_weights(J[perm] @ J[perm].T)
    torch.testing.assert_close(wp, w[perm], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(wp @ J[perm], w @ J, rtol=1e-7, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(jacobians, st.floats(0.1, 100.0))
def test_positive_homogeneity(args, c):
    # The Gramian is normalised by its trace, so the weights do not change when J is scaled and the update
    # scales with it: A(cJ) = c A(J).
    J = _jac(*args)
    w = upgrad_weights(J @ J.T)
    wc = upgrad_weights((c * J) @ (c * J).T)
    torch.testing.assert_close(wc, w, rtol=1e-7, atol=1e-9)


def test_one_task_scaled_up_pulls_the_update_towards_it():
    # UPGrad is not invariant to per-task scaling (unlike Nash-MTL): a larger g1 gets a larger share.
    J = torch.tensor([[1.0, 0.0], [-0.5, 1.0]], dtype=torch.float64)
    d = upgrad_weights(J @ J.T) @ J
    J2 = J.clone()
    J2[0] *= 10
    d2 = upgrad_weights(J2 @ J2.T) @ J2
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    assert cos(d2, J[0]) > cos(d, J[0])


# ------------------------------------------------------------------------------------------ torchjd agreement

@pytest.mark.parametrize("seed,T,P", [(0, 2, 5), (1, 3, 7), (2, 4, 4), (3, 5, 12), (4, 6, 3), (5, 3, 2)])
def test_matches_torchjd_upgrad(seed, T, P):
    # torchjd 0.18: UPGrad() = mean preference + QuadprogProjector(norm_eps=1e-4, reg_eps=1e-4), weights = the
    # average of the projection weights -- the same convention as ours (they sum to ~1, not T). Both solvers are
    # exact active-set QP methods on the same normalised, regularised Gramian, so the tolerance is tight.
    from torchjd.aggregation import UPGrad as TjUPGrad, UPGradWeighting

    J = _jac(seed, T, P)
    ours = upgrad_weights(J @ J.T)
    theirs = UPGradWeighting()(J @ J.T)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-9)
    torch.testing.assert_close(ours @ J, TjUPGrad()(J), rtol=0, atol=1e-9)


# -------------------------------------------------------------------------------------------- the method

def test_method_aggregate_returns_update_and_weights_in_jacobian_dtype():
    J = _jac(7, 3, 6).float()
    m = UPGrad(("a", "b", "c"))
    upd, w = m.aggregate(J, torch.ones(3), torch.Generator().manual_seed(0))
    assert upd.dtype == torch.float32 and w.dtype == torch.float32 and upd.shape == (6,)
    torch.testing.assert_close(upd, w @ J)


def test_tiny_gramian_warns_once_and_falls_back_to_the_mean():
    # torchjd's norm_eps rule: trace(G) < norm_eps -> projection skipped; we follow it but never silently.
    J = 1e-4 * torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    m = UPGrad(("a", "b"))
    with pytest.warns(RuntimeWarning, match="norm_eps"):
        upd, w = m.aggregate(J, torch.ones(2), torch.Generator())
    torch.testing.assert_close(w, torch.full((2,), 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.aggregate(J, torch.ones(2), torch.Generator())  # once per run
    assert len(m.warnings) == 1 and "step 1" in m.warnings[0]
    assert upgrad_weights(J.double() @ J.double().T, norm_eps=0.0).tolist() != [0.5, 0.5]


def test_short_training_run(tmp_path):
    rec = short_run(tmp_path, NAME)
    for c in rec["curves"]:
        assert set(c["task_weights"]) == {"ctr", "cvr", "ctcvr"}
        assert all(math.isfinite(v) and v > 0 for v in c["task_weights"].values())


@pytest.mark.parametrize("opts,match", [({"norm_eps": -1.0}, "norm_eps"), ({"reg_eps": -0.5}, "reg_eps"),
                                        ({"reg_epsilon": 1e-3}, "reg_epsilon")])
def test_bad_options_are_one_line_errors(opts, match):
    with pytest.raises(MtlbenchError, match=match) as exc:
        get("optimizer", NAME).resolve_options(opts)
    assert "\n" not in str(exc.value)


def test_defaults_resolve():
    assert get("optimizer", NAME).resolve_options({}) == {"norm_eps": 1e-4, "reg_eps": 1e-4}
