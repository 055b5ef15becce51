"""CAGrad (baselines/optimizers/cagrad.py): hand-checked cases, the paper's guarantees, the small-gradient
degeneracy of the official/LibMTL solver, torchjd agreement, the step on a real model, a run, option validation."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.optimize import minimize

from mtlbench.baselines.optimizers.cagrad import cagrad_solve, cagrad_weights
from mtlbench.baselines.optimizers.mgda import mgda_weights
from mtlbench.errors import MtlbenchError
from mtlbench.registry import get

from conftest import assert_close_fp, grad_scale, build_arch, make_method, short_run, step_context

RAW = dict(reduction="mean", rescale=0)  # the paper's d = g_0 + sqrt(phi)/|g_w| g_w, no official post-processing


_method = functools.partial(make_method, "cagrad")


def _random_J(seed, T, P, shift=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, P, generator=g, dtype=torch.float64) + shift * torch.randn(1, P, generator=g,
                                                                                    dtype=torch.float64)


# -- hand-checked cases (c = 0.5) ------------------------------------------------------------------------------

def test_two_orthogonal_unit_gradients():
    # G = I, b = (1/2, 1/2): F(w) = w.Gb + c|g0||g_w| = 1/2 + (0.5/sqrt 2)|w| is minimal at w = (1/2, 1/2),
    # |g_w| = 1/sqrt 2, so sqrt(phi)/|g_w| = 0.5 and omega = b + 0.5 w = (0.75, 0.75): d = 1.5 g0.
    # Official post-processing (defaults): x T = 2 ("to match the sum loss"), / (1 + c^2) = 1.25 -> 1.2 each.
    J = torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(cagrad_weights(J @ J.T, 0.5, **RAW), torch.tensor([0.75, 0.75], dtype=torch.float64))
    update, w = _method(("a", "b")).aggregate(J, torch.ones(2), torch.Generator())
    torch.testing.assert_close(w, torch.tensor([1.2, 1.2], dtype=torch.float64))
    torch.testing.assert_close(update, torch.tensor([1.2, 1.2], dtype=torch.float64))


def test_two_orthogonal_gradients_of_different_norms():
    # g1 = (1, 0), g2 = (0, 2): G = diag(1, 4), Gb = (0.5, 2), |g0|^2 = 1.25, k = c|g0| = 0.5 sqrt(1.25).
    # With w = (1 - x, x): F = 0.5 + 1.5 x + k sqrt((1-x)^2 + 4x^2), F'(0) = 1.5 - k = 0.94 > 0, so w = (1, 0)
    # (the dual optimum sits on a vertex), |g_w| = 1, omega = (0.5 + k, 0.5) and d = (0.5 + k, 1).
    # The worst task improves by g1.d = 0.5 + k = 1.059 instead of g1.g0 = 0.5 for the average gradient.
    J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    k = 0.5 * math.sqrt(1.25)
    sol = cagrad_solve(J @ J.T, 0.5)
    torch.testing.assert_close(sol.w, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-7, rtol=0)
    torch.testing.assert_close(sol.omega, torch.tensor([0.5 + k, 0.5], dtype=torch.float64), atol=1e-7, rtol=0)
    torch.testing.assert_close(sol.omega @ J, torch.tensor([0.5 + k, 1.0], dtype=torch.float64), atol=1e-7, rtol=0)


def test_two_opposite_gradients():
    # g and -g: g0 = 0, so the ball has radius 0 and d = g0 = 0; omega = b = (1/2, 1/2) -> x2 / 1.25 = 0.8.
    J = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)
    update, w = _method(("a", "b")).aggregate(J, torch.ones(2), torch.Generator())
    torch.testing.assert_close(w, torch.tensor([0.8, 0.8], dtype=torch.float64))
    torch.testing.assert_close(update, torch.zeros(2, dtype=torch.float64))


def test_two_identical_gradients():
    # g1 = g2 = g: g0 = g_w = g for every w, so d = g + c|g|/|g| g = (1 + c) g = 1.5 g; with the official
    # post-processing 2 x 1.5 / 1.25 = 2.4 g (the weights are not unique, the update is).
    J = torch.tensor([[3.0, -1.0], [3.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(cagrad_weights(J @ J.T, 0.5, **RAW) @ J, 1.5 * J[0])
    update, _ = _method(("a", "b")).aggregate(J, torch.ones(2), torch.Generator())
    torch.testing.assert_close(update, 2.4 * J[0])


def test_rescale_and_reduction_options():
    J = _random_J(0, 3, 8)
    raw = cagrad_weights(J @ J.T, 0.5, reduction="mean", rescale=0)
    for rescale, div in ((0, 1.0), (1, 1.25), (2, 1.5)):
        for reduction, mult in (("mean", 1.0), ("sum", 3.0)):
            w = cagrad_weights(J @ J.T, 0.5, rescale=rescale, reduction=reduction)
            torch.testing.assert_close(w, raw * mult / div)


def test_c_zero_is_equal_weighting():
    J = _random_J(1, 4, 6)
    update, w = _method(tuple("abcd"), c=0.0).aggregate(J, torch.ones(4), torch.Generator())
    torch.testing.assert_close(w, torch.ones(4, dtype=torch.float64))  # sum convention: ew
    torch.testing.assert_close(update, J.sum(0))


# -- the paper's guarantees --------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(st.integers(2, 6), st.integers(2, 12), st.integers(0, 10_000), st.floats(0.05, 0.95))
def test_conflict_averse_properties(T, P, seed, c):
    J = _random_J(seed, T, P)
    G = J @ J.T
    scale = float(G.diagonal().mean())
    sol = cagrad_solve(G, c)
    assert sol.converged
    d = sol.omega @ J
    g0 = J.mean(0)
    # d lies on the ball |d - g0| = c |g0| (when g_w != 0)
    if sol.lam > 0:
        assert abs(float((d - g0).norm()) - c * float(g0.norm())) <= 1e-8 * math.sqrt(scale)
    # the worst task improves at least as much as with the average gradient, which is inside the ball
    assert float((J @ d).min()) >= float((J @ g0).min()) - 1e-7 * scale
    # strong duality: the worst-task improvement equals the dual value F(w) = g_w.g0 + c|g0||g_w|
    gw = sol.w @ J
    F = float(gw @ g0) + c * float(g0.norm()) * float(gw.norm())
    assert abs(float((J @ d).min()) - F) <= 1e-5 * scale


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 5), st.integers(0, 10_000))
def test_large_c_tends_to_mgda(T, seed):
    """As c grows the ball swallows the origin and d turns towards MGDA's min-norm direction."""
    J = _random_J(seed, T, 20)
    G = J @ J.T
    d = cagrad_weights(G, 1e3, **RAW) @ J
    m = mgda_weights(G, solver="pairwise", stop_crit=1e-13, max_iter=20_000) @ J
    cos = float(d @ m) / (float(d.norm()) * float(m.norm()))
    assert cos > 0.999


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 6), st.integers(0, 10_000))
def test_task_order_invariance(T, seed):
    J = _random_J(seed, T, 10)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(seed))
    w = cagrad_weights(J @ J.T)
    wp = cagrad_weights(J[perm] @ J[perm].T)
    torch.testing.assert_close(wp, w[perm], atol=1e-5, rtol=0)
    torch.testing.assert_close(wp @ J[perm], w @ J, atol=1e-5 * float(J.abs().max()) * T, rtol=0)


