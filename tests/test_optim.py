"""The optimizer contract: per-task gradients, writing updates, EW and PCGrad."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mtlbench import optim as optim_mod
from mtlbench.baselines.optimizers.pcgrad import pcgrad_weights

from conftest import assert_close_fp, grad_scale, build_arch, make_method as _method, step_context as _ctx


def test_pcgrad_two_task_by_hand():
    # g1 = (1, 0), g2 = (-1, 1): they conflict (g1.g2 = -1).
    # g1' = g1 - (g1.g2)/|g2|^2 g2 = (1, 0) + 0.5 (-1, 1) = (0.5, 0.5)
    # g2' = g2 - (g2.g1)/|g1|^2 g1 = (-1, 1) + (1, 0) = (0, 1)
    # update = g1' + g2' = (0.5, 1.5) = 2 g1 + 1.5 g2
    J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    w = pcgrad_weights(J @ J.T, torch.Generator().manual_seed(0))
    torch.testing.assert_close(w, torch.tensor([2.0, 1.5], dtype=torch.float64))
    torch.testing.assert_close(w.float() @ J, torch.tensor([0.5, 1.5]))
    mean = pcgrad_weights(J @ J.T, torch.Generator().manual_seed(0), reduction="mean")
    torch.testing.assert_close(mean, torch.tensor([1.0, 0.75], dtype=torch.float64))


def test_pcgrad_no_conflict_is_sum():
    J = torch.tensor([[1.0, 0.2, 0.0], [0.5, 1.0, 0.1], [0.0, 0.3, 2.0]])
    w = pcgrad_weights(J @ J.T, torch.Generator().manual_seed(0))
    torch.testing.assert_close(w, torch.ones(3, dtype=torch.float64))


def _pcgrad_on_vectors(J, orders):
    out = torch.zeros(J.shape[1], dtype=torch.float64)
    J = J.double()
    for i in range(J.shape[0]):
        g = J[i].clone()
        for j in orders[i]:
            if j == i:
                continue
            d = g @ J[j]
            if d < 0:
                g = g - d / (J[j] @ J[j]) * J[j]
        out += g
    return out


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 5), st.integers(2, 8), st.integers(0, 10_000))
def test_pcgrad_gramian_form_equals_vector_form(T, P, seed):
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(T, P, generator=g, dtype=torch.float64)
    orders = [torch.randperm(T, generator=g).tolist() for _ in range(T)]
    w = pcgrad_weights(J @ J.T, orders=orders)
    torch.testing.assert_close(w @ J, _pcgrad_on_vectors(J, orders), rtol=1e-9, atol=1e-9)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10_000))
def test_pcgrad_two_tasks_projected_gradients_do_not_conflict(seed):
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(2, 6, generator=g, dtype=torch.float64)
    w = pcgrad_weights(J @ J.T, torch.Generator().manual_seed(seed))
    # with two tasks the update is g1' + g2' and each projected gradient is orthogonal or aligned to the other
    upd = w @ J
    assert float(upd @ J[0]) >= -1e-9 and float(upd @ J[1]) >= -1e-9


@pytest.mark.parametrize("arch", ["shared_bottom", "mmoe", "home"])
def test_jacobian_rows_are_per_task_gradients(arch, small_data):
    torch.manual_seed(0)
    model = build_arch(arch, small_data)
    ctx = _ctx(model, small_data)
    J = ctx.jacobian()
    shared = model.shared_parameters()
    assert J.shape == (len(small_data.tasks), sum(p.numel() for p in shared))
    for t, loss in enumerate(ctx.losses):
        grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        row = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(shared, grads)])
        assert_close_fp(J[t], row, scale=grad_scale([J]))


def test_batched_and_looped_vjp_agree(small_data, monkeypatch):
    torch.manual_seed(0)
    model = build_arch("mmoe", small_data)
    J1 = _ctx(model, small_data).jacobian()
    monkeypatch.setattr(optim_mod, "_BATCHED_VJP_OK", False)
    J2 = _ctx(model, small_data).jacobian()
    assert_close_fp(J1, J2)


def test_ew_equals_sum_of_losses(small_data):
    torch.manual_seed(0)
    model = build_arch("mmoe", small_data)
    ctx = _ctx(model, small_data)
    _method("ew", small_data.task_names).step(ctx)
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    _, losses = _ctx(model, small_data).forward()
    torch.stack(losses).sum().backward()
    for g, p in zip(got, model.parameters()):
        assert_close_fp(g, p.grad, scale=grad_scale(got))


def test_set_grads_with_jacobian_sum_equals_ew(small_data):
    """J^T 1 with unit head weights is exactly equal weighting: the fast path writes the right update."""
    torch.manual_seed(0)
    model = build_arch("home", small_data)
    ctx = _ctx(model, small_data)
    J = ctx.jacobian()
    ctx.set_grads(J.sum(0))
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    _, losses = _ctx(model, small_data).forward()
    torch.stack(losses).sum().backward()
    for g, p in zip(got, model.parameters()):
        assert_close_fp(g, p.grad, scale=grad_scale(got))


def test_pcgrad_step_sets_projected_update(small_data):
    torch.manual_seed(0)
    model = build_arch("shared_bottom", small_data)
    ctx = _ctx(model, small_data, seed=5)
    J = ctx.jacobian().clone()
    method = _method("pcgrad", small_data.task_names)
    method.step(ctx)
    got = torch.cat([p.grad.reshape(-1) for p in model.shared_parameters()])
    w = pcgrad_weights(J @ J.T, torch.Generator().manual_seed(5))
    assert_close_fp(got, w.float() @ J)
    torch.testing.assert_close(method.last_weights, w.float())


def test_pcgrad_refuses_an_arch_without_shared_parameters(small_data):
    from mtlbench.errors import MtlbenchError
    from mtlbench.optim import check_compatible

    model = build_arch("single", small_data)
    with pytest.raises(MtlbenchError, match="shares none"):
        check_compatible(_method("pcgrad", small_data.task_names), model, "pcgrad", "single")


@pytest.mark.parametrize("T", [9, 32, 139])
def test_pcgrad_at_many_tasks_is_the_same_projection_all_at_once(T):
    """Issue 16: past LOOP_MAX_TASKS the projections run for every task at once; with the same orders they equal
    the scalar loop on vectors (float64 round-off of T-term inner products), and 139 tasks take well under a
    second (the loop took minutes per epoch)."""
    import time

    from mtlbench.baselines.optimizers import pcgrad as pc

    g = torch.Generator().manual_seed(T)
    J = torch.randn(T, 40, generator=g, dtype=torch.float64) + 0.3 * torch.randn(1, 40, generator=g,
                                                                                  dtype=torch.float64)
    orders = [torch.randperm(T, generator=g).tolist() for _ in range(T)]
    t0 = time.perf_counter()
    w = pcgrad_weights(J @ J.T, orders=orders)
    elapsed = time.perf_counter() - t0
    ref = _pcgrad_on_vectors(J, orders)
    assert_close_fp(w @ J, ref, ulps=64 * T)
    assert elapsed < 2.0
    # the generator path draws the same orders as the loop would
    w1 = pcgrad_weights(J @ J.T, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    w2 = pc._projected_all_at_once((J @ J.T), [[j for j in torch.randperm(T, generator=gen).tolist() if j != i]
                                               for i in range(T)])
    torch.testing.assert_close(w1, w2, rtol=0, atol=0)
