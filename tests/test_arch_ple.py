"""PLE and CGC (baselines/archs/ple.py): the routing (gate widths, a shared gate over ALL experts of every level
but the last, none at the last, every gate and expert used), shapes, partition, the encode/decode contract,
options and short CLI runs."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mtlbench.cli import main
from mtlbench.errors import MtlbenchError
from mtlbench.layers import ExpertBank

from conftest import build_arch, check_contract as _check_contract, check_partition as _check_partition
from conftest import first_rows as _batch

CLI = ["-D", "n_rows=4000", "-D", "n_users=300", "-D", "n_items=200", "--epochs", "1", "--batch-size", "256",
       "--quiet"]
VARIANTS = [("cgc", {}), ("ple", {"levels": 1}), ("ple", {}), ("ple", {"levels": 3}),
            ("ple", {"shared_experts": 1, "task_experts": 2, "expert_units": [32, 16], "batch_norm": False})]


@pytest.mark.parametrize("arch,options", VARIANTS)
@pytest.mark.parametrize("tasks", [("ctr", "cvr", "ctcvr"), ("cvr",)])
def test_forward_shapes_and_partition(arch, options, tasks, small_data):
    data = small_data.select_tasks(tasks)
    torch.manual_seed(0)
    model = build_arch(arch, data, **options)
    out = model(_batch(data))
    assert len(out.outputs) == len(tasks)
    assert all(o.shape == (64, 1) and torch.isfinite(o).all() for o in out.outputs)
    _check_partition(model, len(tasks))


@pytest.mark.parametrize("arch,options", VARIANTS)
def test_encode_decode_contract(arch, options, small_data):
    torch.manual_seed(1)
    _check_contract(build_arch(arch, small_data, **options), _batch(small_data, 128))


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_routing_gate_widths(levels, small_data):
    """Shared gate at every level but the last, over n_shared + T * n_specific experts; task gates over
    n_specific + n_shared; no shared gate at the last level."""
    ns, nt, T = 3, 2, len(small_data.tasks)
    model = build_arch("ple", small_data, levels=levels, shared_experts=ns, task_experts=nt)
    shared_gates = {n: m for n, m in model.named_modules() if n.endswith("shared_gate")}
    assert sorted(shared_gates) == [f"shared.levels.{j}.shared_gate" for j in range(levels - 1)]
    assert all(m.out_features == ns + T * nt for m in shared_gates.values())
    assert len(model.shared["levels"]) == levels - 1  # the last level lives apart and has no shared gate
    for t in model.task_names:
        assert model.heads[t]["gate"].out_features == nt + ns
        assert ("prev_gate" in model.heads[t]) == (levels >= 2)
    task_gates = [m for n, m in model.named_modules() if ".task_gates." in n and isinstance(m, nn.Linear)]
    assert len(task_gates) == T * max(levels - 2, 0) and all(m.out_features == nt + ns for m in task_gates)
    # expert banks: shared + T task groups per level
    banks = [m for m in model.modules() if isinstance(m, ExpertBank)]
    assert len(banks) == levels * (1 + T)
    assert sorted(b.n for b in banks) == sorted([ns] * levels + [nt] * (levels * T))
    assert model.describe()["levels"] == levels and model.describe()["shared_gates"] == levels - 1


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_every_gate_runs_and_every_parameter_gets_a_gradient(levels, small_data):
    torch.manual_seed(3)
    model = build_arch("ple", small_data, levels=levels)
    called, widths = set(), {}
    gates = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and ("gate" in n.split(".")[-1] or ".task_gates." in n)}

    def hook(name):
        def record(module, inputs, output):
            called.add(name)
            widths[name] = output.shape[-1]
        return record

    hooks = [m.register_forward_hook(hook(n)) for n, m in gates.items()]
    batch = _batch(small_data)
    out = model(batch)
    for h in hooks:
        h.remove()
    assert called == set(gates), f"gates never used: {set(gates) - called}"
    if levels > 1:
        assert widths["shared.levels.0.shared_gate"] == 2 + 3 * 1
    sum(model.task_losses(out.outputs, batch)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or float(p.grad.abs().max()) == 0.0]
    assert not missing, f"parameters without gradient: {missing}"


def test_shared_gate_routes_every_tasks_experts_to_every_task(small_data):
    """At level 1 of a 2-level PLE, ctr's loss reaches cvr's level-1 experts only through the shared gate over
    ALL experts (a shared gate over the shared experts only would give exactly zero here)."""
    torch.manual_seed(4)
    model = build_arch("ple", small_data, levels=2)
    batch = _batch(small_data, 128)
    out = model(batch)
    ctr_loss = model.task_losses(out.outputs, batch)[0]
    cvr_level1 = list(model.shared["levels"][0]["task_experts"]["cvr"].parameters())
    grads = torch.autograd.grad(ctr_loss, cvr_level1, allow_unused=True)
    assert all(g is not None and float(g.abs().max()) > 0 for g in grads)
    # CGC has no shared gate: task experts stay private to their task
    cgc = build_arch("cgc", small_data)
    out = cgc(batch)
    ctr_loss = cgc.task_losses(out.outputs, batch)[0]
    grads = torch.autograd.grad(ctr_loss, list(cgc.heads["cvr"].parameters()), allow_unused=True)
    assert all(g is None or float(g.abs().max()) == 0.0 for g in grads)


def test_cgc_is_ple_with_one_level(small_data):
    torch.manual_seed(5)
    cgc = build_arch("cgc", small_data)
    torch.manual_seed(5)
    ple1 = build_arch("ple", small_data, levels=1)
    assert cgc.state_dict().keys() == ple1.state_dict().keys()
    for (k, a), (_, b) in zip(cgc.state_dict().items(), ple1.state_dict().items()):
        assert torch.equal(a, b), k
    cgc.eval(), ple1.eval()
    batch = _batch(small_data)
    for a, b in zip(cgc(batch).outputs, ple1(batch).outputs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("arch,options,match", [
    ("ple", {"levels": 0}, "option 'levels' must be >= 1"),
    ("ple", {"levels": -2}, "option 'levels' must be >= 1"),
    ("ple", {"shared_experts": 0}, "shared_experts"),
    ("ple", {"task_experts": 0}, "task_experts"),
    ("ple", {"expert_units": []}, "expert_units"),
    ("ple", {"levels": "two"}, "integer"),
    ("cgc", {"levels": 2}, "unknown option"),
])
def test_bad_options_one_line(arch, options, match, small_data):
    with pytest.raises(MtlbenchError, match=match) as info:
        build_arch(arch, small_data, **options)
    assert "\n" not in str(info.value)


def test_cli_bad_levels_is_one_line(tmp_path, capsys):
    assert main(["run", "--arch", "ple", "-A", "levels=0", *CLI, "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "levels" in err and "0" in err


@pytest.mark.parametrize("arch,optimizer", [("ple", "ew"), ("ple", "pcgrad"), ("cgc", "ew"), ("cgc", "pcgrad")])
def test_cli_run(arch, optimizer, tmp_path):
    argv = ["run", "--arch", arch, "--tasks", "ctr,cvr,ctcvr", *CLI, "--results-dir", str(tmp_path)]
    assert main(argv + (["--optimizer", optimizer] if optimizer != "ew" else [])) == 0
    (path,) = tmp_path.glob("*.json")
    rec = json.loads(path.read_text())
    assert rec["status"] == "ok"
    assert all(0.0 < rec["metrics"]["test"][t]["auc"] < 1.0 for t in ("ctr", "cvr", "ctcvr"))
    p = rec["parameters"]
    assert p["total"] == p["shared"] + sum(p["task"].values())
    assert rec["arch_info"]["levels"] == (1 if arch == "cgc" else 2)