@settings(max_examples=15, deadline=None)
@given(st.integers(3, 6), st.integers(0, 10_000))
def test_small_gradients_do_not_degenerate_to_scaled_equal_weighting(T, seed):
    """LibMTL / the official code run SLSQP on the raw Gramian: with gradient norms ~1e-2 the objective is below
    SLSQP's ftol and it returns its start point, i.e. 1.2 x equal weighting. Our solve is scale-free."""
    J = _random_J(seed, T, 100)
    J1 = J / J.norm(dim=1).mean()  # task gradients of norm ~1
    J2 = 1e-2 * J1  # ~1e-2
    w1 = cagrad_weights(J1 @ J1.T)
    w2 = cagrad_weights(J2 @ J2.T)
    torch.testing.assert_close(w2, w1, atol=1e-6, rtol=0)  # same weights, update scaled by 1e-2
    torch.testing.assert_close(w2 @ J2, 1e-2 * (w1 @ J1), atol=1e-8, rtol=0)
    # the degenerate answer: w = b, so omega = (1 + c) b, x T (sum convention) / (1 + c^2) = 1.2 for every task,
    # i.e. 1.2 x equal weighting (1.2 g0 in LibMTL's mean convention)
    degenerate = torch.full((T,), 1.5 / 1.25, dtype=torch.float64)
    assert float((w2 - degenerate).abs().max()) > 1e-2
    assert float(((w2 - degenerate) @ J2).norm()) > 1e-2 * float((degenerate @ J2).norm())


