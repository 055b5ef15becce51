"""GradNorm (Chen et al., ICML 2018): the weight gradient by hand, properties, balancing a 10x gradient, both norm
sources, L(0) modes, state, a real run, bad options. (torchjd 0.18 has no GradNorm: nothing to compare with.)"""
from __future__ import annotations

import copy
import functools
import json
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mtlbench.baselines.optimizers.gradnorm import MIN_WEIGHT, gradnorm_weight_grad, renormalize
from mtlbench.errors import MtlbenchError
from mtlbench.optim import StepContext
from mtlbench.registry import get

from conftest import assert_close_fp, grad_scale, build_arch, make_method, short_run, step_context

NAME = "gradnorm"
_method = functools.partial(make_method, NAME)


class Scaled(torch.nn.Module):
    """Two tasks reading one shared feature through the same fixed head: ``L_0 = 10 f``, ``L_1 = f``, so task 0's
    gradient (w.r.t. the features and the shared weights alike) is exactly 10x task 1's, at every step."""

    def __init__(self, d: int = 6, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.task_names = ("big", "small")
        self.trunk = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.Tanh(), torch.nn.Linear(d, d))
        self.register_buffer("u", torch.randn(d))

    def shared_parameters(self):
        return list(self.trunk.parameters())

    def task_parameters(self):
        return {"big": [], "small": []}

    def forward(self, batch):
        f = self.trunk(batch["x"])
        f = f.view_as(f)
        return SimpleNamespace(outputs=[f @ self.u, f @ self.u], features=(f,))


def _ctx(model, step, scales=(10.0, 1.0), gen=None):
    g = torch.Generator().manual_seed(1000 + step)
    batch = {"x": torch.randn(64, 6, generator=g), "y": torch.randn(64, generator=g)}

    def fwd():
        out = model(batch)
        return out, [s * ((o - batch["y"]) ** 2).mean() for s, o in zip(scales, out.outputs)]

    out, losses = fwd()
    return StepContext(model, batch, out, losses, fwd, gen or torch.Generator(), step, 1)


def _run(model, method, steps, lr=0.01, opt=None):
    opt = opt or torch.optim.Adam(model.parameters(), lr=lr)
    trace = []
    for step in steps:
        opt.zero_grad(set_to_none=True)
        method.step(_ctx(model, step))
        opt.step()
        trace.append((method.last_weights.clone(), method.last_grad_norms.clone()))
    return opt, trace


