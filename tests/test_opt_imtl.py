"""IMTL (baselines/optimizers/imtl.py): IMTL-G hand cases and the equal-projection property, the paper's
closed form and torchjd's IMTLG, IMTL-L against torchjd's IMTLL, the hybrid step, state, a run, bad options."""
from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mtlbench.baselines.optimizers.imtl import imtl_g_solve, imtl_g_weights
from mtlbench.errors import MtlbenchError
from mtlbench.registry import get

from conftest import assert_close_fp, grad_scale, build_arch, make_method, short_run, step_context


_method = functools.partial(make_method, "imtl")


def _random_J(seed, T, P, shift=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, P, generator=g, dtype=torch.float64) + shift * torch.randn(1, P, generator=g,
                                                                                    dtype=torch.float64)


def _paper_alpha(J):
    """The paper's closed form: D = [g1 - gt], U = [u1 - ut] (t >= 2), alpha_{2:T} = g1 U^T (D U^T)^-1."""
    U_all = J / J.norm(dim=1, keepdim=True)
    D, U = J[:1] - J[1:], U_all[:1] - U_all[1:]
    a = J[0] @ U.T @ torch.linalg.inv(D @ U.T)
    return torch.cat([(1 - a.sum())[None], a])


# -- hand-checked cases ----------------------------------------------------------------------------------------

def test_two_orthogonal_gradients():
    # g1 = (1, 0), g2 = (0, 2): G = diag(1, 4), n = (1, 2), G^-1 n = (1, 0.5) -> alpha = (2/3, 1/3),
    # d = (2/3, 2/3): d.u1 = 2/3 = d.u2. Paper: D = (1, -2), U = (1, -1), D U^T = 3, g1 U^T = 1 -> alpha2 = 1/3.
    J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    w = imtl_g_weights(J @ J.T)
    torch.testing.assert_close(w, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(w, _paper_alpha(J))
    torch.testing.assert_close(w @ J, torch.tensor([2 / 3, 2 / 3], dtype=torch.float64))


def test_two_identical_gradients():
    # Rank-deficient J (the paper's D U^T = 0 is singular): G = |g|^2 1 1^T, G^+ = 1 1^T / (4 |g|^2),
    # G^+ n = 1/(2|g|) (1, 1) -> alpha = (1/2, 1/2), d = g.
    J = torch.tensor([[3.0, -1.0], [3.0, -1.0]], dtype=torch.float64)
    w = imtl_g_weights(J @ J.T)
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(w @ J, J[0])


def test_two_opposite_gradients():
    # g and -g: n = |g| (1, 1) lies in the null space of G = |g|^2 [[1, -1], [-1, 1]], so G^+ n = 0: only d = 0
    # has equal projections (+d.u = -d.u). Weights 0 (torchjd's choice; the paper's formula gives (1/2, 1/2),
    # the same d = 0), and the method warns.
    J = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)
    sol = imtl_g_solve(J @ J.T)
    assert sol.degenerate
    torch.testing.assert_close(sol.alpha, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(_paper_alpha(J) @ J, torch.zeros(2, dtype=torch.float64))
    method = _method(("a", "b"), mode="grad")
    with pytest.warns(RuntimeWarning, match="imtl: no non-zero direction has equal projections"):
        update, _ = method.aggregate(J, torch.ones(2), torch.Generator())
    torch.testing.assert_close(update, torch.zeros(2, dtype=torch.float64))


# -- properties ----------------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(st.integers(2, 6), st.integers(0, 10_000))
def test_equal_projections_and_the_papers_formula(T, seed):
    J = _random_J(seed, T, T + 6)  # full row rank
    w = imtl_g_weights(J @ J.T)
    assert abs(float(w.sum()) - 1.0) < 1e-10
    d = w @ J
    proj = (J / J.norm(dim=1, keepdim=True)) @ d
    torch.testing.assert_close(proj, proj.mean().expand(T), atol=1e-9, rtol=0)
    torch.testing.assert_close(w, _paper_alpha(J), atol=1e-8, rtol=0)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 6), st.integers(0, 10_000), st.floats(1e-3, 1e3))
def test_scale_invariance(T, seed, k):
    """Rescaling one task's gradient by k divides its weight by k (up to the sum-1 normalisation): the update
    stays on the same line (the paper's scale-invariance; the sum-1 normalisation can flip its sign, see the
    next test), and a global scale changes nothing."""
    J = _random_J(seed, T, T + 4)
    w = imtl_g_weights(J @ J.T)
    torch.testing.assert_close(imtl_g_weights((J * 7.0) @ (J * 7.0).T), w, atol=1e-9, rtol=0)
    Js = J.clone()
    Js[0] *= k
    ws = imtl_g_weights(Js @ Js.T)
    d, ds = w @ J, ws @ Js
    cos = float(d @ ds) / (float(d.norm()) * float(ds.norm()))
    assert abs(cos) > 1 - 1e-9
    ratio = ws / w
    ratio[0] *= k
    torch.testing.assert_close(ratio, ratio[1:].mean().expand(T), rtol=1e-6, atol=0)


