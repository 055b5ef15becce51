"""Architectures: output shapes, the shared/task-specific partition, and the encode/decode contract."""
from __future__ import annotations

import pytest
import torch

from mtlbench.errors import MtlbenchError
from mtlbench.objectives import task_loss
from mtlbench.registry import names, variants

from conftest import assert_close_fp, grad_scale, build_arch

# examples for the task-subset and plain-task-loss tests below: esmm needs its ctr/cvr/ctcvr roles and esmm and
# aitm train on their own task_losses (their every-arch form is the contract test over ALL_ARCHS further down)
BUILTIN_ARCHS = ["single", "shared_bottom", "mmoe", "home"]
# every registered tabular arch (a new arch is checked without editing a list); image variants: tests/test_vision*
ALL_ARCHS = [n for n in names("arch") if "tabular" in variants(n)]
HOME_ABLATIONS = [{}, {"expert_norm": False}, {"tower_norm": False}, {"hierarchy": False}, {"feature_gate": False},
                  {"self_gate": False},
                  {"expert_norm": False, "tower_norm": False, "hierarchy": False, "feature_gate": False,
                   "self_gate": False}]


def _batch(data, n=64):
    return {k: v[:n] for k, v in data.splits["train"].tensors.items()}


def test_builtins_registered():
    assert set(BUILTIN_ARCHS) <= set(names("arch"))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_forward_shapes(arch, small_data):
    torch.manual_seed(0)
    model = build_arch(arch, small_data)
    out = model(_batch(small_data))
    assert len(out.outputs) == len(small_data.tasks)
    for o in out.outputs:
        assert o.shape == (64, 1)
        assert torch.isfinite(o).all()


@pytest.mark.parametrize("arch", BUILTIN_ARCHS)
@pytest.mark.parametrize("tasks", [("ctr", "cvr"), ("ctr", "cvr", "ctcvr"), ("cvr",)])
def test_parameters_partitioned(arch, tasks, small_data):
    data = small_data.select_tasks(tasks)
    model = build_arch(arch, data)
    shared = {id(p) for p in model.shared_parameters()}
    per_task = [{id(p) for p in ps} for ps in model.task_parameters().values()]
    everything = {id(p) for p in model.parameters()}
    assert len(per_task) == len(tasks)
    union = set(shared)
    for s in per_task:
        assert not (s & union), "a parameter is declared twice"
        union |= s
    assert union == everything, "some parameter is neither shared nor task-specific"
    counts = model.parameter_counts()
    assert counts["total"] == counts["shared"] + sum(counts["task"].values())
    if arch == "single":
        assert not shared
    else:
        assert shared


@pytest.mark.parametrize("arch,options", [(a, {}) for a in BUILTIN_ARCHS] + [("home", o) for o in HOME_ABLATIONS])
def test_outputs_depend_on_shared_only_through_features(arch, options, small_data):
    """Per-task gradients of the shared parameters via the features (the optimizer's fast path) equal plain
    per-task autograd through the whole model."""
    torch.manual_seed(1)
    model = build_arch(arch, small_data, **options)
    model.train()
    batch = _batch(small_data, 128)
    out = model(batch)
    losses = [task_loss(t, o, batch["labels"][:, i], batch["masks"][:, i])
              for i, (t, o) in enumerate(zip(small_data.tasks, out.outputs))]
    shared = model.shared_parameters()
    if not shared:
        assert arch == "single" and out.features == ()
    for loss in losses if shared else []:
        direct = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        fg = torch.autograd.grad(loss, out.features, retain_graph=True, allow_unused=True)
        fg = [torch.zeros_like(f) if g is None else g for f, g in zip(out.features, fg)]
        via = torch.autograd.grad(out.features, shared, fg, retain_graph=True, allow_unused=True)
        for d, v in zip(direct, via):
            d = torch.zeros(1) if d is None else d
            v = torch.zeros(1) if v is None else v
            assert_close_fp(d, v, scale=grad_scale(direct))
    # heads see only their own task: task t's loss has no gradient on another task's parameters
    task_params = model.task_parameters()
    for i, loss in enumerate(losses):
        for j, name in enumerate(model.task_names):
            if i == j:
                continue
            grads = torch.autograd.grad(loss, task_params[name], retain_graph=True, allow_unused=True)
            assert all(g is None or float(g.abs().max()) == 0.0 for g in grads)


@pytest.mark.parametrize("options", HOME_ABLATIONS)
def test_home_ablation_switches_change_the_model(options, small_data):
    base = build_arch("home", small_data)
    abl = build_arch("home", small_data, **options)
    if options:
        assert abl.parameter_counts()["total"] != base.parameter_counts()["total"] or options == {"hierarchy": False}
    names_ = {n for n, _ in abl.named_parameters()}
    assert any("self_gate" in n for n in names_) == options.get("self_gate", True)
    assert any(".gate.down" in n for n in names_) == options.get("feature_gate", True)
    # one switch per component (issue 14): expert_norm touches the experts only, tower_norm the towers only
    bn = [n for n, m in abl.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert any(".tower." not in n for n in bn) == options.get("expert_norm", True)
    assert any(".tower." in n for n in bn) == options.get("tower_norm", True)


def test_home_groups(small_data):
    model = build_arch("home", small_data)
    assert model.describe()["groups"] == [["ctr"], ["cvr", "ctcvr"]]  # the dataset's group hints
    model = build_arch("home", small_data, groups="ctr,cvr|ctcvr")
    assert model.describe()["groups"] == [["ctr", "cvr"], ["ctcvr"]]
    model = build_arch("home", small_data, groups=[["ctcvr"], ["ctr", "cvr"]])
    assert model.describe()["groups"] == [["ctcvr"], ["ctr", "cvr"]]
    flat = build_arch("home", small_data, hierarchy=False)
    assert flat.describe()["groups"] == [["ctr", "cvr", "ctcvr"]]


@pytest.mark.parametrize("groups,match", [
    ("ctr|cvr", "leaves out"),
    ("ctr|cvr,ctcvr,click", "unknown task"),
    ("ctr,cvr|cvr,ctcvr", "more than once"),
    ("ctr||cvr,ctcvr", "empty group"),
    (3, "must look like"),
])
def test_home_bad_groups(groups, match, small_data):
    with pytest.raises(MtlbenchError, match=match) as info:
        build_arch("home", small_data, groups=groups)
    assert "\n" not in str(info.value)


def test_same_seed_same_init(small_data):
    torch.manual_seed(3)
    a = build_arch("home", small_data)
    torch.manual_seed(3)
    b = build_arch("home", small_data)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_expert_bank_matches_separate_mlps():
    """The batched expert bank computes exactly what n separate Linear-BN-ReLU MLPs compute."""
    from mtlbench.layers import ExpertBank

    torch.manual_seed(0)
    bank = ExpertBank(3, 10, (7, 5), batch_norm=True, act="relu")
    x = torch.randn(32, 10)
    out = bank(x)
    for e in range(3):
        h = x
        for w, b, norm in zip(bank.weights, bank.biases, bank.norms):
            h = h @ w[e] + b[e]
            u = h.shape[1]
            bn = norm.norm
            h = torch.nn.functional.batch_norm(h, None, None, bn.weight[e * u:(e + 1) * u],
                                               bn.bias[e * u:(e + 1) * u], training=True)
            h = torch.relu(h)
        torch.testing.assert_close(out[e], h, rtol=1e-5, atol=1e-5)


# -- contract tests over EVERY registered arch (ALL_ARCHS: a new arch is checked without editing a list) --------


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_feature_layouts_declare_the_batch_axis(arch, small_data):
    """Each shared feature's declared batch axis is the one axis that follows the batch size (5 vs 7 rows)."""
    from conftest import first_rows

    model = build_arch(arch, small_data).eval()
    with torch.no_grad():
        f5, f7 = model.encode(first_rows(small_data, 5)), model.encode(first_rows(small_data, 7))
    layouts = model.feature_layouts()
    if layouts is None:  # undeclared: the contract's default, batch first
        layouts = [None] * len(f5)
    assert len(layouts) == len(f5)
    for i, (a, b, lay) in enumerate(zip(f5, f7, layouts)):
        batch_axis = 0 if lay is None else lay.batch_axis % a.dim()
        changed = [ax for ax in range(a.dim()) if a.shape[ax] != b.shape[ax]]
        assert changed == [batch_axis], f"feature {i} of shape {tuple(a.shape)}: {lay}"
        if lay is not None:
            assert lay.channel_axis % a.dim() != batch_axis
            assert all(p % a.dim() not in (batch_axis, lay.channel_axis % a.dim()) for p in lay.position_axes)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_parameter_partition_and_gradient_contract(arch, small_data):
    """Every parameter is shared or belongs to one task; per-task gradients via the features equal autograd."""
    from conftest import check_contract, check_partition, first_rows

    torch.manual_seed(0)
    model = build_arch(arch, small_data)
    if model.shared_parameters():
        check_partition(model, len(model.loss_tasks()))
        check_contract(model, first_rows(small_data, 32))
    else:  # nothing shared (single): the task networks hold every parameter, each exactly once
        owned = [id(p) for ps in model.task_parameters().values() for p in ps]
        assert len(owned) == len(set(owned)) and set(owned) == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_selection_groups_partition_the_state(arch, small_data):
    """An arch that selects per task (selection_groups) names, per task, a state prefix; every state key falls
    under exactly one prefix (the trainer refuses otherwise)."""
    model = build_arch(arch, small_data)
    groups = model.selection_groups()
    if groups is None:
        assert model.shared_parameters(), f"{arch} shares nothing, so it should select per task"
        return
    assert set(groups) == set(model.task_names)
    for key in model.state_dict():
        assert sum(key.startswith(p) for p in groups.values()) == 1, key