# ---------------------------------------------------------------------------------------------- the formula
def test_weight_gradient_by_hand():
    # w = (1, 1), norms (10, 1), equal loss ratios: G = (10, 1), G_bar = 5.5, targets (5.5, 5.5)
    # L_grad = |10 - 5.5| + |1 - 5.5| = 9; dL/dw = (sign(4.5) * 10, sign(-4.5) * 1) = (10, -1)
    grad, lgrad, targets = gradnorm_weight_grad(torch.ones(2), torch.tensor([10.0, 1.0]), torch.ones(2), 1.5)
    torch.testing.assert_close(grad, torch.tensor([10.0, -1.0], dtype=torch.float64))
    assert float(lgrad) == pytest.approx(9.0)
    torch.testing.assert_close(targets, torch.tensor([5.5, 5.5], dtype=torch.float64))
    # equal norms, loss ratios (2, 1): r = (4/3, 2/3), targets = (4/3)^1.5, (2/3)^1.5 = (1.5396, 0.5443):
    # the slower task (larger ratio) is pulled up, dL/dw = (-1, +1); L_grad = 0.5396 + 0.4557
    grad, lgrad, targets = gradnorm_weight_grad(torch.ones(2), torch.ones(2), torch.tensor([2.0, 1.0]), 1.5)
    torch.testing.assert_close(targets, torch.tensor([(4 / 3) ** 1.5, (2 / 3) ** 1.5], dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([-1.0, 1.0], dtype=torch.float64))
    assert float(lgrad) == pytest.approx((4 / 3) ** 1.5 - 1 + 1 - (2 / 3) ** 1.5)
    # alpha = 0: the targets ignore the training rates (pure gradient-norm equalisation)
    _, _, targets = gradnorm_weight_grad(torch.ones(2), torch.tensor([3.0, 1.0]), torch.tensor([2.0, 1.0]), 0.0)
    torch.testing.assert_close(targets, torch.tensor([2.0, 2.0], dtype=torch.float64))


def test_one_update_by_hand_adam_and_sgd():
    # with norms (10 n, n) and equal ratios the gradient is (10 n, -n) (as above, times n).
    # First Adam step: each weight moves by lr against the sign of its gradient: (1 - 0.025, 1 + 0.025), sum 2.
    # SGD: (1 - 0.025 * 10 n, 1 + 0.025 n), renormalised to sum 2.
    for opt in ("adam", "sgd"):
        m = _method(["big", "small"], optimizer=opt, grad_source="features")
        model = Scaled()
        ctx = _ctx(model, 0)
        n = float(torch.sqrt((ctx.feature_grads()[1][0].double() ** 2).sum()))  # task 1's norm; task 0's is 10x
        if opt == "adam":
            expected = [0.975, 1.025]
        else:
            raw = [1 - 0.025 * 10 * n, 1 + 0.025 * n]
            expected = [2 * v / sum(raw) for v in raw]
        m.step(ctx)
        torch.testing.assert_close(m.last_grad_norms, torch.tensor([10 * n, n], dtype=torch.float64), rtol=1e-5, atol=0)
        torch.testing.assert_close(m.last_weights, torch.ones(2))  # the model update used w(0) = 1
        torch.testing.assert_close(m.weights, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-9)


finite = st.floats(0.05, 20)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(finite, finite, finite), min_size=2, max_size=6), st.floats(0, 3), st.integers(0, 999))
def test_properties_of_the_weight_gradient(rows, alpha, seed):
    w = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    n = torch.tensor([r[1] for r in rows], dtype=torch.float64)
    ratio = torch.tensor([r[2] for r in rows], dtype=torch.float64)
    grad, lgrad, targets = gradnorm_weight_grad(w, n, ratio, alpha)
    diff = w * n - targets
    moving = diff.abs() > 1e-9  # off target: the sign of the gradient is defined (not a rounding artefact)
    # permutation equivariance
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    g2, l2, t2 = gradnorm_weight_grad(w[perm], n[perm], ratio[perm], alpha)
    torch.testing.assert_close(g2[moving[perm]], grad[perm][moving[perm]])
    torch.testing.assert_close(t2, targets[perm])
    assert float(l2) == pytest.approx(float(lgrad), rel=1e-9, abs=1e-12)
    # only relative training rates matter: scaling every loss ratio (e.g. one L(0) convention for all) changes
    # nothing; scaling all gradient norms by c scales the targets and the gradient by c
    g3, _, t3 = gradnorm_weight_grad(w, n, ratio * 7.0, alpha)
    torch.testing.assert_close(g3[moving], grad[moving])
    torch.testing.assert_close(t3, targets)
    g4, _, t4 = gradnorm_weight_grad(w, 3.0 * n, ratio, alpha)
    torch.testing.assert_close(g4[moving], 3.0 * grad[moving])
    torch.testing.assert_close(t4, 3.0 * targets)
    # a small step against the gradient lowers each off-target term |w_i n_i - target_i| (targets fixed) by
    # exactly eta n_i^2
    if bool(moving.any()):
        eta = 0.5 * float((diff.abs()[moving] / n[moving] ** 2).min())
        before = diff.abs()[moving]
        after = ((w - eta * grad) * n - targets).abs()[moving]
        torch.testing.assert_close(after, before - eta * n[moving] ** 2, rtol=1e-9, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-1, 5), min_size=1, max_size=6))
def test_renormalize_sums_to_T_and_floors(values):
    w, clamped = renormalize(torch.tensor(values, dtype=torch.float64))
    assert float(w.sum()) == pytest.approx(len(values), rel=1e-9)
    assert bool((w > 0).all())
    assert clamped == any(v < MIN_WEIGHT for v in values)


# ------------------------------------------------------------------------------------------- the method
@pytest.mark.parametrize("source", ["features", "shared_params"])
def test_balances_a_task_with_10x_larger_gradient(source):
    """Task 0's gradient is exactly 10x task 1's and both train at the same relative rate, so GradNorm's fixed
    point is w_0 * 10 = w_1 with w_0 + w_1 = 2, i.e. w = (2/11, 20/11): the weighted norms become equal."""
    model = Scaled()
    m = _method(["big", "small"], grad_source=source)
    _, trace = _run(model, m, range(120))
    (w0, n0), (wT, nT) = trace[0], trace[-1]
    torch.testing.assert_close(n0[0] / n0[1], torch.tensor(10.0, dtype=torch.float64), rtol=1e-4, atol=0)
    G = [(w.double() * n) for w, n in (trace[0], trace[-1])]
    assert float(G[0][0] / G[0][1]) == pytest.approx(10.0, rel=1e-4)  # unbalanced at the start
    assert 0.75 < float(G[1][0] / G[1][1]) < 1.35  # balanced at the end (Adam hovers around the kink)
    assert abs(float(m.weights[0]) - 2 / 11) < 0.06 and abs(float(m.weights[1]) - 20 / 11) < 0.06
    assert all(float(w.sum()) == pytest.approx(2.0, rel=1e-6) for w, _ in trace)
    assert float(trace[30][0][0]) < float(trace[10][0][0]) < 1.0  # w_0 falls steadily at first


