"""DWA (Liu et al., CVPR 2019): weights by hand, properties, epochs 1-2, torchjd equivalence, state, run, options."""
from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mtlbench.baselines.optimizers.dwa import dwa_weights
from mtlbench.errors import MtlbenchError
from mtlbench.registry import get

from conftest import Toy, make_method, short_run, toy_context as _toy_ctx

NAME = "dwa"
_method = functools.partial(make_method, NAME)


# ---------------------------------------------------------------------------------------------- the formula
def test_weights_by_hand():
    # L(t-2) = (2, 4), L(t-1) = (1, 4): ratios r = (0.5, 1.0), T = 2, K = 2
    # w = 2 * (e^0.25, e^0.5) / (e^0.25 + e^0.5) = (0.875651..., 1.124348...): the stalled task gets more weight
    w = dwa_weights(torch.tensor([1.0, 4.0]), torch.tensor([2.0, 4.0]), 2.0)
    e1, e2 = math.exp(0.25), math.exp(0.5)
    torch.testing.assert_close(w, torch.tensor([2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)], dtype=torch.float64))
    # equal ratios -> all ones, whatever the loss scales
    torch.testing.assert_close(dwa_weights(torch.tensor([1.0, 10.0, 0.1]), torch.tensor([2.0, 20.0, 0.2])),
                               torch.ones(3, dtype=torch.float64))


ratios = st.lists(st.tuples(st.floats(0.2, 5), st.floats(0.2, 5)), min_size=2, max_size=6)


@settings(max_examples=50, deadline=None)
@given(ratios, st.floats(0.5, 10), st.integers(0, 1000))
def test_weights_sum_to_K_are_positive_permutation_equivariant_and_scale_free(pairs, temp, seed):
    old = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    prev = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    w = dwa_weights(prev, old, temp)
    K = len(pairs)
    assert float(w.sum()) == pytest.approx(K, rel=1e-12)
    assert bool((w > 0).all())
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(dwa_weights(prev[perm], old[perm], temp), w[perm])
    # scaling one task's losses (both epochs) by any c > 0 leaves every weight unchanged: only rates matter
    c = torch.ones(K, dtype=torch.float64)
    c[int(perm[0])] = 37.0
    torch.testing.assert_close(dwa_weights(prev * c, old * c, temp), w)
    # larger ratio (slower decrease) -> larger weight
    r = prev / old
    i, j = int(r.argmax()), int(r.argmin())
    assert float(w[i]) >= float(w[j])


def test_temperature_limits():
    prev, old = torch.tensor([1.0, 3.0, 2.0]), torch.tensor([2.0, 2.0, 2.0])
    torch.testing.assert_close(dwa_weights(prev, old, 1e6), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(dwa_weights(prev, old, 1e-3), torch.tensor([0.0, 3.0, 0.0], dtype=torch.float64))


def test_non_positive_older_loss_counts_as_ratio_one_with_a_warning():
    w = dwa_weights(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(w, torch.ones(2, dtype=torch.float64))
    m = _method(["a", "b"])
    m.end_epoch(1, {"a": 0.0, "b": 1.0})
    with pytest.warns(RuntimeWarning, match="dwa"):
        m.end_epoch(2, {"a": 0.5, "b": 0.5})
    assert len(m.warnings) == 1 and "a" in m.warnings[0]
    assert torch.isfinite(m.current_weights()).all()


# ------------------------------------------------------------------------------------------- the method
def test_first_two_epochs_are_ones_then_weights_sum_to_T():
    m = _method(["a", "b", "c"])
    model = Toy(3)
    seen = []
    history = [{"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 0.5, "b": 1.9, "c": 3.0}, {"a": 0.4, "b": 1.0, "c": 2.5},
               {"a": 0.39, "b": 0.9, "c": 1.0}]
    for epoch, losses in enumerate(history, start=1):
        for step in range(2):
            model.zero_grad(set_to_none=True)
            m.step(_toy_ctx(model, step, [1.0, 1.0, 1.0]))
            seen.append(m.last_weights.clone())
        m.end_epoch(epoch, losses)
    torch.testing.assert_close(torch.stack(seen[:4]), torch.ones(4, 3))  # epochs 1 and 2
    for w in seen[4:]:
        assert float(w.sum()) == pytest.approx(3.0, rel=1e-6)
        assert not torch.allclose(w, torch.ones(3))
    # epoch 3 uses L(2)/L(1) = (0.5, 0.95, 1.0): task c (no progress) has the largest weight, a the smallest
    w3 = seen[4]
    assert float(w3[2]) > float(w3[1]) > float(w3[0])
    torch.testing.assert_close(w3, dwa_weights(torch.tensor([0.5, 1.9, 3.0]), torch.tensor([1.0, 2.0, 3.0])).float())


def test_step_writes_the_weighted_sum_gradient():
    m = _method(["t0", "t1"])
    m.end_epoch(1, {"t0": 1.0, "t1": 1.0})
    m.end_epoch(2, {"t0": 0.2, "t1": 0.9})
    w = m.current_weights()
    model = Toy(2)
    ctx = _toy_ctx(model, 0, [1.0, 3.0])
    m.step(ctx)
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    _, losses = ctx.forward()
    (w * torch.stack(losses)).sum().backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_matches_torchjd_dwa_over_epochs():
    """torchjd's DWA averages the batch losses it sees; mtlbench's loop passes the same epoch means to end_epoch.
    The weights must agree every epoch (read torchjd's as the gradient of its scalarisation w.r.t. the losses)."""
    from torchjd.scalarization import DWA

    gen = torch.Generator().manual_seed(0)
    tjd = DWA(temperature=2.0)
    ours = _method(["a", "b", "c"])
    worst = 0.0
    for epoch in range(1, 7):
        batches = torch.rand(5, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.1]) / epoch ** \
            torch.tensor([0.3, 1.0, 2.0])
        for b in batches:
            v = b.clone().requires_grad_()
            (w_tjd,) = torch.autograd.grad(tjd(v), v)
            worst = max(worst, float((ours.current_weights().double() - w_tjd).abs().max()))
        tjd.step()
        ours.end_epoch(epoch, {n: float(x) for n, x in zip(["a", "b", "c"], batches.mean(0))})
    assert worst < 1e-6, worst


def test_state_dict_round_trip_restores_behaviour_exactly():
    m = _method(["a", "b"], temperature=1.5)
    for e, losses in enumerate([{"a": 1.0, "b": 1.0}, {"a": 0.7, "b": 0.9}, {"a": 0.6, "b": 0.5}], start=1):
        m.end_epoch(e, losses)
    state = json.loads(json.dumps(m.state_dict()))
    m2 = _method(["a", "b"], temperature=1.5)
    m2.load_state_dict(state)
    torch.testing.assert_close(m2.current_weights(), m.current_weights(), rtol=0, atol=0)
    m.end_epoch(4, {"a": 0.59, "b": 0.2})
    m2.end_epoch(4, {"a": 0.59, "b": 0.2})
    torch.testing.assert_close(m2.current_weights(), m.current_weights(), rtol=0, atol=0)
    with pytest.raises(ValueError):
        _method(["a", "b", "c"]).load_state_dict(state)


# ------------------------------------------------------------------------------------------ run and options
def test_short_training_run(tmp_path):
    rec = short_run(tmp_path, NAME)
    assert [e["task_weights"] for e in rec["curves"]] == [{"ctr": 1.0, "cvr": 1.0, "ctcvr": 1.0}] * 2
    hist = rec["optimizer_state"]["history"]  # the selected epoch's state: one or two epoch averages
    assert 1 <= len(hist) <= 2 and all(len(h) == 3 and all(v > 0 for v in h) for h in hist)


@pytest.mark.parametrize("options, needle", [
    ({"temperature": 0}, "0.0"),
    ({"temperature": -1.5}, "-1.5"),
    ({"temperature": "hot"}, "hot"),
    ({"temp": 2}, "temp"),
])
def test_bad_options_are_one_line_errors(options, needle):
    with pytest.raises(MtlbenchError) as exc:
        get("optimizer", NAME).resolve_options(options)
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg
