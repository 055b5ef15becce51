"""UW (Kendall et al., CVPR 2018): objective, gradients, torchjd equivalence, state, a real run, bad options."""
from __future__ import annotations

import copy
import functools
import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mtlbench.baselines.optimizers.uw import uw_loss, uw_weights
from mtlbench.errors import MtlbenchError
from mtlbench.registry import get

from conftest import Toy, assert_close_fp, grad_scale, build_arch, make_method, short_run, step_context, toy_context

NAME = "uw"
_method = functools.partial(make_method, NAME)


def _toy_ctx(model, step, scales):
    """Toy batch ``step``; the context reports step 0 (its generator: a fresh unseeded one)."""
    return toy_context(model, step, scales, ctx_step=0)


# ---------------------------------------------------------------------------------------------- the formula
def test_objective_and_weights_by_hand():
    # s = (0, log 2), L = (3, 4):
    #   kendall: exp(0)*3 + 0 + exp(-log 2)*4 + log 2 = 3 + 2 + log 2 = 5 + log 2; weights (1, 1/2)
    #   half:    half of that = 2.5 + log(2)/2;                                    weights (1/2, 1/4)
    s = torch.tensor([0.0, math.log(2.0)], dtype=torch.float64)
    L = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert float(uw_loss(L, s)) == pytest.approx(5 + math.log(2), abs=1e-12)
    assert float(uw_loss(L, s, "half")) == pytest.approx(2.5 + math.log(2) / 2, abs=1e-12)
    torch.testing.assert_close(uw_weights(s), torch.tensor([1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(uw_weights(s, "half"), torch.tensor([0.5, 0.25], dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-3, 3), st.floats(0.01, 10)), min_size=1, max_size=6),
       st.sampled_from(["kendall", "half"]))
def test_gradients_in_s_and_losses(pairs, form):
    # d/ds_i = 1 - exp(-s_i) L_i (times 1/2 for "half"); d/dL_i = exp(-s_i) (times 1/2) = the logged weight
    s = torch.tensor([p[0] for p in pairs], dtype=torch.float64, requires_grad=True)
    L = torch.tensor([p[1] for p in pairs], dtype=torch.float64, requires_grad=True)
    uw_loss(L, s, form).backward()
    k = 0.5 if form == "half" else 1.0
    torch.testing.assert_close(s.grad, k * (1 - torch.exp(-s.detach()) * L.detach()))
    torch.testing.assert_close(L.grad, uw_weights(s, form))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.05, 20), min_size=2, max_size=6), st.integers(0, 1000))
