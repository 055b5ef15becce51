"""Nash-MTL (baselines/optimizers/nash_mtl.py): hand-built cases, bargaining properties, torchjd, state, a run."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from mtlbench.baselines.optimizers.nash_mtl import NashMTL, nash_mtl_weights
from mtlbench.errors import MtlbenchError
from mtlbench.registry import get

from conftest import assert_close_fp, build_arch, make_method, short_run, step_context

NAME = "nash_mtl"
D = torch.float64


def _method(tasks=("a", "b"), **options) -> NashMTL:
    return make_method(NAME, tasks, **options)


def _jac(seed: int, T: int, P: int, shared: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, P, generator=g, dtype=D) + shared * torch.randn(1, P, generator=g, dtype=D)


# --------------------------------------------------------------------------------------------- hand-built cases

def test_orthogonal_gradients_by_hand():
    # g1 = (2, 0), g2 = (0, 1/2): G = diag(4, 1/4), G a = 1/a gives a_i = 1/|g_i| = (1/2, 2): the update is the
    # sum of the unit gradients (1, 1), each task gets g_i . d = 1/a_i = |g_i|. Norm sqrt(2) > max_norm 1, so the
    # shared update is clipped to (1, 1)/sqrt(2); the weights (logged, and used for the heads) are not.
    J = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=D)
    sol = nash_mtl_weights(J @ J.T)
    assert sol.converged
    torch.testing.assert_close(sol.weights, torch.tensor([0.5, 2.0], dtype=D), rtol=1e-6, atol=0)
    upd, w = _method().aggregate(J, torch.ones(2, dtype=D), torch.Generator())
    torch.testing.assert_close(upd, torch.full((2,), 1 / math.sqrt(2), dtype=D), rtol=1e-6, atol=0)
    torch.testing.assert_close(w, torch.tensor([0.5, 2.0], dtype=D), rtol=1e-6, atol=0)
    upd, _ = _method(max_norm=0.0).aggregate(J, torch.ones(2, dtype=D), torch.Generator())
    torch.testing.assert_close(upd, torch.ones(2, dtype=D), rtol=1e-6, atol=0)


def test_identical_gradients_by_hand():
    # g1 = g2 = (1, 0): G = [[1, 1], [1, 1]], a_1 (a_1 + a_2) = a_2 (a_1 + a_2) = 1 -> a = (1, 1)/sqrt(2);
    # update (sqrt(2), 0), clipped to (1, 0).
    J = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=D)
    for solver in ("sca", "newton"):
        sol = nash_mtl_weights(J @ J.T, solver=solver)
        assert sol.converged
        torch.testing.assert_close(sol.weights, torch.full((2,), 1 / math.sqrt(2), dtype=D), rtol=1e-6, atol=0)
    upd, _ = _method().aggregate(J, torch.ones(2, dtype=D), torch.Generator())
    torch.testing.assert_close(upd, torch.tensor([1.0, 0.0], dtype=D), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("solver", ["sca+newton", "sca", "newton"])
def test_opposite_gradients_have_no_solution_warn_and_keep_previous_weights(solver):
    # g1 = (1, 0), g2 = (-1, 0): (G a)_1 = a_1 - a_2 and (G a)_2 = a_2 - a_1 cannot both be positive, so
    # G a = 1/a has no solution. The official code keeps its previous alpha; we do too, and say so once.
    m = _method(solver=solver)
    ok = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=D)
    m.aggregate(ok, torch.ones(2, dtype=D), torch.Generator())
    prev = m.alpha.clone()
    bad = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=D)
    with pytest.warns(RuntimeWarning, match=r"nash_mtl: the .* solver did not reach the fixed point .* step 2"):
        _, w = m.aggregate(bad, torch.ones(2, dtype=D), torch.Generator())
    torch.testing.assert_close(w, prev)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.aggregate(bad, torch.ones(2, dtype=D), torch.Generator())  # warned once per run
    assert len(m.warnings) == 1
    fresh = nash_mtl_weights(bad @ bad.T, solver=solver)
    assert not fresh.converged and fresh.weights.tolist() == [1.0, 1.0]  # no previous alpha: the official start


# ---------------------------------------------------------------------------------------------- properties

full_rank = st.tuples(st.integers(0, 10_000), st.integers(2, 5), st.integers(0, 6), st.floats(0.0, 2.0))


@settings(max_examples=50, deadline=None)
@given(full_rank, st.sampled_from(["sca", "newton"]))
def test_fixed_point_and_no_conflict(args, solver):
    # With linearly independent gradients the solution exists; each task's directional derivative is
    # g_i . d = (G a)_i = 1/a_i > 0: the update improves every task. (The SCA occasionally fails on strongly
    # conflicting random Jacobians -- then it says so, tested above -- so this property is checked when it
    # converged; Newton must always converge here.)
    seed, T, extra, shared = args
    J = _jac(seed, T, T + extra, shared)
    G = J @ J.T
    sol = nash_mtl_weights(G, solver=solver)
    if solver == "newton":
        assert sol.converged
    assume(sol.converged)
    a = sol.weights
    assert bool((a > 0).all())
    torch.testing.assert_close(a * (G @ a), torch.ones(T, dtype=D), rtol=0, atol=1e-3)
    assert bool(((G @ a) > 0).all())


@settings(max_examples=40, deadline=None)
@given(full_rank)
def test_sca_and_newton_agree(args):
    seed, T, extra, shared = args
    J = _jac(seed, T, T + extra, shared)
    s = nash_mtl_weights(J @ J.T)
    n = nash_mtl_weights(J @ J.T, solver="newton")
    assume(s.converged)
    torch.testing.assert_close(s.weights, n.weights, rtol=1e-4, atol=0)


@settings(max_examples=40, deadline=None)
@given(full_rank, st.integers(0, 4), st.floats(0.01, 100.0))
def test_scaling_one_task_gradient_leaves_the_update_unchanged(args, which, c):
    # If g_i -> c g_i then a_i -> a_i / c solves the new fixed point (G' = D G D, a' = D^-1 a): the bargaining
    # update J^T a is invariant to the scale of any single task's gradient.
    seed, T, extra, shared = args
    J = _jac(seed, T, T + extra, shared)
    i = which % T
    Jc = J.clone()
    Jc[i] *= c
    a = nash_mtl_weights(J @ J.T, solver="newton").weights
    ac = nash_mtl_weights(Jc @ Jc.T, solver="newton").weights
    expected = a.clone()
    expected[i] /= c
    torch.testing.assert_close(ac, expected, rtol=1e-4, atol=0)
    torch.testing.assert_close(ac @ Jc, a @ J, rtol=1e-4, atol=1e-8 * float(J.norm()))


@settings(max_examples=40, deadline=None)
@given(full_rank, st.integers(0, 10_000))
def test_task_order_invariance(args, pseed):
    seed, T, extra, shared = args
    J = _jac(seed, T, T + extra, shared)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(pseed))
    a = nash_mtl_weights(J @ J.T, solver="newton").weights
    ap = nash_mtl_weights(J[perm] @ J[perm].T, solver="newton").weights
    torch.testing.assert_close(ap, a[perm], rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------ torchjd agreement

@pytest.mark.filterwarnings("ignore:You are solving a parameterized problem that is not DPP")
@pytest.mark.parametrize("seed,T,P,shared", [(0, 2, 5, 1.0), (1, 3, 7, 1.0), (2, 4, 6, 1.5), (3, 5, 12, 2.0),
                                             (4, 3, 3, 0.5)])
def test_matches_torchjd_nash_mtl(seed, T, P, shared):
    # torchjd 0.18's NashMTL is a port of the official cvxpy/ECOS code. On these fixed Jacobians both reach the
    # fixed point (checked below), so the solutions agree up to the solvers' accuracy (ECOS ~1e-7): rtol 1e-5.
    # Convention: torchjd rescales alpha so that |J^T alpha| <= max_norm; we (like the official code) clip the
    # shared update instead and keep alpha. Hence weights are compared with max_norm=0 (no rescaling), and the
    # clipped updates with max_norm=1, where they must coincide.
    from torchjd.aggregation import NashMTL as TjNashMTL

    J = _jac(seed, T, P, shared)
    G = J @ J.T
    theirs = TjNashMTL(n_tasks=T, max_norm=0.0).weighting(J)
    assert float((theirs * (G @ theirs) - 1).abs().max()) < 1e-3  # torchjd converged on this case
    ours = nash_mtl_weights(G)
    assert ours.converged
    torch.testing.assert_close(ours.weights, theirs, rtol=1e-5, atol=0)
    upd, _ = _method(tuple("abcdef"[:T])).aggregate(J, torch.ones(T, dtype=D), torch.Generator())
    torch.testing.assert_close(upd, TjNashMTL(n_tasks=T, max_norm=1.0)(J), rtol=1e-5, atol=1e-9)


# -------------------------------------------------------------------------------------------- the method

def test_state_round_trip_and_warm_start():
    a = _method(("x", "y", "z"))
    for k in range(3):
        a.aggregate(_jac(k, 3, 6, 1.0).float(), torch.ones(3), torch.Generator())
    b = _method(("x", "y", "z"))
    b.load_state_dict(json.loads(json.dumps({k: (v.tolist() if torch.is_tensor(v) else v)
                                             for k, v in a.state_dict().items()})))
    assert b.n_steps == 3
    ua, wa = a.aggregate(_jac(9, 3, 6, 1.0).float(), torch.ones(3), torch.Generator())
    ub, wb = b.aggregate(_jac(9, 3, 6, 1.0).float(), torch.ones(3), torch.Generator())
    torch.testing.assert_close(wa, wb, rtol=1e-6, atol=0)
    torch.testing.assert_close(ua, ub, rtol=1e-6, atol=0)


def test_update_weights_every_reuses_alpha():
    m = _method(update_weights_every=2)
    J1 = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=D)
    _, w1 = m.aggregate(J1, torch.ones(2, dtype=D), torch.Generator())
    J2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D)
    _, w2 = m.aggregate(J2, torch.ones(2, dtype=D), torch.Generator())  # step 2: reused
    torch.testing.assert_close(w2, w1)
    _, w3 = m.aggregate(J2, torch.ones(2, dtype=D), torch.Generator())  # step 3: solved again
    torch.testing.assert_close(w3, torch.ones(2, dtype=D), rtol=1e-6, atol=0)


def _grads(model):
    shared = torch.cat([p.grad.reshape(-1) for p in model.shared_parameters()])
    heads = {t: [None if p.grad is None else p.grad.clone() for p in ps] for t, ps in model.task_parameters().items()}
    return shared, heads


def test_solve_step_and_reuse_step_write_the_same_gradients(small_data):
    # Step 1 solves and writes clip(J^T a) plus a_t-weighted heads; step 2 (update_weights_every=2) reuses a with
    # one backward of sum a_t L_t and clips the shared gradient: on the same batch the gradients must match.
    torch.manual_seed(0)
    model = build_arch("mmoe", small_data)
    m = _method(small_data.task_names, update_weights_every=2)
    ctx = step_context(model, small_data)
    J = ctx.jacobian().clone()
    m.step(ctx)
    a = m.alpha.float()
    s1, h1 = _grads(model)
    upd = a @ J
    torch.testing.assert_close(s1, upd * min(1.0, 1.0 / float(upd.norm())), rtol=1e-5, atol=1e-8)
    assert float(s1.norm()) <= 1.0 + 1e-5
    torch.testing.assert_close(m.last_weights, a)
    model.zero_grad(set_to_none=True)
    m.step(step_context(model, small_data))
    s2, h2 = _grads(model)
    assert_close_fp(s2, s1)
    for t in h1:
        # float32 in another order; biases feeding a BatchNorm have a gradient that is 0 up to round-off, so the
        # absolute floor is relative to the head's largest gradient
        scale = max(float(g.abs().max()) for g in h1[t] if g is not None)
        for g1, g2 in zip(h1[t], h2[t]):
            if g1 is not None:
                torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-5 * scale)
    assert m.n_steps == 2


def test_short_training_run(tmp_path):
    rec = short_run(tmp_path, NAME)
    for c in rec["curves"]:
        assert set(c["task_weights"]) == {"ctr", "cvr", "ctcvr"}
        assert all(math.isfinite(v) and v > 0 for v in c["task_weights"].values())
    assert len(rec["optimizer_state"]["alpha"]) == 3


@pytest.mark.parametrize("opts,match", [({"max_norm": -1.0}, "max_norm"), ({"update_weights_every": 0},
                                        "update_weights_every"), ({"optim_niter": 0}, "optim_niter"),
                                        ({"solver": "cvxpy"}, "cvxpy"), ({"tol": 0.0}, "tol"),
                                        ({"max_iter": 5}, "max_iter")])
def test_bad_options_are_one_line_errors(opts, match):
    with pytest.raises(MtlbenchError, match=match) as exc:
        get("optimizer", NAME).resolve_options(opts)
    assert "\n" not in str(exc.value)


def test_defaults_resolve():
    assert get("optimizer", NAME).resolve_options({}) == {"max_norm": 1.0, "update_weights_every": 1,
                                                          "optim_niter": 20, "solver": "sca+newton", "tol": 1e-3}


def test_default_reaches_the_fixed_point_where_the_sca_alone_misses():
    """Issue 14: on strongly conflicting gradients (alternating rows +-3 c v + noise) the SLSQP-based SCA misses the
    fixed point often (measured 127 of 200 missed) where the official ECOS-based solver does not; the default
    falls back to Newton and reaches it every time."""
    rng = np.random.default_rng(0)
    sca_missed = 0
    for _ in range(40):
        T = int(rng.integers(2, 9))
        P = int(rng.integers(T, 3 * T + 1))
        v = rng.normal(size=P)
        J = np.stack([(-1) ** i * 3.0 * v * rng.uniform(0.5, 2) + rng.normal(size=P) for i in range(T)])
        G = torch.tensor(J @ J.T)
        sol = nash_mtl_weights(G)
        assert sol.converged and sol.residual <= 1e-3
        a = sol.weights
        torch.testing.assert_close(a * (G @ a), torch.ones(T, dtype=D), rtol=0, atol=1e-3)  # G a = 1/a
        sca_missed += not nash_mtl_weights(G, solver="sca").converged
    assert sca_missed > 0  # the case is informative