def _official_libmtl_solve(GG, c=0.5):
    """The official / LibMTL dual solve, verbatim in behaviour: raw Gramian, scipy defaults (SLSQP, ftol 1e-6)."""
    T = GG.shape[0]
    g0_norm = math.sqrt(float(GG.mean()) + 1e-8)
    A, b, k = GG.numpy(), np.ones(T) / T, c * g0_norm + 1e-8
    res = minimize(lambda x: float(x @ A @ b + k * np.sqrt(x @ A @ x + 1e-8)), np.ones(T) / T,
                   bounds=[(0, 1)] * T, constraints=({"type": "eq", "fun": lambda x: 1 - x.sum()},))
    return res.x


def test_the_reference_solver_does_degenerate():
    """Documents the bug the previous test guards against (scipy's SLSQP, as installed here)."""
    J = _random_J(0, 4, 100)
    J1 = J / J.norm(dim=1).mean()
    np.testing.assert_allclose(_official_libmtl_solve(1e-4 * (J1 @ J1.T)), np.full(4, 0.25))  # norms ~1e-2
    assert np.abs(_official_libmtl_solve(J1 @ J1.T) - 0.25).max() > 0.05  # norms ~1: a real solution
    np.testing.assert_allclose(_official_libmtl_solve(J1 @ J1.T), cagrad_solve(J1 @ J1.T).w.numpy(), atol=5e-3)


# -- torchjd ---------------------------------------------------------------------------------------------------

def test_agrees_with_torchjd():
    """torchjd 0.18 CAGrad(c) solves the same dual with cvxpy/Clarabel and returns omega = 1/T + sqrt(phi)/|g_w| w:
    the mean convention without rescale, i.e. ours with reduction='mean', rescale=0 (our default = torchjd's
    weights x T / (1 + c^2)). Tolerance 1e-3 on the weights: both solvers stop at a duality gap ~1e-7..1e-5."""
    from torchjd.aggregation import CAGrad as TorchjdCAGrad

    worst = 0.0
    for T in (2, 3, 5):
        for seed in range(5):
            J = _random_J(seed, T, 50)
            J = J / J.norm(dim=1).mean()  # torchjd zeroes Gramians of trace < norm_eps = 1e-4
            G = J @ J.T
            ref = TorchjdCAGrad(c=0.5)
            tw = ref.gramian_weighting(G)
            w = cagrad_weights(G, 0.5, **RAW)
            torch.testing.assert_close(w, tw, atol=1e-3, rtol=0)
            torch.testing.assert_close(w @ J, ref(J), atol=1e-3 * float(J.abs().max()) * T, rtol=0)
            update, w_default = _method(tuple("abcde"[:T])).aggregate(J, torch.ones(T), torch.Generator())
            torch.testing.assert_close(w_default, tw * T / 1.25, atol=1e-3 * T, rtol=0)
            worst = max(worst, float((w - tw).abs().max()))
    print(f"max |w_ours - w_torchjd| = {worst:.2e}")


# -- the step on a real model ----------------------------------------------------------------------------------

