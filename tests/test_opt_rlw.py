"""RLW (Lin et al., TMLR 2022): distributions, reproducibility, torchjd equivalence, a real run, bad options."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mtlbench.baselines.optimizers.rlw import DISTRIBUTIONS, rlw_weights
from mtlbench.errors import MtlbenchError
from mtlbench.registry import get

from conftest import Toy, make_method, short_run, toy_context as _toy_ctx

NAME = "rlw"
_method = functools.partial(make_method, NAME)


# ---------------------------------------------------------------------------------------------- the draws
def test_default_is_softmax_of_standard_normal_by_hand():
    # the same generator state gives the same N(0, I) sample; RLW's weights are its softmax
    z = torch.randn(4, generator=torch.Generator().manual_seed(11))
    w = rlw_weights(4, torch.Generator().manual_seed(11))
    torch.testing.assert_close(w, torch.exp(z) / torch.exp(z).sum())
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(0, 10_000), st.sampled_from(DISTRIBUTIONS))
def test_every_distribution_gives_valid_weights(T, seed, dist):
    w = rlw_weights(T, torch.Generator().manual_seed(seed), dist)
    assert w.shape == (T,) and bool(torch.isfinite(w).all()) and bool((w >= 0).all())
    if dist in ("normal", "uniform", "dirichlet"):  # softmax-normalised: positive, sum 1
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-6) and bool((w > 0).all())
    if dist == "uniform":  # softmax of values in [0, 1): every weight within [1/(1+(T-1)e), e/(e+T-1)]
        assert float(w.max()) <= math.e / (math.e + T - 1) + 1e-6
        assert float(w.min()) >= 1 / (1 + (T - 1) * math.e) - 1e-6
    if dist == "bernoulli":
        assert set(w.tolist()) <= {0.0, 1.0} and float(w.sum()) >= 1
    if dist == "constrained_bernoulli":
        assert sorted(w.tolist()) == [0.0] * (T - 1) + [1.0]


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_weights_are_exchangeable_on_average(dist):
    # no task is favoured: over many draws each task's mean weight is the same (1/T for the normalised ones)
    g = torch.Generator().manual_seed(3)
    W = torch.stack([rlw_weights(3, g, dist) for _ in range(3000)])
    mean = W.mean(0)
    assert float(mean.max() - mean.min()) < 0.04
    if dist in ("normal", "uniform", "dirichlet", "constrained_bernoulli"):
        torch.testing.assert_close(mean, torch.full((3,), 1 / 3), atol=0.03, rtol=0)
    if dist == "bernoulli":  # Bernoulli(1/2) conditioned on not all zero: mean (1/2) / (1 - 1/8) = 4/7
        torch.testing.assert_close(mean, torch.full((3,), 4 / 7), atol=0.03, rtol=0)


def test_matches_torchjd_random():
    """torchjd's ``Random`` draws ``softmax(torch.randn(T))`` from the global RNG; seeding the global RNG and our
    generator identically must give identical weights (both sum to 1: same convention, no rescaling)."""
    from torchjd.aggregation._random import RandomWeighting
    from torchjd.scalarization import Random

    worst = 0.0
    for seed in range(20):
        ours = rlw_weights(5, torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)
        theirs = RandomWeighting()(torch.zeros(5, 3))
        worst = max(worst, float((ours - theirs).abs().max()))
        L = torch.rand(5, generator=torch.Generator().manual_seed(100 + seed), requires_grad=True)
        torch.manual_seed(seed)
        (g,) = torch.autograd.grad(Random()(L), L)  # the scalariser's weights
        worst = max(worst, float((ours - g).abs().max()))
    assert worst < 1e-6, worst


# ------------------------------------------------------------------------------------------- the method
def test_reproducible_from_the_generator_and_different_across_seeds():
    def weights(seed, steps=6):
        m = _method(["t0", "t1", "t2"])
        model = Toy(3)
        gen = torch.Generator().manual_seed(seed)
        out = []
        for step in range(steps):
            model.zero_grad(set_to_none=True)
            m.step(_toy_ctx(model, step, [1.0, 1.0, 1.0], gen))
            out.append(m.last_weights.clone())
        return torch.stack(out)

    a, b, c = weights(0), weights(0), weights(1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    assert len({tuple(r.tolist()) for r in a}) == len(a)  # fresh weights every step
    assert _method(["a"]).state_dict() == {}  # no hidden RNG state: the run's generator carries it all


def test_step_writes_the_weighted_sum_gradient_and_scale_option():
    model = Toy(2)
    for scale, total in (("one", 1.0), ("n_tasks", 2.0)):
        m = _method(["t0", "t1"], scale=scale)
        ctx = _toy_ctx(model, 0, [1.0, 3.0], torch.Generator().manual_seed(4))
        model.zero_grad(set_to_none=True)
        m.step(ctx)
        w = m.last_weights
        assert float(w.sum()) == pytest.approx(total, rel=1e-6)
        torch.testing.assert_close(w, total * rlw_weights(2, torch.Generator().manual_seed(4)))
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        _, losses = ctx.forward()
        (w * torch.stack(losses)).sum().backward()
        for g, p in zip(got, model.parameters()):
            torch.testing.assert_close(g, p.grad)


def test_as_an_aggregator_it_is_random_gradient_weighting():
    J = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    upd, w = _method(["a", "b", "c"]).aggregate(J, torch.ones(3), torch.Generator().manual_seed(9))
    torch.testing.assert_close(w, rlw_weights(3, torch.Generator().manual_seed(9)))
    torch.testing.assert_close(upd, w @ J)


# ------------------------------------------------------------------------------------------ run and options
def test_short_training_run(tmp_path):
    rec = short_run(tmp_path, NAME)
    for entry in rec["curves"]:
        w = entry["task_weights"]  # epoch means of weights summing to 1 each step
        assert set(w) == {"ctr", "cvr", "ctcvr"} and sum(w.values()) == pytest.approx(1.0, abs=1e-6)
        assert len(set(w.values())) == 3


@pytest.mark.parametrize("options, needle", [
    ({"distribution": "gaussian"}, "gaussian"),
    ({"scale": "two"}, "two"),
    ({"dist": "normal"}, "dist"),
])
def test_bad_options_are_one_line_errors(options, needle):
    with pytest.raises(MtlbenchError) as exc:
        get("optimizer", NAME).resolve_options(options)
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg
