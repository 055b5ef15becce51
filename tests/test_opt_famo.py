"""FAMO (Liu et al., NeurIPS 2023): formulas by hand, properties, weight shift, both loss sources against torchjd's
FAMO over a training run, bounds, state, a real run, bad options."""
from __future__ import annotations

import copy
import functools
import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mtlbench.baselines.optimizers.famo import famo_coefficients, famo_logit_grad
from mtlbench.errors import MtlbenchError
from mtlbench.registry import get

from conftest import Toy, assert_close_fp, grad_scale, make_method, short_run, toy_context

NAME = "famo"
_method = functools.partial(make_method, NAME)

SCALES = [1.0, 20.0]  # toy losses: task t's is ``SCALES[t] * MSE`` (always > 0)


def _ctx(model, step, scales=SCALES):
    return toy_context(model, step, scales)


def _train(model, method, steps, opt=None):
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.01)
    for step in steps:
        opt.zero_grad(set_to_none=True)
        ctx = _ctx(model, step)
        method.step(ctx)
        opt.step()
        method.after_step(ctx)
    return opt


# ---------------------------------------------------------------------------------------------- the formulas
def test_coefficients_and_logit_step_by_hand():
    # xi = 0, L = (1, 2): z = (1/2, 1/2), c = 1 / (0.5/1 + 0.5/2) = 4/3, coefficients c z / L = (2/3, 1/3)
    torch.testing.assert_close(famo_coefficients(torch.zeros(2), torch.tensor([1.0, 2.0])),
                               torch.tensor([2 / 3, 1 / 3], dtype=torch.float64), rtol=1e-7, atol=0)
    # losses (1, 1) -> (0.5, 1): delta = (log 2, 0), z.delta = log(2)/2, grad = z (delta - z.delta) = (+-log(2)/4)
    g = famo_logit_grad(torch.zeros(2), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(g, torch.tensor([math.log(2) / 4, -math.log(2) / 4], dtype=torch.float64))
    # one Adam step from xi = 0 (no decay at 0) moves each logit by lr against its gradient's sign:
    # xi = (-0.025, 0.025): task 1, whose loss did not decrease, now weighs more
    m = _method(["a", "b"])
    m.update_logits(torch.tensor([1.0, 1.0]), torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(m.logits, torch.tensor([-0.025, 0.025], dtype=torch.float64))
    # the paper's Algorithm 1 (sgd): xi = -lr (g + gamma * 0)
    m = _method(["a", "b"], logit_optimizer="sgd", lr=0.5)
    m.update_logits(torch.tensor([1.0, 1.0]), torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(m.logits, -0.5 * g)


losses_st = st.lists(st.tuples(st.floats(0.01, 50), st.floats(0.01, 50), st.floats(-2, 2)), min_size=2, max_size=6)


@settings(max_examples=50, deadline=None)
@given(losses_st, st.integers(0, 999), st.floats(0.1, 100))
def test_properties(rows, seed, k):
    before = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    after = torch.tensor([r[1] for r in rows], dtype=torch.float64)
    xi = torch.tensor([r[2] for r in rows], dtype=torch.float64)
    coef = famo_coefficients(xi, before)
    # a convex combination of the task gradients
    assert float(coef.sum()) == pytest.approx(1.0, rel=1e-12) and bool((coef > 0).all())
    g = famo_logit_grad(xi, before, after)
    assert float(g.sum()) == pytest.approx(0.0, abs=1e-12)  # softmax Jacobian: logits only move relatively
    # permutation equivariance
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(famo_coefficients(xi[perm], before[perm]), coef[perm])
    torch.testing.assert_close(famo_logit_grad(xi[perm], before[perm], after[perm]), g[perm])
    # scaling one task's loss by k leaves the update direction unchanged up to a positive factor (grad of
    # log(k L) = grad of log L; only c changes): the coefficients times the scales are proportional to the old
    # ones; its log-decrease, hence the logit gradient, is unchanged
    s = torch.ones(len(rows), dtype=torch.float64)
    s[int(perm[0])] = k
    scaled = famo_coefficients(xi, before * s) * s
    # (exact up to the 1e-8 offset inside the log: ~1e-5 relative for scaled losses down to 1e-3)
    torch.testing.assert_close(scaled / scaled.sum(), coef, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(famo_logit_grad(xi, before * s, after * s), g, rtol=1e-4, atol=3e-5)
    # a task whose loss fell more (relative) than all others sees its logit gradient positive (weight goes down)
    i = int(torch.argmax(torch.log(before) - torch.log(after)))
    if float((torch.log(before) - torch.log(after))[i]) > float((torch.log(before) - torch.log(after)).min()) + 1e-6:
        assert float(g[i]) > 0


def test_losses_at_the_bound_are_left_out():
    # task 1 has no labelled rows (loss 0): coefficient 0, c over the others; its delta is 0
    coef = famo_coefficients(torch.zeros(3), torch.tensor([1.0, 0.0, 3.0]))
    torch.testing.assert_close(coef, torch.tensor([0.75, 0.0, 0.25], dtype=torch.float64))
    g = famo_logit_grad(torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.5, 0.7, 1.0]))
    d = torch.tensor([math.log(2), 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(g, (d - d.mean()) / 3)
    m = _method(["t0", "t1"])
    model = Toy(2)
    with pytest.warns(RuntimeWarning, match="famo: loss of task"):
        m.step(_ctx(model, 0, scales=[1.0, 0.0]))
    torch.testing.assert_close(m.last_weights, torch.tensor([1.0, 0.0]))
    assert "t1" in m.warnings[0] and "step 1" in m.warnings[0]


# ------------------------------------------------------------------------------------------- the method
def test_step_gradient_is_the_gradient_of_c_sum_z_log_l():
    m = _method(["t0", "t1"])
    m.logits = torch.tensor([0.3, -0.4], dtype=torch.float64)
    model = Toy(2)
    ctx = _ctx(model, 0)
    m.step(ctx)
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    _, losses = ctx.forward()
    L = torch.stack(losses)
    z = torch.softmax(torch.tensor([0.3, -0.4]), 0)
    D = L + 1e-8
    c = 1 / (z / D).sum().detach()
    (c * (z * torch.log(D)).sum()).backward()
    for a, p in zip(got, model.parameters()):
        assert_close_fp(a, p.grad, scale=grad_scale(got))
    assert float(m.last_weights.sum()) == pytest.approx(1.0, rel=1e-6)
    m2 = _method(["t0", "t1"], log_weights="softmax")
    m2.logits = torch.tensor([0.3, -0.4], dtype=torch.float64)
    m2.step(_ctx(model, 0))
    torch.testing.assert_close(m2.last_weights, z)


@pytest.mark.parametrize("extra_forward", [False, True])
def test_weights_shift_toward_the_task_whose_loss_decreases_slower(extra_forward):
    """Task 0's head learns fast (large head learning rate), task 1's barely moves: FAMO must move weight to 1."""
    torch.manual_seed(0)
    model = Toy(2, seed=5)
    m = _method(["t0", "t1"], extra_forward=extra_forward)
    opt = torch.optim.SGD([{"params": model.trunk.parameters(), "lr": 0.0},
                           {"params": model.heads[0].parameters(), "lr": 0.05},
                           {"params": model.heads[1].parameters(), "lr": 0.0}])
    zs = []
    for step in range(25):
        opt.zero_grad(set_to_none=True)
        ctx = _ctx(model, step % 3, scales=[1.0, 1.0])  # 3 batches cycling: the next-batch variant sees noise
        m.step(ctx)
        opt.step()
        m.after_step(ctx)
        zs.append(m.z.clone())
    assert float(zs[-1][1]) > 0.55 and float(zs[-1][1]) > float(zs[5][1]) > 0.5


def _tjd_train(model, steps, extra_forward):
    """The reference procedure with torchjd's FAMO (lr 0.025, weight decay 1e-3, same defaults)."""
    from torchjd.scalarization import FAMO as TJDFAMO

    famo = TJDFAMO(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in steps:
        ctx = _ctx(model, step)
        L = torch.stack(ctx.losses)
        if not extra_forward and step > 0:
            famo.update(L.detach())  # the previous step's losses against this batch's, before weighting
        opt.zero_grad(set_to_none=True)
        famo(L).backward()
        opt.step()
        if extra_forward:
            with torch.no_grad():
                _, new = ctx.forward()
            famo.update(torch.stack(new))
    return famo


@pytest.mark.parametrize("extra_forward", [True, False])
def test_matches_torchjd_famo_over_a_training_run(extra_forward):
    """Same model, batches and optimizer: mtlbench's FAMO and torchjd's (driven as the official code does, or with
    the next batch's losses) give the same parameters and logits; torchjd's coefficients also sum to 1."""
    model_a, model_b = Toy(2, seed=7), Toy(2, seed=7)
    ours = _method(["t0", "t1"], extra_forward=extra_forward)
    _train(model_a, ours, range(30))
    famo = _tjd_train(model_b, range(30), extra_forward)
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(model_a.parameters(), model_b.parameters()))
    diff = max(diff, float((ours.logits.float() - famo._w.detach()).abs().max()))
    assert diff < 1e-5, diff
    assert float(ours.logits.abs().max()) > 1e-3  # the logits did move


def test_state_dict_round_trip_restores_behaviour_exactly():
    for extra_forward in (False, True):
        model = Toy(2, seed=2)
        m = _method(["t0", "t1"], extra_forward=extra_forward)
        opt = _train(model, m, range(6))
        state = json.loads(json.dumps(m.state_dict()))
        model2 = copy.deepcopy(model)
        m2 = _method(["t0", "t1"], extra_forward=extra_forward)
        m2.load_state_dict(state)
        opt2 = torch.optim.SGD(model2.parameters(), lr=0.01)
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
        for step in range(6, 12):
            for mod, meth, o in ((model, m, opt), (model2, m2, opt2)):
                o.zero_grad(set_to_none=True)
                ctx = _ctx(mod, step)
                meth.step(ctx)
                o.step()
                meth.after_step(ctx)
            torch.testing.assert_close(m.last_weights, m2.last_weights, rtol=0, atol=0)
        torch.testing.assert_close(m.logits, m2.logits, rtol=0, atol=0)
    with pytest.raises(ValueError):
        _method(["a", "b", "c"]).load_state_dict(state)


# ------------------------------------------------------------------------------------------ run and options
def test_short_training_run(tmp_path):
    rec = short_run(tmp_path, NAME)
    for entry in rec["curves"]:
        w = entry["task_weights"]  # effective coefficients: each step's sum to 1
        assert set(w) == {"ctr", "cvr", "ctcvr"} and sum(w.values()) == pytest.approx(1.0, rel=1e-5)
    assert len(rec["optimizer_state"]["logits"]) == 3 and any(v != 0 for v in rec["optimizer_state"]["logits"])


@pytest.mark.parametrize("options, needle", [
    ({"lr": -1}, "-1"),
    ({"gamma": -0.1}, "-0.1"),
    ({"extra_forward": "maybe"}, "maybe"),
    ({"logit_optimizer": "rmsprop"}, "rmsprop"),
    ({"log_weights": "raw"}, "raw"),
    ({"w_lr": 0.01}, "w_lr"),
])
def test_bad_options_are_one_line_errors(options, needle):
    with pytest.raises(MtlbenchError) as exc:
        get("optimizer", NAME).resolve_options(options)
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg


def test_default_is_the_official_same_batch_update():
    """Issue 14: by default L^after is the SAME batch's losses at the updated parameters (one extra forward after
    the step, as the official code, LibMTL and torchjd), so the first step already updates the logits by exactly
    the same-batch decrease; the next-batch variant (``extra_forward=false``) has nothing to compare after one step."""
    model = Toy(2, seed=3)
    m = _method(["t0", "t1"])
    assert m.options.extra_forward is True
    calls = []
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ctx = _ctx(model, 0)
    forward = ctx.forward
    ctx.forward = lambda: calls.append(1) or forward()
    before = torch.stack([l.detach() for l in ctx.losses]).double()
    opt.zero_grad(set_to_none=True)
    m.step(ctx)
    opt.step()
    m.after_step(ctx)
    assert len(calls) == 1  # exactly one extra forward, after the parameter step
    with torch.no_grad():
        after = torch.stack([l.detach() for l in _ctx(model, 0).losses]).double()  # same batch, updated weights
    ref = _method(["t0", "t1"])
    ref.update_logits(before, after)
    torch.testing.assert_close(m.logits, ref.logits, rtol=0, atol=0)
    assert not torch.equal(m.logits, torch.zeros(2, dtype=torch.float64))
    cheap = _method(["t0", "t1"], extra_forward=False)
    model_b = Toy(2, seed=3)
    _train(model_b, cheap, range(1))
    assert torch.equal(cheap.logits, torch.zeros(2, dtype=torch.float64))  # next-batch variant: no update yet
