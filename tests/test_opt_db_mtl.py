"""DB-MTL (baselines/optimizers/db_mtl.py): hand-built steps, balancing properties, the step on a model, a run."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mtlbench.baselines.optimizers.db_mtl import DBMTL, db_mtl_update
from mtlbench.errors import MtlbenchError, RunFailed
from mtlbench.registry import get

from conftest import assert_close_fp, grad_scale, build_arch, make_method, short_run, step_context

NAME = "db_mtl"
D = torch.float64


def _method(**options) -> DBMTL:
    return make_method(NAME, ("a", "b", "c")[:options.pop("T", 3)], **options)


def _jac(seed: int, T: int, P: int) -> torch.Tensor:
    return torch.randn(T, P, generator=torch.Generator().manual_seed(seed), dtype=D)


def _losses(seed: int, T: int) -> torch.Tensor:
    return torch.rand(T, generator=torch.Generator().manual_seed(seed + 99), dtype=D) * 2 + 0.1


# --------------------------------------------------------------------------------------------- hand-built cases

def test_two_steps_by_hand():
    # J = [[3, 0], [0, 1]], losses (1, 1) (eps 1e-8 is below the tolerance). Step 1 from a zero buffer, beta 0.9:
    # g_hat = 0.1 g: norms 0.3 and 0.1, alpha = max/norm = (1, 3), update = 0.3 (1, 0) + 3 * 0.1 (0, 1) = (0.3, 0.3).
    # Step 2, same J: g_hat = 0.9 * 0.1 g + 0.1 g = 0.19 g, alpha unchanged, update (0.57, 0.57).
    J = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=D)
    L = torch.ones(2, dtype=D)
    upd, alpha, buf = db_mtl_update(J, L, None, 1)
    torch.testing.assert_close(alpha, torch.tensor([1.0, 3.0], dtype=D))
    torch.testing.assert_close(upd, torch.tensor([0.3, 0.3], dtype=D))
    upd, alpha, buf = db_mtl_update(J, L, buf, 2)
    torch.testing.assert_close(alpha, torch.tensor([1.0, 3.0], dtype=D))
    torch.testing.assert_close(upd, torch.tensor([0.57, 0.57], dtype=D))


@pytest.mark.parametrize("J,L,expected", [
    # identical g1 = g2 = (1, 0), losses (1, 2): log-loss gradients (1, 0) and (1/2, 0); g_hat = 0.1 of those,
    # norms 0.1 and 0.05, alpha = (1, 2): both rescaled to 0.1, update (0.2, 0).
    ([[1.0, 0.0], [1.0, 0.0]], [1.0, 2.0], [0.2, 0.0]),
    # opposite g1 = (1, 0), g2 = (-4, 0), losses (1, 1): norms 0.1 and 0.4, alpha = (4, 1), update 0.
    ([[1.0, 0.0], [-4.0, 0.0]], [1.0, 1.0], [0.0, 0.0]),
])
def test_identical_and_opposite_gradients_by_hand(J, L, expected):
    upd, _, _ = db_mtl_update(torch.tensor(J, dtype=D), torch.tensor(L, dtype=D), None, 1, eps=1e-300)
    torch.testing.assert_close(upd, torch.tensor(expected, dtype=D), rtol=0, atol=1e-12)


def test_log_loss_divides_by_the_loss():
    # Same J, losses (2, 0.5): log-loss gradients (1.5, 0) and (0, 2); g_hat = 0.1 of those, norms 0.15 and 0.2,
    # alpha = (4/3, 1), update = (0.2, 0.2). Without the log transform (ablation): as in the first case.
    J = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=D)
    L = torch.tensor([2.0, 0.5], dtype=D)
    upd, alpha, _ = db_mtl_update(J, L, None, 1)
    torch.testing.assert_close(alpha, torch.tensor([4 / 3, 1.0], dtype=D))
    torch.testing.assert_close(upd, torch.tensor([0.2, 0.2], dtype=D))
    upd, alpha, _ = db_mtl_update(J, L, None, 1, log_loss=False)
    torch.testing.assert_close(upd, torch.tensor([0.3, 0.3], dtype=D))


def test_beta_sigma_decays_the_ema_coefficient():
    # beta_k = beta / k^beta_sigma: with beta_sigma = 1, step 2 uses 0.45: g_hat_2 = 0.45 g_hat_1 + 0.55 g_2.
    J1, J2 = _jac(0, 2, 4), _jac(1, 2, 4)
    L = torch.ones(2, dtype=D)
    _, _, b1 = db_mtl_update(J1, L, None, 1, beta_sigma=1.0, eps=1e-300)
    _, _, b2 = db_mtl_update(J2, L, b1, 2, beta_sigma=1.0, eps=1e-300)
    torch.testing.assert_close(b1, 0.1 * J1)
    torch.testing.assert_close(b2, 0.45 * b1 + 0.55 * J2)


def test_without_gradient_balancing_the_update_is_the_ema_sum():
    J = _jac(2, 3, 5)
    L = _losses(2, 3)
    upd, alpha, buf = db_mtl_update(J, L, None, 1, grad_balance=False)
    assert alpha.tolist() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(upd, buf.sum(0))


# ---------------------------------------------------------------------------------------------- properties

cases = st.tuples(st.integers(0, 10_000), st.integers(2, 5), st.integers(1, 8))


@settings(max_examples=50, deadline=None)
@given(cases, st.integers(1, 4))
def test_every_rescaled_ema_gradient_has_the_max_norm(args, steps):
    seed, T, P = args
    buf = None
    for k in range(1, steps + 1):
        upd, alpha, buf = db_mtl_update(_jac(seed + k, T, P), _losses(seed + k, T), buf, k)
    norms = buf.norm(dim=1)
    # alpha_i |g_hat_i| = max_j |g_hat_j| up to LibMTL's eps in alpha_i = max / (|g_hat_i| + eps)
    torch.testing.assert_close(alpha * norms, norms.max() * norms / (norms + 1e-8), rtol=1e-12, atol=0)
    torch.testing.assert_close(alpha * norms, norms.max().expand(T), rtol=1e-8 / float(norms.min()) + 1e-12,
                               atol=0)
    torch.testing.assert_close(upd, alpha @ buf)


@settings(max_examples=50, deadline=None)
@given(cases, st.integers(0, 4), st.floats(0.01, 100.0), st.integers(1, 3))
def test_loss_scale_invariance(args, which, c, steps):
    # Scaling a task's loss by c scales its gradient and its value by c: grad log(c L) = grad log L, so the
    # update does not change (eps = 1e-300 makes the log exact for this check).
    seed, T, P = args
    i = which % T
    buf = buf_c = None
    for k in range(1, steps + 1):
        J, L = _jac(seed + k, T, P), _losses(seed + k, T)
        Jc, Lc = J.clone(), L.clone()
        Jc[i] *= c
        Lc[i] *= c
        upd, _, buf = db_mtl_update(J, L, buf, k, eps=1e-300)
        upd_c, _, buf_c = db_mtl_update(Jc, Lc, buf_c, k, eps=1e-300)
    torch.testing.assert_close(upd_c, upd, rtol=1e-9, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(cases, st.integers(0, 10_000))
def test_task_order_invariance(args, pseed):
    seed, T, P = args
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(pseed))
    J, L = _jac(seed, T, P), _losses(seed, T)
    upd, alpha, _ = db_mtl_update(J, L, None, 1)
    upd_p, alpha_p, _ = db_mtl_update(J[perm], L[perm], None, 1)
    torch.testing.assert_close(alpha_p, alpha[perm])
    torch.testing.assert_close(upd_p, upd)


@settings(max_examples=30, deadline=None)
@given(cases)
def test_beta_zero_is_a_weighting_of_the_current_jacobian(args):
    # Without the EMA, d = sum_i alpha_i g_i / (L_i + eps) = J^T (alpha / (L + eps)).
    J, L = _jac(args[0], args[1], args[2]), _losses(args[0], args[1])
    upd, alpha, _ = db_mtl_update(J, L, None, 1, beta=0.0)
    torch.testing.assert_close(upd, (alpha / (L + 1e-8)) @ J)


# -------------------------------------------------------------------------------------------- the method

def test_step_writes_ema_update_and_log_loss_head_gradients(small_data):
    torch.manual_seed(0)
    model = build_arch("mmoe", small_data)
    ctx = step_context(model, small_data)
    J = ctx.jacobian().clone()
    L = ctx.loss_values.clone()
    m = DBMTL(small_data.task_names)
    m.step(ctx)
    upd, alpha, _ = db_mtl_update(J, L, None, 1)
    got = torch.cat([p.grad.reshape(-1) for p in model.shared_parameters()])
    assert_close_fp(got, upd)
    torch.testing.assert_close(m.last_weights, alpha)
    # heads: the gradient of log(L_t + eps) through head t only (LibMTL back-propagates the log-losses)
    heads = model.task_parameters()
    _, losses = step_context(model, small_data).forward()
    for t, name in enumerate(small_data.task_names):
        params = [p for p in heads[name] if p.grad is not None]
        ref = torch.autograd.grad(torch.log(losses[t] + 1e-8), params, retain_graph=True, allow_unused=True)
        for p, r in zip(params, ref):
            if r is not None:
                assert_close_fp(p.grad, r, scale=grad_scale(ref))


def test_state_round_trip_gives_the_same_next_step():
    a = _method()
    for k in range(3):
        a.aggregate(_jac(k, 3, 6).float(), _losses(k, 3).float(), torch.Generator())
    b = _method()
    b.load_state_dict(json.loads(json.dumps({"n_steps": a.state_dict()["n_steps"],
                                             "buffer": a.state_dict()["buffer"].tolist()})))
    ua, _ = a.aggregate(_jac(9, 3, 6).float(), _losses(9, 3).float(), torch.Generator())
    ub, _ = b.aggregate(_jac(9, 3, 6).float(), _losses(9, 3).float(), torch.Generator())
    torch.testing.assert_close(ua, ub, rtol=0, atol=0)
    assert b.n_steps == 4


def test_non_positive_loss_fails_the_run_clearly():
    m = _method(T=2)
    with pytest.raises(RunFailed, match="loss <= -eps"):
        m.aggregate(_jac(0, 2, 3), torch.tensor([0.5, -0.2], dtype=D), torch.Generator())
    m2 = _method(T=2, log_loss=False)
    m2.aggregate(_jac(0, 2, 3), torch.tensor([0.5, -0.2], dtype=D), torch.Generator())


def test_short_training_run(tmp_path):
    rec = short_run(tmp_path, NAME)
    for c in rec["curves"]:
        assert set(c["task_weights"]) == {"ctr", "cvr", "ctcvr"}
        assert all(math.isfinite(v) and v >= 1.0 - 1e-6 for v in c["task_weights"].values())  # alpha >= 1


@pytest.mark.parametrize("opts,match", [({"beta": 1.0}, "beta"), ({"beta": -0.1}, "beta"),
                                        ({"beta_sigma": -1.0}, "beta_sigma"), ({"eps": 0.0}, "eps"),
                                        ({"gamma": 0.1}, "gamma")])
def test_bad_options_are_one_line_errors(opts, match):
    with pytest.raises(MtlbenchError, match=match) as exc:
        get("optimizer", NAME).resolve_options(opts)
    assert "\n" not in str(exc.value)


def test_defaults_resolve():
    assert get("optimizer", NAME).resolve_options({}) == {"beta": 0.9, "beta_sigma": 0.0, "eps": 1e-8,
                                                          "log_loss": True, "grad_balance": True}
