"""GradVac (baselines/optimizers/gradvac.py): hand-built cases, vector-form and torchjd equivalence, state, a run."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mtlbench.baselines.optimizers.gradvac import GradVac, gradvac_weights
from mtlbench.baselines.optimizers.pcgrad import pcgrad_weights
from mtlbench.errors import MtlbenchError
from mtlbench.registry import get

from conftest import short_run

NAME = "gradvac"
D = torch.float64


def _jac(seed: int, T: int, P: int) -> torch.Tensor:
    return torch.randn(T, P, generator=torch.Generator().manual_seed(seed), dtype=D)


def _orders(seed: int, T: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(T, generator=g).tolist() for _ in range(T)]


def _gradvac_on_vectors(J, targets, beta, orders, eps=1e-8):
    """The paper's Algorithm 1 written directly on the gradient vectors (reference for the Gramian form)."""
    J = J.double()
    phi_hat = targets.clone().double()
    out = []
    for i in range(J.shape[0]):
        g = J[i].clone()
        for j in orders[i]:
            if j == i:
                continue
            phi = float(g @ J[j]) / (float(g.norm() * J[j].norm()) + eps)
            t = float(phi_hat[i, j])
            if phi < t:
                g = g + float(g.norm()) * (t * math.sqrt(1 - phi ** 2) - phi * math.sqrt(1 - t ** 2)) / (
                    float(J[j].norm()) * math.sqrt(1 - t ** 2) + eps) * J[j]
            phi_hat[i, j] = (1 - beta) * t + beta * phi
        out.append(g)
    return torch.stack(out), phi_hat


# --------------------------------------------------------------------------------------------- hand-built cases

def test_two_steps_by_hand():
    # Step 1: g1 = (1, 0), g2 = (1, 1)/sqrt(2); cos = 1/sqrt(2) >= target 0, no correction, w = (1, 1);
    # both targets become 0.5 * 1/sqrt(2) = 1/sqrt(8).
    J1 = torch.tensor([[1.0, 0.0], [1 / math.sqrt(2), 1 / math.sqrt(2)]], dtype=D)
    tgt = torch.zeros(2, 2, dtype=D)
    w, tgt = gradvac_weights(J1 @ J1.T, tgt, beta=0.5)
    torch.testing.assert_close(w, torch.ones(2, dtype=D))
    s8 = 1 / math.sqrt(8)
    torch.testing.assert_close(tgt, torch.tensor([[0.0, s8], [s8, 0.0]], dtype=D))
    # Step 2: orthogonal g1 = (1, 0), g2 = (0, 1): cos 0 < 1/sqrt(8), so
    # g1' = g1 + |g1| (t sqrt(1-0) - 0) / (|g2| sqrt(1 - t^2)) g2 = g1 + (1/sqrt(8)) / sqrt(7/8) g2 = g1 + g2/sqrt(7)
    # (cos(g1', g2) = (1/sqrt 7)/sqrt(8/7) = 1/sqrt(8): exactly the target); symmetrically g2' = g2 + g1/sqrt(7).
    # w = (1 + 1/sqrt(7), 1 + 1/sqrt(7)); targets -> 0.5/sqrt(8) + 0.5 * 0.
    J2 = torch.eye(2, dtype=D)
    w, tgt = gradvac_weights(J2 @ J2.T, tgt, beta=0.5)
    torch.testing.assert_close(w, torch.full((2,), 1 + 1 / math.sqrt(7), dtype=D))
    torch.testing.assert_close(tgt, torch.tensor([[0.0, s8 / 2], [s8 / 2, 0.0]], dtype=D))


def test_identical_gradients_are_left_alone():
    # g1 = g2 = (1, 0): cos 1 is above any target, nothing is corrected, w = (1, 1), targets -> 0.5 * 1.
    J = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=D)
    w, tgt = gradvac_weights(J @ J.T, torch.full((2, 2), 0.7, dtype=D), beta=0.5)
    torch.testing.assert_close(w, torch.ones(2, dtype=D))
    torch.testing.assert_close(tgt[0, 1], torch.tensor(0.85, dtype=D))


def test_on_correction_ema_leaves_targets_when_nothing_is_corrected():
    # LibMTL's variant updates a target only when it corrected the pair: step 1 above corrects nothing.
    J1 = torch.tensor([[1.0, 0.0], [1 / math.sqrt(2), 1 / math.sqrt(2)]], dtype=D)
    _, tgt = gradvac_weights(J1 @ J1.T, torch.zeros(2, 2, dtype=D), beta=0.5, ema_update="on_correction")
    assert tgt.abs().max() == 0


def test_opposite_gradients_first_step_is_pcgrad():
    # Targets start at 0, so a negative cosine is lifted to exactly 0: the PCGrad projection. g1 = (1, 0),
    # g2 = (-1, 0): each projection removes the whole gradient, the update is 0.
    J = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=D)
    w, _ = gradvac_weights(J @ J.T, torch.zeros(2, 2, dtype=D), eps=0.0)
    torch.testing.assert_close(w @ J, torch.zeros(2, dtype=D))


# ---------------------------------------------------------------------------------------------- properties

@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 5), st.integers(2, 8))
def test_first_step_equals_pcgrad_sum(seed, T, P):
    J = _jac(seed, T, P)
    orders = _orders(seed + 1, T)
    w, _ = gradvac_weights(J @ J.T, torch.zeros(T, T, dtype=D), eps=0.0, orders=orders)
    torch.testing.assert_close(w, pcgrad_weights(J @ J.T, orders=orders), rtol=1e-9, atol=1e-9)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 5), st.integers(2, 8), st.floats(0.0, 1.0))
def test_gramian_form_equals_vector_form(seed, T, P, beta):
    J = _jac(seed, T, P)
    targets = torch.rand(T, T, generator=torch.Generator().manual_seed(seed), dtype=D) * 1.8 - 0.9
    orders = _orders(seed + 1, T)
    w, tgt = gradvac_weights(J @ J.T, targets, beta=beta, orders=orders)
    rows, tgt_ref = _gradvac_on_vectors(J, targets, beta, orders)
    torch.testing.assert_close(w @ J, rows.sum(0), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(tgt, tgt_ref, rtol=1e-8, atol=1e-9)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 8), st.floats(-0.9, 0.9), st.floats(-0.9, 0.9))
def test_two_tasks_cosines_reach_the_targets(seed, P, t12, t21):
    # With two tasks d = g1' + g2', g1' = g1 + a g2, g2' = g2 + b g1, so w = (1 + b, 1 + a). The vaccine makes
    # cos(g_i', g_j) = max(cos(g_i, g_j), target_ij).
    J = _jac(seed, 2, P)
    targets = torch.tensor([[0.0, t12], [t21, 0.0]], dtype=D)
    w, _ = gradvac_weights(J @ J.T, targets, eps=0.0)
    g1p = J[0] + (w[1] - 1) * J[1]
    g2p = J[1] + (w[0] - 1) * J[0]
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    phi = cos(J[0], J[1])
    assert cos(g1p, J[1]) == pytest.approx(max(phi, t12), abs=1e-7)
    assert cos(g2p, J[0]) == pytest.approx(max(phi, t21), abs=1e-7)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 8), st.floats(-0.9, 0.9), st.floats(-0.9, 0.9))
def test_two_tasks_order_invariance(seed, P, t12, t21):
    # With two tasks there is no order to draw: swapping the tasks (and their targets) swaps the weights.
    J = _jac(seed, 2, P)
    targets = torch.tensor([[0.0, t12], [t21, 0.0]], dtype=D)
    w, tgt = gradvac_weights(J @ J.T, targets)
    ws, tgts = gradvac_weights(J.flip(0) @ J.flip(0).T, targets.flip(0).flip(1))
    torch.testing.assert_close(ws, w.flip(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(tgts, tgt.flip(0).flip(1), rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 4), st.integers(2, 8), st.floats(0.05, 20.0))
def test_scaling_one_task_scales_only_its_corrected_gradient(seed, T, P, c):
    # Cosines are scale-free and a correction adds |g_i|/|g_j| * (...) * g_j, so scaling g_0 by c leaves every
    # other corrected gradient unchanged and scales g_0' by c.
    J = _jac(seed, T, P)
    targets = torch.rand(T, T, generator=torch.Generator().manual_seed(seed), dtype=D) * 1.8 - 0.9
    orders = _orders(seed + 1, T)
    rows, _ = _gradvac_on_vectors(J, targets, 0.5, orders, eps=0.0)
    Jc = J.clone()
    Jc[0] *= c
    w, _ = gradvac_weights(Jc @ Jc.T, targets, eps=0.0, orders=orders)
    torch.testing.assert_close(w @ Jc, c * rows[0] + rows[1:].sum(0), rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------------------------------------ torchjd agreement

@pytest.mark.parametrize("seed,T,P", [(0, 2, 5), (1, 3, 7), (2, 4, 4), (3, 5, 12)])
def test_matches_torchjd_gradvac_over_several_steps(seed, T, P):
    # torchjd's GradVac draws, for each task i in turn, torch.randperm(T - 1) from the global RNG over the other
    # tasks; we replay the same draws as explicit orders. Same beta/eps, same Gramian arithmetic, and the state
    # (targets) is carried over 4 steps, so weights and targets must agree to float64 round-off.
    from torchjd.aggregation import GradVacWeighting

    theirs = GradVacWeighting(beta=0.5, eps=1e-8)
    targets = torch.zeros(T, T, dtype=D)
    gen = torch.Generator().manual_seed(seed)
    for step in range(4):
        J = torch.randn(T, P, generator=gen, dtype=D)
        torch.manual_seed(100 * seed + step)
        orders = []
        for i in range(T):
            others = [j for j in range(T) if j != i]
            orders.append([others[k] for k in torch.randperm(T - 1).tolist()])
        torch.manual_seed(100 * seed + step)
        w_theirs = theirs(J @ J.T)
        w, targets = gradvac_weights(J @ J.T, targets, beta=0.5, eps=1e-8, orders=orders)
        torch.testing.assert_close(w, w_theirs, rtol=0, atol=1e-12)
        torch.testing.assert_close(targets, theirs._phi_t, rtol=0, atol=1e-12)


# -------------------------------------------------------------------------------------------- the method

def test_same_seed_same_weights_and_state_round_trip():
    Js = [_jac(s, 3, 6).float() for s in range(4)]
    a, b = GradVac(("x", "y", "z")), GradVac(("x", "y", "z"))
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for J in Js[:3]:
        _, wa = a.aggregate(J, torch.ones(3), ga)
        _, wb = b.aggregate(J, torch.ones(3), gb)
        torch.testing.assert_close(wa, wb, rtol=0, atol=0)
    assert a.targets.abs().max() > 0
    c = GradVac(("x", "y", "z"))
    c.load_state_dict(json.loads(json.dumps({k: v.tolist() for k, v in a.state_dict().items()})))
    gc = torch.Generator().manual_seed(0)
    gc.set_state(ga.get_state())
    _, wa = a.aggregate(Js[3], torch.ones(3), ga)
    _, wc = c.aggregate(Js[3], torch.ones(3), gc)
    torch.testing.assert_close(wa, wc, rtol=0, atol=0)
    torch.testing.assert_close(a.targets, c.targets, rtol=0, atol=0)


def test_short_training_run(tmp_path):
    rec = short_run(tmp_path, NAME)
    for c in rec["curves"]:
        assert set(c["task_weights"]) == {"ctr", "cvr", "ctcvr"}
        assert all(math.isfinite(v) for v in c["task_weights"].values())
    assert len(rec["optimizer_state"]["targets"]) == 3


@pytest.mark.parametrize("opts,match", [({"beta": 1.5}, "beta"), ({"beta": -0.1}, "beta"), ({"eps": -1.0}, "eps"),
                                        ({"ema_update": "sometimes"}, "sometimes"), ({"betta": 0.5}, "betta")])
def test_bad_options_are_one_line_errors(opts, match):
    with pytest.raises(MtlbenchError, match=match) as exc:
        get("optimizer", NAME).resolve_options(opts)
    assert "\n" not in str(exc.value)


def test_defaults_resolve():
    assert get("optimizer", NAME).resolve_options({}) == {"beta": 0.5, "eps": 1e-8, "ema_update": "always"}