def test_sum_one_normalisation_can_turn_the_update_into_ascent():
    # Found by the previous test: 5 tasks, task 0's gradient scaled by 1/8. v = G^-1 n has a large negative entry
    # for task 0, so 1^T v < 0 and d = J^T v / 1^T v has equal NEGATIVE projections on every unit gradient: a
    # step along -d increases every loss to first order. We keep the paper's weights (torchjd agrees) and warn.
    from torchjd.aggregation import IMTLG

    J = _random_J(1, 5, 9)
    J[0] *= 0.125
    sol = imtl_g_solve(J @ J.T)
    assert sol.projection < 0
    proj = (J / J.norm(dim=1, keepdim=True)) @ (sol.alpha @ J)
    assert bool((proj < 0).all())
    torch.testing.assert_close(sol.alpha, IMTLG().gramian_weighting(J @ J.T), atol=1e-9, rtol=1e-9)
    method = _method(tuple("abcde"), mode="grad")
    with pytest.warns(RuntimeWarning, match="equal NEGATIVE projections"):
        method.aggregate(J, torch.ones(5), torch.Generator())


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 6), st.integers(2, 10), st.integers(0, 10_000))
def test_task_order_invariance(T, P, seed):
    J = _random_J(seed, T, P)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(seed))
    w = imtl_g_weights(J @ J.T)
    wp = imtl_g_weights(J[perm] @ J[perm].T)
    torch.testing.assert_close(wp, w[perm], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(wp @ J[perm], w @ J, atol=1e-9, rtol=1e-9)


# -- torchjd ---------------------------------------------------------------------------------------------------

def test_agrees_with_torchjd():
    """torchjd 0.18 IMTLG = pinv(G) sqrt(diag G), normalised to sum 1: the same weights as ours (we only divide G
    by its mean diagonal first, which cancels). Checked for full-rank (P > T) and rank-deficient (P < T) J."""
    from torchjd.aggregation import IMTLG

    worst = 0.0
    for T, P in ((2, 5), (3, 30), (5, 50), (4, 2), (6, 3)):
        for seed in range(5):
            J = _random_J(seed, T, P)
            tw = IMTLG().gramian_weighting(J @ J.T)
            w = imtl_g_weights(J @ J.T)
            torch.testing.assert_close(w, tw, atol=1e-9, rtol=1e-9)
            torch.testing.assert_close(_method(tuple("abcdef"[:T]), mode="grad").aggregate(
                J, torch.ones(T), torch.Generator())[0], IMTLG()(J), atol=1e-9, rtol=1e-9)
            worst = max(worst, float((w - tw).abs().max()))
    print(f"max |w_ours - w_torchjd| = {worst:.2e}")


# -- IMTL-L and the hybrid on a real model ---------------------------------------------------------------------

def _grads(params):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def test_loss_mode_matches_torchjd_imtll(small_data):
    """IMTL-L = one backward of sum_t e^{s_t} L_t - s_t; compared with torchjd.scalarization.IMTLL (same s)."""
    from torchjd.scalarization import IMTLL

    torch.manual_seed(0)
    model = build_arch("mmoe", small_data)
    method = _method(small_data.task_names, mode="loss")
    assert method.requires == frozenset() and method.parameters() == [method.log_scales]
    s = torch.tensor([0.3, -0.2, 0.1])
    method.load_state_dict({"log_scales": s.tolist()})
    ctx = step_context(model, small_data)
    method.step(ctx)
    got, got_s = _grads(model.parameters()), method.log_scales.grad.clone()
    torch.testing.assert_close(method.last_weights, s.exp())
    model.zero_grad(set_to_none=True)
    scalarizer = IMTLL(len(small_data.tasks))
    with torch.no_grad():
        next(scalarizer.parameters()).copy_(s)
    _, losses = step_context(model, small_data).forward()
    scalarizer(torch.stack(losses)).backward()
    for g, p in zip(got, model.parameters()):
        assert_close_fp(g, p.grad if p.grad is not None else torch.zeros_like(p), scale=grad_scale(got))
    assert_close_fp(got_s, next(scalarizer.parameters()).grad)
    torch.testing.assert_close(got_s, s.exp() * ctx.loss_values - 1.0)


@pytest.mark.parametrize("rep", [False, True])
def test_hybrid_step(small_data, rep):
    """Hybrid: alpha from the scaled gradients e^s g_t; shared update sum alpha_t e^{s_t} g_t; heads follow their
    own scaled loss; s gets e^s L - 1. Its shared direction is IMTL-G's on the raw gradients."""
    torch.manual_seed(0)
    model = build_arch("shared_bottom", small_data)
    method = _method(small_data.task_names, rep=rep)
    s = torch.tensor([0.5, -0.4, 0.2])
    method.load_state_dict({"log_scales": s.tolist()})
    e = s.exp()
    ctx = step_context(model, small_data)
    J = ctx.jacobian().clone()
    if rep:
        Z = torch.stack([torch.cat([g.reshape(-1) for g in task]) for task in ctx.feature_grads()]).double()
        G = Z @ Z.T
    else:
        G = (J @ J.T).double()
    alpha = imtl_g_weights(G * (e[:, None] * e[None, :]).double()).float()
    assert abs(float(alpha.sum()) - 1.0) < 1e-5
    head = model.task_parameters()
    head_refs = [torch.autograd.grad(loss, head[name], retain_graph=True, allow_unused=True)
                 for name, loss in zip(small_data.task_names, ctx.losses)]
    method.step(ctx)
    torch.testing.assert_close(method.last_weights, alpha * e, atol=1e-5, rtol=1e-4)
    got = torch.cat([p.grad.reshape(-1) for p in model.shared_parameters()])
    assert_close_fp(got, (alpha * e) @ J)
    # same direction as IMTL-G on the raw gradients of the same space (scale invariance)
    raw = imtl_g_weights(G).float() @ J
    assert float(got @ raw) / float(got.norm() * raw.norm()) > 1 - 1e-5
    for t, (name, ref) in enumerate(zip(small_data.task_names, head_refs)):
        for p, r in zip(head[name], ref):
            if r is not None:
                assert_close_fp(p.grad, r * e[t], scale=grad_scale(ref) * float(e[t]))
    torch.testing.assert_close(method.log_scales.grad, e * ctx.loss_values - 1.0)


def test_grad_mode_has_no_scales_and_heads_weight_one(small_data):
    torch.manual_seed(0)
    model = build_arch("shared_bottom", small_data)
    method = _method(small_data.task_names, mode="grad")
    assert method.parameters() == [] and method.state_dict() == {}
    ctx = step_context(model, small_data)
    J = ctx.jacobian().clone()
    method.step(ctx)
    w = imtl_g_weights((J @ J.T).double()).float()
    torch.testing.assert_close(method.last_weights, w, atol=1e-5, rtol=1e-4)
    got = torch.cat([p.grad.reshape(-1) for p in model.shared_parameters()])
    assert_close_fp(got, w @ J)
    name, loss = small_data.task_names[0], ctx.losses[0]
    ref = torch.autograd.grad(loss, model.task_parameters()[name], retain_graph=True, allow_unused=True)
    for p, r in zip(model.task_parameters()[name], ref):
        if r is not None:
            assert_close_fp(p.grad, r, scale=grad_scale(ref))


def test_state_roundtrip_and_learning():
    m = _method(("a", "b"))
    with torch.no_grad():
        m.log_scales.copy_(torch.tensor([0.25, -1.5]))
    state = m.state_dict()
    assert state == {"log_scales": [0.25, -1.5]} and json.dumps(state)
    m2 = _method(("a", "b"))
    param = m2.log_scales
    m2.load_state_dict(state)
    assert m2.log_scales is param  # restored in place: the torch optimizer keeps stepping the same tensor
    torch.testing.assert_close(m2.log_scales.detach(), torch.tensor([0.25, -1.5]))
    with pytest.raises(ValueError, match="3 loss scales for 2 tasks"):
        m2.load_state_dict({"log_scales": [0.0, 0.0, 0.0]})
    # the stationary point of e^s L - s is s = -log L: gradient steps on s drive e^s L to 1
    opt = torch.optim.SGD(m2.parameters(), lr=0.5)
    L = torch.tensor([4.0, 0.25])
    for _ in range(200):
        opt.zero_grad()
        m2._write_scale_grad(L)
        opt.step()
    torch.testing.assert_close(m2.log_scales.detach(), -L.log(), atol=1e-4, rtol=0)


# -- a real run and option validation ----------------------------------------------------------------------

def test_short_training_run(tmp_path):
    rec = short_run(tmp_path, "imtl")
    for epoch in rec["curves"]:
        w = epoch["task_weights"]
        assert set(w) == {"ctr", "cvr", "ctcvr"} and all(math.isfinite(v) for v in w.values())
    scales = rec["optimizer_state"]["log_scales"]  # IMTL-L learned something
    assert len(scales) == 3 and any(abs(v) > 1e-4 for v in scales)


@pytest.mark.parametrize("options, bad", [({"mode": "both"}, "both"), ({"mode": "loss", "rep": True}, "rep"),
                                          ({"init_scale": 100.0}, "100.0"), ({"scale": 1.0}, "scale")])
def test_bad_options(options, bad):
    with pytest.raises(MtlbenchError) as info:
        get("optimizer", "imtl").resolve_options(options)
    msg = str(info.value)
    assert "\n" not in msg and bad in msg


def test_defaults():
    assert get("optimizer", "imtl").resolve_options({}) == {"mode": "hybrid", "rep": False, "init_scale": 0.0}
    assert get("optimizer", "imtl").description.startswith("IMTL (Liu et al., ICLR 2021)")
