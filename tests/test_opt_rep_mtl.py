"""Rep-MTL (rep_mtl): entropy and cross-task alignment penalties on representation-level task saliency."""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from mtlbench.arch import ArchOutput
from mtlbench.baselines.optimizers.rep_mtl import (canonical_saliency, rep_mtl_regularisers, saliency_alignment,
                                                   saliency_entropy)
from mtlbench.errors import MtlbenchError
from mtlbench.optim import StepContext
from mtlbench.registry import get

from conftest import assert_close_fp, build_arch, make_method, short_run, step_context


def _method(tasks, name="rep_mtl", **options):
    return make_method(name, tasks, **options)


_ctx = functools.partial(step_context, scale=1.0)  # every loss times ``scale`` (default 1.0)


def _grads(model, method, data, **kw):
    model.zero_grad(set_to_none=True)
    method.step(_ctx(model, data, **kw))
    out = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def _flat(gs):
    return torch.cat([g.reshape(-1) for g in gs])


def _rand(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------------------- TSR (entropy)

def test_entropy_by_hand():
    # T = 2 tasks, B = 1 sample, P = 2 positions, C = 2 channels; channel means:
    # position 0: task 0 mean 1, task 1 mean -1 -> |.| equal -> P = (1/2, 1/2), entropy log 2
    # position 1: task 0 mean 2, task 1 mean 0  -> P = (1, 0), entropy 0;   L_tsr = (log 2 + 0) / 2
    X = torch.tensor([[[[1.0, 1.0], [3.0, 1.0]]], [[[-2.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
    torch.testing.assert_close(saliency_entropy(X), torch.tensor(math.log(2) / 2, dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 5), st.integers(1, 6), st.integers(1, 4), st.integers(1, 6), st.integers(0, 10_000))
def test_entropy_is_maximal_for_uniform_saliency(T, B, P, C, seed):
    X = _rand(seed, T, B, P, C)
    h = float(saliency_entropy(X))
    assert -1e-9 <= h <= math.log(T) + 1e-9
    # same magnitude of channel mean for every task (signs may differ): the maximum, log T
    signs = torch.where(_rand(seed + 1, T, 1, 1, 1) > 0, 1.0, -1.0).double()
    uniform = signs * X[:1].expand(T, B, P, C)
    torch.testing.assert_close(saliency_entropy(uniform), torch.tensor(math.log(T), dtype=torch.float64))
    # invariant to the task order and to a common scale of all saliencies
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(saliency_entropy(X[perm]), saliency_entropy(X))
    torch.testing.assert_close(saliency_entropy(1e-6 * X), saliency_entropy(X))
    # one task's saliency scaled up dominates every position: the entropy falls towards 0
    big = X.clone()
    big[0] *= 1e9
    assert float(saliency_entropy(big)) < 1e-3


# ------------------------------------------------------------------------------------------ CSA (alignment)

def _alignment_explicit(X, tau, positive_in_denominator=False):
    """Eqs. 7-9 literally: C x C affinity maps and anchors, flattened, cosine similarity, InfoNCE."""
    T, B, P, C = X.shape
    M = torch.einsum("tbpc,tbpd->tbcd", X, X).reshape(T, B, C * C)  # M_t[b] = S S^T
    A = X.mean(2)  # [T, B, C]
    Ahat = torch.einsum("tbc,tbd->bcd", A, A).reshape(B, C * C)  # A_b A_b^T = sum_t a_t a_t^T
    total = 0.0
    for b in range(B):
        neg = torch.stack([F.cosine_similarity(Ahat[b], Ahat[k], dim=0) for k in range(B) if k != b]) / tau
        for t in range(T):
            pos = F.cosine_similarity(Ahat[b], M[t, b], dim=0) / tau
            denom = torch.logsumexp(torch.cat([pos[None], neg]) if positive_in_denominator else neg, 0)
            total = total + denom - pos
    return total / (B * T)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(2, 6), st.integers(1, 3), st.integers(1, 5), st.floats(0.05, 2.0),
       st.booleans(), st.integers(0, 10_000))
def test_alignment_gram_form_equals_explicit_maps(T, B, P, C, tau, in_denom, seed):
    X = _rand(seed, T, B, P, C)
    torch.testing.assert_close(saliency_alignment(X, tau, in_denom), _alignment_explicit(X, tau, in_denom),
                               rtol=1e-9, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 4), st.integers(4, 10), st.integers(1, 3), st.integers(3, 8), st.integers(0, 10_000))
def test_alignment_is_lower_when_saliencies_agree_per_sample(T, B, P, C, seed):
    # aligned: every task's saliency of sample b is the same pattern (up to a per-task scale) -> each task's
    # affinity matches the sample's anchor; shuffled: task t's saliencies come from other samples
    base = _rand(seed, B, P, C)
    scales = 0.5 + _rand(seed + 1, T).abs()
    aligned = scales[:, None, None, None] * base[None]
    g = torch.Generator().manual_seed(seed + 2)
    shuffled = torch.stack([aligned[0]] + [aligned[t, torch.roll(torch.arange(B), t)] for t in range(1, T)])
    assert float(saliency_alignment(aligned, 0.1)) < float(saliency_alignment(shuffled, 0.1))
    # task order does not matter, nor a common scale
    perm = torch.randperm(T, generator=g)
    torch.testing.assert_close(saliency_alignment(shuffled[perm], 0.1), saliency_alignment(shuffled, 0.1))
    torch.testing.assert_close(saliency_alignment(1e-5 * shuffled, 0.1), saliency_alignment(shuffled, 0.1))


def test_regularisers_are_differentiable():
    X = _rand(0, 3, 4, 2, 3).requires_grad_(True)
    assert torch.autograd.gradcheck(saliency_entropy, (X,))
    assert torch.autograd.gradcheck(lambda x: saliency_alignment(x, 0.2), (X,))
    assert torch.autograd.gradcheck(lambda x: saliency_alignment(x, 0.2, True), (X,))
    # second order too: the step backpropagates through saliencies that are themselves gradients
    assert torch.autograd.gradgradcheck(saliency_entropy, (X,))


def test_canonical_layouts():
    B = 5
    x = _rand(0, B, 7)  # [B, D]: one position of D channels
    assert canonical_saliency(x, B).shape == (B, 1, 7)
    e = _rand(1, 8, B, 4)  # MMoE experts [n, B, d]: n positions
    ce = canonical_saliency(e, B)
    assert ce.shape == (B, 8, 4) and torch.equal(ce[2, 3], e[3, 2])
    img = _rand(2, B, 3, 4, 6)  # [B, C, H, W] with channel_axis = 1: H*W positions of C channels
    ci = canonical_saliency(img, B, channel_axis=1)
    assert ci.shape == (B, 24, 3) and torch.equal(ci[1, 4 * 0 + 6 * 1 + 2], img[1, :, 1, 2])
    with pytest.raises(ValueError, match="batch"):
        canonical_saliency(_rand(3, 4, 6), B)


# ----------------------------------------------------------------------------- the step on a tiny model

class Tiny(nn.Module):
    """Shared tanh layer -> Z [B, 4]; per task a small tanh head and a squared error (float64)."""

    def __init__(self, T=3):
        super().__init__()
        torch.manual_seed(0)
        self.task_names = tuple(f"t{i}" for i in range(T))
        self.shared = nn.Linear(3, 4).double()
        self.heads = nn.ModuleDict({n: nn.Sequential(nn.Linear(4, 2), nn.Tanh(), nn.Linear(2, 1)).double()
                                    for n in self.task_names})
        self.x = _rand(5, 6, 3)
        self.y = _rand(6, 6, T)

    def shared_parameters(self):
        return list(self.shared.parameters())

    def task_parameters(self):
        return {n: list(self.heads[n].parameters()) for n in self.task_names}

    def forward(self, batch=None):
        z = torch.tanh(self.shared(self.x))
        z = z.view_as(z)
        outs = [self.heads[n](z).squeeze(-1) for n in self.task_names]
        return ArchOutput(outs, (z,))

    def losses(self, out):
        return [((o - self.y[:, i]) ** 2).mean() for i, o in enumerate(out.outputs)]


def _tiny_ctx(model):
    def fwd():
        out = model()
        return out, model.losses(out)

    out, losses = fwd()
    return StepContext(model, {}, out, losses, fwd, torch.Generator().manual_seed(0), 0, 1)


def test_step_gradient_matches_finite_differences_of_the_objective():
    # the written gradient is d/dtheta [sum_t L_t + l_tsr L_tsr + l_csa L_csa], saliencies included (double
    # backward); checked against central differences of the objective's value along random directions
    model = Tiny()
    opts = dict(lambda_tsr=0.7, lambda_csa=1.3, tau=0.5)
    method = _method(model.task_names, **opts)
    model.zero_grad(set_to_none=True)
    method.step(_tiny_ctx(model))
    params = list(model.parameters())
    grad = torch.cat([p.grad.reshape(-1) for p in params])

    def objective():
        out = model()
        losses = model.losses(out)
        regs = rep_mtl_regularisers(losses, out.features, 6, tau=0.5, create_graph=False)
        return float((torch.stack(losses).sum() + 0.7 * regs["tsr"] + 1.3 * regs["csa"]).detach())

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    for k in range(3):
        v = _rand(10 + k, flat.numel())
        h = 1e-6
        vals = []
        for sgn in (1, -1):
            off = 0
            with torch.no_grad():
                for p in params:
                    n = p.numel()
                    p.copy_((flat[off:off + n] + sgn * h * v[off:off + n]).view_as(p))
                    off += n
            vals.append(objective())
        with torch.no_grad():
            off = 0
            for p in params:
                p.copy_(flat[off:off + p.numel()].view_as(p))
                off += p.numel()
        fd = (vals[0] - vals[1]) / (2 * h)
        assert abs(fd - float(grad @ v)) < 1e-6 * max(1.0, abs(fd))


def test_regularisers_move_shared_and_every_head_gradient(small_data):
    # S_t = dL_t/dZ depends on Z (so on the shared parameters) and on head t's parameters, and the entropy couples
    # all tasks: the penalties change the shared gradient and every head's gradient
    torch.manual_seed(0)
    model = build_arch("mmoe", small_data)
    ew = _grads(model, _method(small_data.task_names, "ew"), small_data)
    rep = _grads(model, _method(small_data.task_names), small_data)
    names = [n for n, _ in model.named_parameters()]

    def part(gs, prefix):
        return _flat([g for n, g in zip(names, gs) if n.startswith(prefix)])

    for prefix in ["shared."] + [f"heads.{t}." for t in small_data.task_names]:
        a, b = part(ew, prefix), part(rep, prefix)
        assert float((a - b).norm()) > 1e-3 * float(a.norm()), prefix
    assert all(bool(torch.isfinite(g).all()) for g in rep)


def test_zero_lambdas_or_switches_off_are_exactly_ew(small_data):
    torch.manual_seed(0)
    model = build_arch("mmoe", small_data)
    ew = _grads(model, _method(small_data.task_names, "ew"), small_data)
    for opts in ({"lambda_tsr": 0.0, "lambda_csa": 0.0}, {"tsr": False, "csa": False}):
        method = _method(small_data.task_names, **opts)
        got = _grads(model, method, small_data)
        assert all(torch.equal(a, b) for a, b in zip(ew, got))
        assert torch.equal(method.last_weights, torch.ones(3))


def test_each_switch_alone_changes_the_update(small_data):
    torch.manual_seed(0)
    model = build_arch("shared_bottom", small_data)
    ew = _flat(_grads(model, _method(small_data.task_names, "ew"), small_data))
    tsr = _flat(_grads(model, _method(small_data.task_names, csa=False), small_data))
    csa = _flat(_grads(model, _method(small_data.task_names, tsr=False), small_data))
    both = _flat(_grads(model, _method(small_data.task_names), small_data))
    # the regularisers' gradients add up: (tsr - ew) + (csa - ew) = both - ew
    torch.testing.assert_close(both - ew, (tsr - ew) + (csa - ew), rtol=1e-4, atol=1e-5)
    assert float((tsr - ew).norm()) > 0 and float((csa - ew).norm()) > 0


def test_scaling_all_losses_leaves_the_regularisers_gradient_unchanged(small_data):
    # both penalties are invariant to a common scale of the saliencies, and scaling every loss by c scales every
    # saliency by c: grad_rep(c L) - c grad_ew(L) = grad_rep(L) - grad_ew(L)
    torch.manual_seed(0)
    model = build_arch("shared_bottom", small_data)
    ew = _flat(_grads(model, _method(small_data.task_names, "ew"), small_data))
    rep = _flat(_grads(model, _method(small_data.task_names), small_data))
    rep3 = _flat(_grads(model, _method(small_data.task_names), small_data, scale=3.0))
    # float32 sums: compared in norm (in float64 the two sides agree to ~1e-12 relative)
    gap = (rep3 - 3.0 * ew) - (rep - ew)
    assert float(gap.norm()) < 1e-3 * float((rep - ew).norm())
    assert float((rep - ew).norm()) > 1e-2 * float(ew.norm())  # and the regularisers' part is not negligible


def test_single_task_entropy_has_no_gradient(small_data):
    # with one task P = 1 everywhere: L_tsr = 0 and its gradient vanishes, so TSR alone is EW
    data = small_data.select_tasks(("ctr",))
    torch.manual_seed(0)
    model = build_arch("mmoe", data)
    ew = _flat(_grads(model, _method(data.task_names, "ew"), data))
    method = _method(data.task_names, csa=False)
    got = _flat(_grads(model, method, data))
    assert method.last_regularisers["tsr"] == 0.0
    assert_close_fp(got, ew)


def test_needs_shared_features(small_data):
    torch.manual_seed(0)
    model = build_arch("single", small_data)
    with pytest.raises(MtlbenchError, match="shared representation"):
        _method(small_data.task_names).step(_ctx(model, small_data))
    model = build_arch("mmoe", small_data)
    with pytest.raises(MtlbenchError, match="feature_indices"):
        _method(small_data.task_names, feature_indices=[5]).step(_ctx(model, small_data))
    m = _method(small_data.task_names, feature_indices=[1])  # MMoE's experts only
    m.step(_ctx(model, small_data))
    assert set(m.last_regularisers) == {"tsr", "csa"}


# ------------------------------------------------------------------------------------------------ options

@pytest.mark.parametrize("given_options,needle", [
    ({"tau": 0.0}, "tau"), ({"tau": -1.0}, "tau"), ({"lambda_tsr": -0.1}, "lambda_tsr"),
    ({"lambda_csa": -1}, "lambda_csa"), ({"feature_indices": [-1]}, "feature_indices"), ({"lamda_tsr": 1}, "lamda_tsr"),
])
def test_bad_options_are_one_line(given_options, needle):
    with pytest.raises(MtlbenchError) as info:
        get("optimizer", "rep_mtl").resolve_options(given_options)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_defaults():
    o = get("optimizer", "rep_mtl").resolve_options({})
    assert o["lambda_tsr"] == 0.9 and o["lambda_csa"] == 0.9 and o["tau"] == 0.1
    assert o["tsr"] and o["csa"] and not o["log_losses"]
    assert get("optimizer", "rep_mtl").obj.requires == frozenset({"features"})


# ------------------------------------------------------------------------------------------- real training

def test_short_training_run(tmp_path):
    rec = short_run(tmp_path, "rep_mtl")
    for entry in rec["curves"]:
        assert entry["task_weights"] == {"ctr": 1.0, "cvr": 1.0, "ctcvr": 1.0}


def test_the_declared_batch_axis_is_used_even_when_another_axis_has_the_batch_size(small_data):
    """Issue 14: with a batch of 8 rows and 8 experts, guessing the batch axis by size picked the expert axis.
    MMoE declares [n_experts, B, D] (batch axis 1): the regularisers then equal those computed with the batch
    axis moved first by hand, and differ from the old guess."""
    from conftest import build_arch
    from mtlbench.objectives import task_loss

    torch.manual_seed(0)
    model = build_arch("mmoe", small_data, n_experts=8)
    batch = {k: v[:8] for k, v in small_data.splits["train"].tensors.items()}
    out = model(batch)
    assert out.features[1].shape[:2] == (8, 8)
    layouts = model.feature_layouts()
    assert [lay.batch_axis for lay in layouts] == [0, 1]
    losses = [task_loss(t, o, batch["labels"][:, i], batch["masks"][:, i])
              for i, (t, o) in enumerate(zip(small_data.tasks, out.outputs))]
    got = rep_mtl_regularisers(losses, out.features, 8, create_graph=False, layouts=layouts)
    sal = [torch.autograd.grad(l, tuple(out.features), retain_graph=True) for l in losses]
    X0 = torch.stack([s[0][:, None, :] for s in sal])  # [T, B, 1, D]
    X1 = torch.stack([s[1].transpose(0, 1) for s in sal])  # [T, B, n, D], the batch moved first by hand
    torch.testing.assert_close(got["tsr"], (saliency_entropy(X0) + saliency_entropy(X1)) / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["csa"], (saliency_alignment(X0) + saliency_alignment(X1)) / 2, rtol=1e-5,
                               atol=1e-6)
    guessed = torch.stack([s[1] for s in sal])  # the old guess: the first axis of size 8 is the expert axis
    wrong = (saliency_alignment(X0) + saliency_alignment(guessed)) / 2
    assert not torch.allclose(wrong, got["csa"], rtol=1e-3)