def test_step_writes_the_update_and_heads_follow_their_loss(small_data):
    torch.manual_seed(0)
    model = build_arch("mmoe", small_data)
    ctx = step_context(model, small_data)
    J = ctx.jacobian().clone()
    method = _method(small_data.task_names)
    method.step(ctx)
    expect = cagrad_weights((J @ J.T).double()).float()
    torch.testing.assert_close(method.last_weights, expect, atol=1e-4, rtol=0)
    got = torch.cat([p.grad.reshape(-1) for p in model.shared_parameters()])
    assert_close_fp(got, method.last_weights @ J)
    head = model.task_parameters()
    for name, loss in zip(small_data.task_names, ctx.losses):
        ref = torch.autograd.grad(loss, head[name], retain_graph=True, allow_unused=True)
        for p, r in zip(head[name], ref):
            if r is not None:
                assert_close_fp(p.grad, r, scale=grad_scale(ref))


def test_unconverged_solve_warns_once_naming_the_step(small_data):
    torch.manual_seed(0)
    model = build_arch("shared_bottom", small_data)
    method = _method(small_data.task_names, max_iter=1, tol=1e-300)
    with pytest.warns(RuntimeWarning, match=r"cagrad: SLSQP did not solve the dual at step 1 \(epoch 1\)"):
        method.step(step_context(model, small_data))
    assert len(method.warnings) == 1
    method.aggregate(_random_J(0, 3, 5), torch.ones(3), torch.Generator())
    assert len(method.warnings) == 1  # once per run


# -- a real run and option validation ----------------------------------------------------------------------

def test_short_training_run(tmp_path):
    rec = short_run(tmp_path, "cagrad")
    assert rec.get("optimizer_warnings", []) == []  # the normalised dual solve converges on real gradients
    for epoch in rec["curves"]:
        w = epoch["task_weights"]
        assert set(w) == {"ctr", "cvr", "ctcvr"} and all(math.isfinite(v) and v > 0 for v in w.values())
        assert abs(sum(w.values()) - 3 * 1.2) > 1e-3  # not the degenerate 1.2 x equal weighting


@pytest.mark.parametrize("options, bad", [({"c": -0.1}, "-0.1"), ({"rescale": 3}, "3"),
                                          ({"reduction": "max"}, "max"), ({"max_iter": 0}, "0"),
                                          ({"tol": 0.0}, "0.0"), ({"alpha": 0.5}, "alpha")])
def test_bad_options(options, bad):
    with pytest.raises(MtlbenchError) as info:
        get("optimizer", "cagrad").resolve_options(options)
    msg = str(info.value)
    assert "\n" not in msg and bad in msg


def test_defaults():
    assert get("optimizer", "cagrad").resolve_options({}) == {"c": 0.5, "rescale": 1, "reduction": "sum",
                                                               "max_iter": 100, "tol": 1e-6}
    assert get("optimizer", "cagrad").description.startswith("CAGrad (Liu et al., NeurIPS 2021)")


def test_the_dual_is_certified_at_139_tasks_quickly():
    """Issue 16: at T = 139 with gradients near a low-dimensional subspace (as real per-task gradients are),
    SLSQP alone took ~10 s per solve; the solver now certifies the dual (duality gap <= tol) well within 5 s."""
    import time

    from mtlbench.baselines.optimizers.cagrad import cagrad_solve

    g = torch.Generator().manual_seed(0)
    T = 139
    J = (torch.randn(T, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 200, generator=g, dtype=torch.float64)
         + 0.01 * torch.randn(T, 200, generator=g, dtype=torch.float64)
         + 0.5 * torch.randn(1, 200, generator=g, dtype=torch.float64))
    t0 = time.perf_counter()
    sol = cagrad_solve(J @ J.T)
    assert time.perf_counter() - t0 < 5.0
    assert sol.converged and sol.gap <= 1e-6
    assert float(sol.w.min()) >= 0.0 and abs(float(sol.w.sum()) - 1.0) < 1e-12


def test_simplex_projection():
    from mtlbench.baselines.optimizers.cagrad import project_simplex

    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        v = torch.randn(7, generator=g, dtype=torch.float64).numpy() * 3
        p = project_simplex(v)
        assert p.min() >= 0.0 and abs(p.sum() - 1.0) < 1e-12
        # optimality of the projection: v - p is constant on the support and no larger off it
        r = v - p
        on = p > 0
        assert np.ptp(r[on]) < 1e-12 and (r[~on] <= r[on].max() + 1e-12).all()