@pytest.mark.parametrize("source", ["features", "shared_params"])
def test_step_on_a_real_arch_writes_the_weighted_update(small_data, source):
    torch.manual_seed(0)
    model = build_arch("mmoe", small_data)
    m = _method(small_data.task_names, grad_source=source)
    m.weights = torch.tensor([0.5, 1.5, 1.0], dtype=torch.float64)
    ctx = step_context(model, small_data, seed=None)
    m.step(ctx)
    torch.testing.assert_close(m.last_weights, torch.tensor([0.5, 1.5, 1.0]))
    assert float(m.weights.sum()) == pytest.approx(3.0) and not torch.allclose(m.weights, m.last_weights.double())
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    _, losses = ctx.forward()
    (torch.tensor([0.5, 1.5, 1.0]) * torch.stack(losses)).sum().backward()
    for g, p in zip(got, model.parameters()):
        assert_close_fp(g, p.grad, scale=grad_scale(got))
    assert m.requires == ({"shared_grads"} if source == "shared_params" else {"features"})


def test_first_epoch_mode_uses_equal_weights_until_the_epoch_mean_is_known():
    model = Scaled()
    m = _method(["big", "small"], initial_loss="first_epoch")
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        m.step(_ctx(model, step))
        opt.step()
        torch.testing.assert_close(m.last_weights, torch.ones(2))
    torch.testing.assert_close(m.weights, torch.ones(2, dtype=torch.float64))
    m.end_epoch(1, {"big": 5.0, "small": 0.5})
    torch.testing.assert_close(m.initial_losses, torch.tensor([5.0, 0.5], dtype=torch.float64))
    opt.zero_grad(set_to_none=True)
    m.step(_ctx(model, 3))
    assert float(m.weights[0]) < 1.0 < float(m.weights[1])


def test_a_task_with_zero_loss_is_left_out_of_the_update():
    grad, lgrad, _ = gradnorm_weight_grad(torch.ones(3), torch.tensor([4.0, 1.0, 9.0]), torch.tensor([1.0, 1.0, 0.0]),
                                          1.5, torch.tensor([True, True, False]))
    # G_bar over tasks 0, 1 only = 2.5: grads (4, -1, 0), L_grad = 1.5 + 1.5
    torch.testing.assert_close(grad, torch.tensor([4.0, -1.0, 0.0], dtype=torch.float64))
    assert float(lgrad) == pytest.approx(3.0)
    # in the method: a batch loss of 0 neither sets L(0) nor moves that task's weight relative to the step
    model = Scaled()
    m = _method(["big", "small"])
    m.step(_ctx(model, 0, scales=(10.0, 0.0)))
    assert math.isnan(float(m.initial_losses[1])) and float(m.initial_losses[0]) > 0
    torch.testing.assert_close(m.weights, torch.ones(2, dtype=torch.float64))  # one active task: on target


def test_a_weight_pushed_below_the_floor_is_clamped_with_a_warning():
    model = Scaled()
    m = _method(["big", "small"], optimizer="sgd", lr=1.0)
    with pytest.warns(RuntimeWarning, match="gradnorm: weight of task"):
        m.step(_ctx(model, 0))
    assert bool((m.weights > 0).all()) and float(m.weights.sum()) == pytest.approx(2.0)
    assert "big" in m.warnings[0] and "step 1" in m.warnings[0]


def test_state_dict_round_trip_restores_behaviour_exactly():
    model = Scaled(seed=2)
    m = _method(["big", "small"])
    opt, _ = _run(model, m, range(6))
    state = json.loads(json.dumps(m.state_dict()))
    model2, m2 = copy.deepcopy(model), _method(["big", "small"])
    m2.load_state_dict(state)
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.01)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    _, t1 = _run(model, m, range(6, 12), opt=opt)
    _, t2 = _run(model2, m2, range(6, 12), opt=opt2)
    for (a, _), (b, _) in zip(t1, t2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(m.weights, m2.weights, rtol=0, atol=0)
    with pytest.raises(ValueError):
        _method(["a", "b", "c"]).load_state_dict(state)


# ------------------------------------------------------------------------------------------ run and options
def test_short_training_run(tmp_path):
    rec = short_run(tmp_path, NAME)
    for entry in rec["curves"]:
        w = entry["task_weights"]
        assert set(w) == {"ctr", "cvr", "ctcvr"} and sum(w.values()) == pytest.approx(3.0, rel=1e-6)
    assert rec["curves"][-1]["task_weights"] != {"ctr": 1.0, "cvr": 1.0, "ctcvr": 1.0}
    assert len(rec["optimizer_state"]["weights"]) == 3


@pytest.mark.parametrize("options, needle", [
    ({"alpha": -1}, "-1"),
    ({"lr": 0}, "0.0"),
    ({"grad_source": "last_layer"}, "last_layer"),
    ({"optimizer": "rmsprop"}, "rmsprop"),
    ({"initial_loss": "log_c"}, "log_c"),
    ({"beta": 1}, "beta"),
])
def test_bad_options_are_one_line_errors(options, needle):
    with pytest.raises(MtlbenchError) as exc:
        get("optimizer", NAME).resolve_options(options)
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg
