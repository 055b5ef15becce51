"""F-MTL (fmtl): per-task SAM, loss and flat gradients aggregated separately."""
from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from mtlbench.arch import ArchOutput
from mtlbench.baselines.optimizers.fmtl import fmtl_update, sam_perturbation
from mtlbench.baselines.optimizers.pcgrad import pcgrad_weights
from mtlbench.errors import MtlbenchError
from mtlbench.optim import StepContext
from mtlbench.registry import get

from conftest import build_arch, make_method, short_run, step_context

_method = functools.partial(make_method, "fmtl")
_ctx = functools.partial(step_context, n=256)  # a larger batch than the other optimizers' tests


# ------------------------------------------------------------------------------------------- SAM step itself

def test_sam_perturbation_by_hand():
    # SAM: g = (3, 4), ||g|| = 5, rho = 1 -> eps = (0.6, 0.8), normalised over the whole group of tensors
    w = [torch.tensor([1.0, 2.0], dtype=torch.float64)]
    g = [torch.tensor([3.0, 4.0], dtype=torch.float64)]
    (eps,) = sam_perturbation(w, g, rho=1.0)
    torch.testing.assert_close(eps, torch.tensor([0.6, 0.8], dtype=torch.float64), rtol=0, atol=1e-12)
    # ASAM (eta = 0): T = |w| = (1, 2); T g = (3, 8), ||T g|| = sqrt(73); eps = rho T^2 g / ||T g|| = (3, 16)/sqrt 73
    (eps,) = sam_perturbation(w, g, rho=1.0, adaptive=True)
    torch.testing.assert_close(eps, torch.tensor([3.0, 16.0], dtype=torch.float64) / math.sqrt(73), rtol=0,
                               atol=1e-12)
    # two tensors share one norm: g = (3), (4) -> (0.6), (0.8); a missing gradient counts as zero
    e1, e2, e3 = sam_perturbation([w[0][:1], w[0][1:], w[0]], [g[0][:1], g[0][1:], None], rho=2.0)
    torch.testing.assert_close(torch.cat([e1, e2]), torch.tensor([1.2, 1.6], dtype=torch.float64))
    assert torch.equal(e3, torch.zeros(2, dtype=torch.float64))


# --------------------------------------------------------------------- hand check on a tiny quadratic model

class Quadratic(nn.Module):
    """T tasks, shared w in R^2 (the feature), head a_t in R^2:
    L_t = 0.5 |w - c_t|^2 + 0.5 |a_t - d_t|^2 + gamma w . a_t (a quadratic, so SAM gradients are exact)."""

    def __init__(self, c, d, gamma, w, a):
        super().__init__()
        self.task_names = tuple(f"t{i}" for i in range(len(c)))
        self.shared = nn.ParameterDict({"w": nn.Parameter(w.clone())})
        self.heads = nn.ModuleDict({n: nn.ParameterDict({"a": nn.Parameter(a[i].clone())})
                                    for i, n in enumerate(self.task_names)})
        self.c, self.d, self.gamma = c, d, gamma

    def shared_parameters(self):
        return [self.shared["w"]]

    def task_parameters(self):
        return {n: [self.heads[n]["a"]] for n in self.task_names}

    def forward(self, batch=None):
        z = self.shared["w"].view(1, 2).view_as(self.shared["w"].view(1, 2))
        outs = []
        for i, n in enumerate(self.task_names):
            a = self.heads[n]["a"]
            outs.append(0.5 * ((z[0] - self.c[i]) ** 2).sum() + 0.5 * ((a - self.d[i]) ** 2).sum()
                        + self.gamma * (z[0] * a).sum())
        return ArchOutput(outs, (z,))


def _quadratic_ctx(model, seed=0):
    def fwd():
        out = model()
        return out, list(out.outputs)

    out, losses = fwd()
    return StepContext(model, {}, out, losses, fwd, torch.Generator().manual_seed(seed), 0, 1)


@pytest.mark.parametrize("adaptive,perturb_heads,eta,mode", [
    (False, True, 0.0, "decomposed"), (True, True, 0.0, "decomposed"), (True, True, 0.01, "decomposed"),
    (False, False, 0.0, "decomposed"), (True, True, 0.0, "direct")])
def test_quadratic_model_by_hand(adaptive, perturb_heads, eta, mode):
    f64 = dict(dtype=torch.float64)
    c = torch.tensor([[1.0, -2.0], [0.5, 3.0]], **f64)
    d = torch.tensor([[0.0, 1.0], [-1.0, 2.0]], **f64)
    w = torch.tensor([0.3, -0.7], **f64)
    a = torch.tensor([[0.2, 0.4], [-0.6, 1.1]], **f64)
    gamma, rho, rho_head = 0.5, 0.3, 0.2
    model = Quadratic(c, d, gamma, w, a)
    method = _method(model.task_names, rho=rho, rho_head=rho_head, adaptive=adaptive, eta=eta,
                     perturb_heads=perturb_heads, mode=mode)
    method.step(_quadratic_ctx(model))

    # closed form: the Hessian of L_t is [[I, gamma I], [gamma I, I]], so at the perturbed point
    # g_w' = g_w + eps_w + gamma eps_a and g_a' = g_a + eps_a + gamma eps_w (exact for a quadratic)
    def eps(p, g, r):
        if not adaptive:
            return r * g / g.norm()
        s = p.abs() + eta
        return r * s * s * g / (s * g).norm()

    shared_expected = torch.zeros(2, **f64)
    for t in range(2):
        g_w = w - c[t] + gamma * a[t]
        g_a = a[t] - d[t] + gamma * w
        e_w = eps(w, g_w, rho)
        e_a = eps(a[t], g_a, rho_head) if perturb_heads else torch.zeros(2, **f64)
        # EW aggregator: sum_t g_w + sum_t (g_w' - g_w) = sum_t g_w' (and "direct" mode: sum_t g_w' as well)
        shared_expected += g_w + e_w + gamma * e_a
        head = model.heads[f"t{t}"]["a"]
        torch.testing.assert_close(head.grad, g_a + e_a + gamma * e_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.shared["w"].grad, shared_expected, rtol=1e-12, atol=1e-12)
    # parameters back where they were, bit for bit
    assert torch.equal(model.shared["w"].detach(), w)
    assert all(torch.equal(model.heads[f"t{t}"]["a"].detach(), a[t]) for t in range(2))
    # the sharpness L(theta + eps) - L(theta) is positive for a convex quadratic
    assert bool((method.last_sharpness > 0).all())


# ------------------------------------------------------------------ behaviour on a real architecture

def test_tiny_rho_update_tends_to_loss_aggregation(small_data):
    torch.manual_seed(0)
    model = build_arch("mmoe", small_data)
    gaps = []
    for rho in (1e-2, 1e-6):
        for agg in ("ew", "pcgrad"):
            ctx = _ctx(model, small_data, n=128, seed=3)
            J = ctx.jacobian().detach().clone()
            model.zero_grad(set_to_none=True)
            _method(small_data.task_names, rho=rho, aggregator=agg).step(ctx)
            got = torch.cat([p.grad.reshape(-1) for p in model.shared_parameters()])
            if agg == "ew":
                ref = J.sum(0)
            else:  # the loss aggregation draws first from the run's generator
                ref = pcgrad_weights(J @ J.T, torch.Generator().manual_seed(3)).float() @ J
            gaps.append(float((got - ref).norm() / ref.norm()))
            model.zero_grad(set_to_none=True)
    big_ew, big_pc, small_ew, small_pc = gaps
    # the flat part is O(rho) and vanishes with rho. (ReLU networks are only piecewise smooth: at rho ~ 1e-5 a
    # few units flip and leave a ~1e-3 jump, so the limit is checked at 1e-6, below any flip on this batch.)
    assert big_ew > 1e-2 and big_pc > 1e-2
    assert small_ew < 1e-4 and small_pc < 1e-4


def test_parameters_and_batchnorm_buffers_restored_exactly(small_data):
    torch.manual_seed(0)
    model = build_arch("mmoe", small_data)  # BatchNorm in experts and towers
    ctx = _ctx(model, small_data)
    params = [p.detach().clone() for p in model.parameters()]
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    # the check is meaningful: an extra training-mode forward does move the running statistics
    probe = build_arch("mmoe", small_data)
    probe.load_state_dict(model.state_dict())
    _ctx(probe, small_data)
    assert any(not torch.equal(b, buffers[n]) for n, b in probe.named_buffers() if "running" in n)

    method = _method(small_data.task_names)
    method.step(ctx)
    assert all(torch.equal(p0, p.detach()) for p0, p in zip(params, model.parameters()))
    assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers())
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    # the step's own graph is intact (restoration did not bump version counters): a backward still works
    ctx.backward()


def test_heads_follow_their_own_sam_gradient(small_data):
    torch.manual_seed(0)
    model = build_arch("shared_bottom", small_data)
    ctx = _ctx(model, small_data)
    clean = [torch.autograd.grad(l, ps, retain_graph=True) for l, ps in zip(ctx.losses, ctx.task_params)]
    method = _method(small_data.task_names)
    method.step(ctx)
    for t, (params, g0) in enumerate(zip(ctx.task_params, clean)):
        got = torch.cat([p.grad.reshape(-1) for p in params])
        ref = torch.cat([g.reshape(-1) for g in g0])
        # a SAM gradient: different from the clean one (rho = 2, adaptive), but of the same order
        assert float((got - ref).norm()) > 1e-4 * float(ref.norm())
        assert float(got.norm()) < 100 * float(ref.norm()) + 1e-6


def test_pcgrad_aggregator_runs_with_separate_states(small_data):
    torch.manual_seed(0)
    model = build_arch("mmoe", small_data)
    method = _method(small_data.task_names, aggregator="pcgrad", aggregator_options={"reduction": "mean"})
    assert method.loss_aggregator is not method.flat_aggregator
    assert method.loss_aggregator.options.reduction == "mean"
    method.step(_ctx(model, small_data))
    assert method.last_weights.shape == (3,) and method.last_flat_weights.shape == (3,)
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    state = method.state_dict()
    assert set(state) == {"loss_aggregator", "flat_aggregator"}
    method.load_state_dict(json.loads(json.dumps(state)))
    # an aggregator's warning reaches the run record through fmtl, once
    with pytest.warns(RuntimeWarning) as caught:
        method.loss_aggregator.warn_once("k", "solver did not converge at step 1")
        method.loss_aggregator.warn_once("k", "solver did not converge at step 2")
        method.flat_aggregator.warn_once("k", "x")
    assert len(caught) == 2
    assert len(method.warnings) == 2 and "loss-gradient" in method.warnings[0] and "pcgrad" in method.warnings[0]


# ------------------------------------------------------------------------ the combination, against torchjd

@settings(max_examples=40, deadline=None)
@given(st.integers(2, 12), st.integers(0, 10_000))
def test_two_task_pcgrad_combination_matches_torchjd(P, seed):
    # With T = 2, PCGrad has no random order (each task has one other), so torchjd's PCGrad is deterministic.
    # Both sum the projected gradients (Algorithm 1): no normalisation difference. F-MTL's shared update is
    # PCGrad(J) + PCGrad(J_sam - J).
    from torchjd.aggregation import PCGrad, Sum

    g = torch.Generator().manual_seed(seed)
    J = torch.randn(2, P, generator=g, dtype=torch.float64)
    J_sam = J + 0.5 * torch.randn(2, P, generator=g, dtype=torch.float64)
    m = _method(("a", "b"), aggregator="pcgrad")
    losses, sharp = torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    got, _, _ = fmtl_update(J, J_sam, m.loss_aggregator, m.flat_aggregator, losses, sharp, g)
    ref = PCGrad()(J) + PCGrad()(J_sam - J)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    e = _method(("a", "b"), aggregator="ew")
    got, w, _ = fmtl_update(J, J_sam, e.loss_aggregator, e.flat_aggregator, losses, sharp, g)
    torch.testing.assert_close(got, Sum()(J) + Sum()(J_sam - J), rtol=1e-10, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 5), st.integers(2, 8), st.integers(0, 10_000))
def test_linear_aggregator_decomposed_equals_direct_and_is_order_invariant(T, P, seed):
    # EW is linear: sum(J) + sum(J_sam - J) = sum(J_sam), so the paper's decomposition only matters for
    # non-linear aggregators; and a permutation of the tasks leaves the update unchanged.
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(T, P, generator=g, dtype=torch.float64)
    J_sam = J + torch.randn(T, P, generator=g, dtype=torch.float64)
    m = _method(tuple(f"t{i}" for i in range(T)))
    z = torch.zeros(T, dtype=torch.float64)
    dec, _, _ = fmtl_update(J, J_sam, m.loss_aggregator, m.flat_aggregator, z, z, g, "decomposed")
    direct, _, _ = fmtl_update(J, J_sam, m.loss_aggregator, m.flat_aggregator, z, z, g, "direct")
    torch.testing.assert_close(dec, direct, rtol=1e-10, atol=1e-10)
    perm = torch.randperm(T, generator=g)
    permuted, _, _ = fmtl_update(J[perm], J_sam[perm], m.loss_aggregator, m.flat_aggregator, z, z, g)
    torch.testing.assert_close(permuted, dec, rtol=1e-10, atol=1e-10)


def test_pcgrad_decomposition_differs_from_direct():
    # two conflicting loss gradients, flat gradients pointing elsewhere: agg(J) + agg(F) != agg(J + F)
    J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    F = torch.tensor([[0.0, 1.0], [0.0, -2.0]], dtype=torch.float64)
    m = _method(("a", "b"), aggregator="pcgrad")
    z = torch.zeros(2, dtype=torch.float64)
    dec, _, _ = fmtl_update(J, J + F, m.loss_aggregator, m.flat_aggregator, z, z)
    direct, _, _ = fmtl_update(J, J + F, m.loss_aggregator, m.flat_aggregator, z, z, mode="direct")
    # PCGrad(J) = (0.5, 1.5) (see test_optim); F: (0,1).(0,-2) = -2 < 0 -> f1' = (0,1) - (-2/4)(0,-2) = (0,0),
    # f2' = (0,-2) - (-2/1)(0,1) = (0,0): PCGrad(F) = 0. J + F = [(1,1), (-1,-1)], exactly opposite: both
    # projections vanish and PCGrad(J + F) = 0.
    torch.testing.assert_close(dec, torch.tensor([0.5, 1.5], dtype=torch.float64))
    torch.testing.assert_close(direct, torch.zeros(2, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------ options

@pytest.mark.parametrize("given_options,needle", [
    ({"rho": 0.0}, "rho"), ({"rho": -1.0}, "rho"), ({"rho_head": 0.0}, "rho_head"), ({"eta": -0.1}, "eta"),
    ({"aggregator": "nosuch"}, "nosuch"), ({"aggregator": "fmtl"}, "not a gradient aggregator"),
    ({"aggregator": "pcgrad", "aggregator_options": {"reduction": "median"}}, "median"),
    ({"aggregator_options": {"c": 0.4}}, "takes no options"), ({"rhoo": 1.0}, "rhoo"), ({"mode": "both"}, "both"),
])
def test_bad_options_are_one_line(given_options, needle):
    with pytest.raises(MtlbenchError) as info:
        get("optimizer", "fmtl").resolve_options(given_options)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


def test_defaults_from_the_official_code():
    o = get("optimizer", "fmtl").resolve_options({})
    assert o["rho"] == 2.0 and o["adaptive"] is True and o["aggregator"] == "ew" and o["mode"] == "decomposed"
    assert o["rho_head"] is None and o["eta"] == 0.0 and o["perturb_heads"] is True


# ------------------------------------------------------------------------------------------- real training

def test_short_training_run(tmp_path):
    rec = short_run(tmp_path, "fmtl")
    for entry in rec["curves"]:
        assert set(entry["task_weights"]) == {"ctr", "cvr", "ctcvr"}
        assert all(math.isfinite(v) for v in entry["task_weights"].values())