def test_stationary_point_is_log_loss_and_permutation_equivariant(losses, seed):
    # at s_i = log L_i every gradient in s vanishes and every weighted loss exp(-s_i) L_i is 1
    L = torch.tensor(losses, dtype=torch.float64)
    s = torch.log(L).requires_grad_()
    uw_loss(L, s).backward()
    torch.testing.assert_close(s.grad, torch.zeros_like(L), atol=1e-12, rtol=0)
    torch.testing.assert_close(uw_weights(s) * L, torch.ones_like(L))
    # permuting the tasks permutes the weights and leaves the objective unchanged
    perm = torch.randperm(len(losses), generator=torch.Generator().manual_seed(seed))
    s2 = torch.randn(len(losses), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert float(uw_loss(L[perm], s2[perm])) == pytest.approx(float(uw_loss(L, s2)), rel=1e-12)
    torch.testing.assert_close(uw_weights(s2[perm]), uw_weights(s2)[perm])


def test_scaling_one_loss_moves_its_optimal_weight_inversely():
    # the optimal s_i = log L_i: a task whose loss is 10x larger ends with a 10x smaller weight, same weighted loss
    s = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([s], lr=0.3)
    L = torch.tensor([0.5, 5.0])
    for _ in range(300):
        opt.zero_grad()
        uw_loss(L, s).backward()
        opt.step()
    w = uw_weights(s)
    assert float(w[0] / w[1]) == pytest.approx(10.0, rel=1e-3)


# ------------------------------------------------------------------------------------------- the method
def test_step_gradient_in_s_and_model_on_a_real_arch(small_data):
    torch.manual_seed(0)
    model = build_arch("mmoe", small_data)
    method = _method(small_data.task_names)
    with torch.no_grad():
        method.log_vars.copy_(torch.tensor([0.3, -0.2, 0.1]))
    ctx = step_context(model, small_data)
    L = ctx.loss_values.clone()
    method.step(ctx)
    s = method.log_vars.detach()
    # the brief's check: d L_total / d s_i = 1 - exp(-s_i) L_i
    torch.testing.assert_close(method.log_vars.grad, 1 - torch.exp(-s) * L)
    torch.testing.assert_close(method.last_weights, torch.exp(-s))
    # the model gets the gradient of sum_i exp(-s_i) L_i
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    _, losses = ctx.forward()
    (torch.exp(-s) * torch.stack(losses)).sum().backward()
    for g, p in zip(got, model.parameters()):
        assert_close_fp(g, p.grad, scale=grad_scale(got))


def test_initial_weights_equal_ew():
    method = _method(["a", "b", "c"])
    assert method.parameters()[0] is method.log_vars
    model = Toy(3)
    ctx = _toy_ctx(model, 0, [1.0, 2.0, 3.0])
    method.step(ctx)
    torch.testing.assert_close(method.last_weights, torch.ones(3))


def test_matches_torchjd_uw_over_a_training_run():
    """Our "half" form is torchjd's ``0.5 e^{-s} L + 0.5 s``; "kendall" is exactly twice it (same stationary s).
    Same model, same batches, same Adam over model + log-variances: identical trajectories."""
    from torchjd.scalarization import UW

    def run(ours: bool, form: str = "half"):
        model = Toy(2, seed=3)
        if ours:
            method = _method(["t0", "t1"], form=form)
            extra = method.parameters()
        else:
            scal = UW(2)
            extra = list(scal.parameters())
        opt = torch.optim.Adam(list(model.parameters()) + extra, lr=0.05)
        for step in range(15):
            opt.zero_grad(set_to_none=True)
            ctx = _toy_ctx(model, step, [1.0, 5.0])
            if ours:
                method.step(ctx)
            else:
                scal(torch.stack(ctx.losses)).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()], extra[0].detach().clone()

    p_ours, s_ours = run(True)
    p_tjd, s_tjd = run(False)
    diff = max(float((a - b).abs().max()) for a, b in zip(p_ours + [s_ours], p_tjd + [s_tjd]))
    assert diff < 1e-6, diff

    # one step, "kendall" vs torchjd: objective and every gradient exactly 2x
    s = torch.tensor([0.4, -0.7])
    L = torch.tensor([1.3, 0.2], requires_grad=True)
    scal = UW(2)
    with torch.no_grad():
        scal.log_var.copy_(s)
    ours_s = s.clone().requires_grad_()
    val_ours = uw_loss(L, ours_s)
    val_tjd = scal(L)
    torch.testing.assert_close(val_ours, 2 * val_tjd)
    g_ours = torch.autograd.grad(val_ours, (L, ours_s))
    g_tjd = torch.autograd.grad(val_tjd, (L, scal.log_var))
    for a, b in zip(g_ours, g_tjd):
        torch.testing.assert_close(a, 2 * b)


def test_state_dict_round_trip_restores_behaviour_exactly():
    model = Toy(2, seed=1)
    method = _method(["t0", "t1"])
    opt = torch.optim.Adam(list(model.parameters()) + method.parameters(), lr=0.05)

    def go(model, method, opt, steps):
        out = []
        for step in steps:
            opt.zero_grad(set_to_none=True)
            method.step(_toy_ctx(model, step, [1.0, 4.0]))
            opt.step()
            out.append(method.last_weights.clone())
        return out

    go(model, method, opt, range(5))
    state = json.loads(json.dumps(method.state_dict()))  # plain JSON values
    model2 = copy.deepcopy(model)
    method2 = _method(["t0", "t1"])
    method2.load_state_dict(state)
    opt2 = torch.optim.Adam(list(model2.parameters()) + method2.parameters(), lr=0.05)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    torch.testing.assert_close(method2.log_vars.detach(), method.log_vars.detach(), rtol=0, atol=0)
    w1 = go(model, method, opt, range(5, 10))
    w2 = go(model2, method2, opt2, range(5, 10))
    for a, b in zip(w1, w2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="log-variances"):
        _method(["a", "b", "c"]).load_state_dict(state)


# ------------------------------------------------------------------------------------------ run and options
def test_short_training_run(tmp_path):
    rec = short_run(tmp_path, NAME)
    for entry in rec["curves"]:
        w = entry["task_weights"]
        assert set(w) == {"ctr", "cvr", "ctcvr"} and all(v > 0 and math.isfinite(v) for v in w.values())
    assert len(rec["optimizer_state"]["log_vars"]) == 3
    # the log-variances were trained: the weights moved away from 1
    assert any(abs(v - 1.0) > 1e-4 for v in rec["curves"][-1]["task_weights"].values())


@pytest.mark.parametrize("options, needle", [
    ({"init_log_var": 50}, "50"),
    ({"form": "quarter"}, "quarter"),
    ({"init_log_var": "abc"}, "abc"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_options_are_one_line_errors(options, needle):
    with pytest.raises(MtlbenchError) as exc:
        get("optimizer", NAME).resolve_options(options)
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg
