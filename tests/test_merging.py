"""Mergers: properties on synthetic task vectors (no backbone needed), the declared data access, the merger kind."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlbench import registry
from mtlbench.errors import MtlbenchError
from mtlbench.merging import (DATA_ACCESS, MergeContext, TaskVectors, tall_masks, ties_elect, ties_merge, ties_trim)
from mtlbench.baselines.merging.adamerging import AdaMerging, merged_delta

MERGERS = registry.names("merger")


def make_tv(t: int = 3, shapes=((4, 5), (7,), (2, 3)), seed: int = 0) -> TaskVectors:
    g = torch.Generator().manual_seed(seed)
    d = sum(math.prod(s) for s in shapes)
    return TaskVectors(tuple(f"t{i}" for i in range(t)), tuple(f"w{i}" for i in range(len(shapes))), tuple(shapes),
                       torch.randn(t, d, generator=g, dtype=torch.float64),
                       torch.randn(d, generator=g, dtype=torch.float64))


def build(name: str, **options):
    entry = registry.get("merger", name)
    return entry.obj(registry.build_options(entry.options_class, entry.resolve_options(options)))


def test_builtin_mergers_registered():
    assert {"pretrained", "experts", "weight_average", "task_arithmetic", "ties", "adamerging", "tall_masks",
            "consensus"} <= set(MERGERS)


@pytest.mark.parametrize("name", MERGERS)
def test_every_merger_declares_access_and_task_id(name):
    m = build(name)
    assert m.access in DATA_ACCESS
    assert isinstance(m.needs_task_id, bool)
    assert registry.get("merger", name).description


@pytest.mark.parametrize("name", [n for n in MERGERS if build(n).access in ("none", "labelled_val")])
def test_every_static_merger_runs_on_synthetic_vectors(name):
    tv = make_tv()
    ctx = MergeContext(build(name).access, tv.tasks, val=lambda d: {t: float(-d.abs().sum()) for t in tv.tasks},
                       val_per_task=lambda d: {t: float(-d[i].abs().sum()) for i, t in enumerate(tv.tasks)},
                       merger=name)
    out = build(name).merge(tv, ctx)
    delta = out.shared if out.shared is not None else out.per_task
    assert torch.isfinite(delta).all()
    assert delta.shape[-1] == tv.base.shape[0]
    assert (out.per_task is not None) == build(name).needs_task_id


def test_context_refuses_undeclared_data():
    tv = make_tv()
    ctx = MergeContext("none", tv.tasks, val=lambda d: {}, merger="x")
    with pytest.raises(MtlbenchError, match="declared data access 'none'"):
        ctx.val_accuracy(tv.base)
    with pytest.raises(MtlbenchError, match="declared data access 'none'"):
        ctx.unlabelled_batch(4)


# ------------------------------------------------------------------------------------------ Task Arithmetic

def test_task_arithmetic_lambda_zero_is_pretrained():
    tv = make_tv()
    out = build("task_arithmetic", lambda_=0.0).merge(tv, MergeContext("none", tv.tasks))
    assert torch.equal(out.shared, torch.zeros_like(tv.base))


def test_task_arithmetic_picks_best_lambda_on_validation():
    tv = make_tv()
    total = tv.matrix.sum(0)
    # validation rewards lambda = 0.4 exactly
    val = lambda d: {t: -abs(float(d[0] / total[0]) - 0.4) for t in tv.tasks}
    out = build("task_arithmetic").merge(tv, MergeContext("labelled_val", tv.tasks, val=val))
    assert out.info["lambda"] == 0.4
    torch.testing.assert_close(out.shared, 0.4 * total)


def test_weight_average_is_mean_of_experts():
    tv = make_tv()
    out = build("weight_average").merge(tv, MergeContext("none", tv.tasks))
    experts = tv.base + tv.matrix
    torch.testing.assert_close(tv.base + out.shared, experts.mean(0))


# ------------------------------------------------------------------------------------------------- TIES

@settings(max_examples=30, deadline=None)
@given(t=st.integers(1, 5), d=st.integers(5, 200), k=st.floats(0.05, 0.95), seed=st.integers(0, 10_000))
def test_ties_trim_keeps_exactly_top_k(t, d, k, seed):
    m = torch.randn(t, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)  # distinct |values|
    trimmed = ties_trim(m, k)
    kept = trimmed != 0
    # official rule: threshold = the (d - int(d k))-th smallest |value|, kept inclusively: the top int(d k) + 1
    n_keep = min(d, int(d * k) + 1)
    assert (kept.sum(1) == n_keep).all()
    for i in range(t):  # every kept entry is larger in magnitude than every dropped one
        if 0 < n_keep < d:
            assert m[i].abs()[kept[i]].min() > m[i].abs()[~kept[i]].max()
    assert torch.equal(trimmed[kept], m[kept])


def test_ties_elects_sign_by_mass_not_count():
    # two tasks say +1, one says -5: the count says +, the mass says -
    m = torch.tensor([[1.0], [1.0], [-5.0]])
    assert ties_elect(m).item() == -1.0
    # disjoint mean keeps only the agreeing entry
    assert ties_merge(m, k=1.0, aggregate="mean").item() == -5.0
    m2 = torch.tensor([[2.0, 1.0], [4.0, -3.0], [-1.0, 1.0]])
    # column 0: mass +5 -> mean of 2 and 4; column 1: mass -1 -> only -3
    torch.testing.assert_close(ties_merge(m2, k=1.0, aggregate="mean"), torch.tensor([3.0, -3.0]))
    torch.testing.assert_close(ties_merge(m2, k=1.0, aggregate="sum"), torch.tensor([6.0, -3.0]))


def test_ties_zero_sum_takes_the_majority_sign():
    m = torch.tensor([[1.0, 3.0], [-1.0, 1.0]])  # column 0 sums to 0; grand total positive
    assert ties_elect(m).tolist() == [1.0, 1.0]


# ----------------------------------------------------------------------------------- TALL-masks, Consensus

def test_tall_mask_rule_is_strict_at_the_lambda_boundary():
    # |tau_t| = 1, |tau_MTL - tau_t| = 2: at lambda 0.5 the sides are equal -> excluded (strict >)
    tau = torch.tensor([[1.0], [2.0]])
    multi = tau.sum(0)
    assert tall_masks(tau, multi, torch.tensor(0.5)).tolist() == [[False], [True]]
    assert tall_masks(tau, multi, torch.tensor(0.5 - 1e-6)).tolist() == [[True], [True]]
    assert tall_masks(tau, multi, torch.tensor([0.5 - 1e-6, 0.5])).tolist() == [[True], [True]]


def test_tall_masks_choose_lambda_per_task_on_validation():
    tv = make_tv()
    multi = tv.matrix.sum(0)
    calls = []

    def val_per_task(deltas):  # task i prefers the i-th densest mask
        calls.append(deltas)
        dens = (deltas != 0).double().mean(1)
        return {t: -abs(float(dens[i]) - 0.5 + 0.1 * i) for i, t in enumerate(tv.tasks)}

    out = build("tall_masks").merge(tv, MergeContext("labelled_val", tv.tasks, val_per_task=val_per_task))
    assert len(calls) == 5
    for i, t in enumerate(tv.tasks):
        lam = out.info["lambdas"][t]
        expect = tall_masks(tv.matrix[i:i + 1], multi, torch.tensor(lam)) * multi
        torch.testing.assert_close(out.per_task[i], expect[0])


def test_consensus_k0_equals_task_arithmetic():
    tv = make_tv()
    ctx = MergeContext("none", tv.tasks)
    c = build("consensus", k=0, alpha=0.3).merge(tv, ctx).shared
    ta = build("task_arithmetic", lambda_=0.3).merge(tv, ctx).shared
    torch.testing.assert_close(c, ta)


def test_consensus_k_above_t_is_pretrained():
    tv = make_tv()
    out = build("consensus", k=tv.n_tasks + 1, alpha=1.0, tall_lambda=0.4).merge(tv, MergeContext("none", tv.tasks))
    assert torch.equal(out.shared, torch.zeros_like(tv.base))


def test_consensus_keeps_weights_used_by_k_tasks():
    tau = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 1.0]])
    tv = TaskVectors(("a", "b", "c"), ("w",), ((3,),), tau, torch.zeros(3))
    out = build("consensus", k=2, alpha=1.0, tall_lambda=0.2).merge(tv, MergeContext("none", tv.tasks))
    # masks: column 0 used by all, column 1 only by a, column 2 only by c -> only column 0 survives k=2
    assert out.shared.tolist() == [3.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------------ AdaMerging

class TinyBench:
    """A 2-layer functional model over task vectors: what AdaMerging's context needs, without a backbone."""

    def __init__(self, tv: TaskVectors, n_in: int = 4, n_classes: int = 3):
        self.tv, self.n_in = tv, n_in
        self.gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, n_in, generator=self.gen, dtype=tv.base.dtype)

    def batch(self, task, n, gen):
        j = self.tv.tasks.index(task)
        idx = torch.randperm(64, generator=gen)[:n]
        return {"x": self.x[idx], "task_index": torch.full((n,), j)}

    def logits(self, delta, batch):
        p = self.tv.unflatten(self.tv.base + delta)
        h = torch.tanh(batch["x"] @ p["w0"])                   # w0 [4, 5] -> [n, 5]
        out = 3 * h[:, :3] * p["w1"][:3] + p["w2"].sum(0)       # w1 [7], w2 [2, 3] -> [n, 3]
        return [out[batch["task_index"] == j] for j in range(self.tv.n_tasks)]


def test_taskwise_adamerging_with_equal_coefficients_is_task_arithmetic():
    tv = make_tv()
    coef = torch.full((1, tv.n_tasks), 0.3, dtype=tv.matrix.dtype)
    torch.testing.assert_close(merged_delta(coef, tv.matrix, None), 0.3 * tv.matrix.sum(0))
    layer = torch.full((len(tv.keys), tv.n_tasks), 0.3, dtype=tv.matrix.dtype)
    torch.testing.assert_close(merged_delta(layer, tv.matrix, tv.sizes), 0.3 * tv.matrix.sum(0))
    # zero steps: the model is TA(init)
    bench = TinyBench(tv)
    ctx = MergeContext("unlabelled", tv.tasks, batch=bench.batch, logits=bench.logits)
    out = build("adamerging", granularity="task", steps=0).merge(tv, ctx)
    torch.testing.assert_close(out.shared, 0.3 * tv.matrix.sum(0))


def test_layerwise_coefficients_scale_each_tensor():
    tv = make_tv()
    coef = torch.zeros(len(tv.keys), tv.n_tasks, dtype=tv.matrix.dtype)
    coef[1, 2] = 1.0  # only tensor w1 of task t2
    delta = tv.unflatten(merged_delta(coef, tv.matrix, tv.sizes))
    expect = tv.unflatten(tv.matrix[2])
    assert torch.equal(delta["w0"], torch.zeros_like(delta["w0"]))
    torch.testing.assert_close(delta["w1"], expect["w1"])


@pytest.mark.parametrize("granularity", ["task", "layer"])
@pytest.mark.parametrize("ties", [False, True])
def test_adamerging_gradient_reaches_only_its_coefficients(granularity, ties):
    tv = make_tv()
    tv.matrix.requires_grad_(False)
    base, matrix = tv.base.clone(), tv.matrix.clone()
    bench = TinyBench(tv)
    seen = []
    original = bench.logits

    def logits(delta, batch):
        seen.append(delta.requires_grad)
        return original(delta, batch)

    ctx = MergeContext("unlabelled", tv.tasks, batch=bench.batch, logits=logits)
    m = build("adamerging", granularity=granularity, ties=ties, steps=3, batch_per_task=8, lr=0.05)
    out = m.merge(tv, ctx)
    assert seen and all(seen)                       # the merged weights carry a graph (to the coefficients)
    assert tv.base.grad is None and tv.matrix.grad is None
    assert torch.equal(tv.base, base) and torch.equal(tv.matrix, matrix)   # θ0 and τ untouched
    assert not out.shared.requires_grad
    coef = torch.tensor(out.info["coefficients_mean"])
    assert not torch.allclose(coef, torch.full_like(coef, 0.3))           # the coefficients moved
    assert ((coef >= 0) & (coef <= 1)).all()                              # and stayed clamped
    assert len(out.info["entropy_curve"]) == 3


def test_adamerging_plus_plus_starts_at_ties_dis_sum():
    tv = make_tv()
    bench = TinyBench(tv)
    ctx = MergeContext("unlabelled", tv.tasks, batch=bench.batch, logits=bench.logits)
    out = build("adamerging", granularity="task", ties=True, steps=0).merge(tv, ctx)
    torch.testing.assert_close(out.shared, 0.3 * ties_merge(tv.matrix, 0.2, "sum"))


def test_adamerging_on_test_inputs_is_declared_as_such():
    assert build("adamerging").access == "unlabelled"
    assert build("adamerging", inputs="test").access == "test_inputs"


@pytest.mark.parametrize("name,options,match", [
    ("ties", {"k": 0.0}, "k"),
    ("ties", {"bogus": 1}, "bogus"),
    ("adamerging", {"granularity": "block"}, "granularity"),
    ("consensus", {"k": -1}, "k must be"),
    ("task_arithmetic", {"lambda_grid": []}, "lambda_grid"),
])
def test_bad_merger_options_are_one_line(name, options, match):
    with pytest.raises(MtlbenchError, match=match) as exc:
        registry.get("merger", name).resolve_options(options)
    assert "\n" not in str(exc.value)


def test_adamerging_module_doc_names_defaults():
    doc = AdaMerging.__module__
    import importlib

    text = importlib.import_module(doc).__doc__
    for fact in ("0.3", "clamp", "1e-3", "500", "entropy", "EnnengYang/AdaMerging"):
        assert fact in text
