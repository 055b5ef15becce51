"""OMoE (baselines/archs/omoe.py): one gate shared by all tasks; shapes, partition, the encode/decode contract,
agreement with MMoE when MMoE's gates are tied, options and short CLI runs."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mtlbench.cli import main
from mtlbench.errors import MtlbenchError
from mtlbench.registry import get

from conftest import build_arch

CLI = ["-D", "n_rows=4000", "-D", "n_users=300", "-D", "n_items=200", "--epochs", "1", "--batch-size", "256",
       "--quiet"]


def _batch(data, n=64):
    return {k: v[:n] for k, v in data.splits["train"].tensors.items()}


def _check_partition(model, n_heads):
    shared = {id(p) for p in model.shared_parameters()}
    per_task = [{id(p) for p in ps} for ps in model.task_parameters().values()]
    assert len(per_task) == n_heads and shared
    union = set(shared)
    for s in per_task:
        assert not (s & union), "a parameter is declared twice"
        union |= s
    assert union == {id(p) for p in model.parameters()}, "some parameter is neither shared nor task-specific"
    counts = model.parameter_counts()
    assert counts["total"] == counts["shared"] + sum(counts["task"].values())


def _check_contract(model, batch):
    """Per-task gradients of the shared parameters via the features equal direct autograd, over the arch's own
    loss_tasks()/task_losses(); and no task's loss reaches another task's head."""
    model.train()
    out = model(batch)
    losses = model.task_losses(out.outputs, batch)
    assert len(losses) == len(model.loss_tasks())
    shared = model.shared_parameters()
    for loss in losses:
        direct = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        fg = torch.autograd.grad(loss, out.features, retain_graph=True, allow_unused=True)
        fg = [torch.zeros_like(f) if g is None else g for f, g in zip(out.features, fg)]
        via = torch.autograd.grad(out.features, shared, fg, retain_graph=True, allow_unused=True)
        for p, d, v in zip(shared, direct, via):
            torch.testing.assert_close(torch.zeros_like(p) if d is None else d,
                                       torch.zeros_like(p) if v is None else v, rtol=1e-4, atol=1e-6)
    task_params = model.task_parameters()
    for i, loss in enumerate(losses):
        for j, name in enumerate(model.loss_tasks()):
            if i != j and task_params[name]:
                grads = torch.autograd.grad(loss, task_params[name], retain_graph=True, allow_unused=True)
                assert all(g is None or float(g.abs().max()) == 0.0 for g in grads)


@pytest.mark.parametrize("tasks", [("ctr", "cvr", "ctcvr"), ("ctr", "cvr"), ("cvr",)])
def test_forward_shapes_and_partition(tasks, small_data):
    data = small_data.select_tasks(tasks)
    torch.manual_seed(0)
    model = build_arch("omoe", data)
    out = model(_batch(data))
    assert len(out.outputs) == len(tasks)
    assert all(o.shape == (64, 1) and torch.isfinite(o).all() for o in out.outputs)
    assert len(out.features) == 1 and out.features[0].shape == (64, 64)  # the one mixture, expert width 64
    _check_partition(model, len(tasks))


def test_one_gate_shared_by_all_tasks(small_data):
    model = build_arch("omoe", small_data, n_experts=5)
    gates = [n for n, m in model.named_modules() if n.endswith("gate")]
    assert gates == ["shared.gate"]
    assert model.shared["gate"].out_features == 5
    assert all(set(model.heads[t]) == {"tower"} for t in model.task_names)


def test_encode_decode_contract(small_data):
    torch.manual_seed(1)
    _check_contract(build_arch("omoe", small_data), _batch(small_data, 128))


def test_equals_mmoe_with_tied_gates(small_data):
    """OMoE is MMoE whose per-task gates are one gate: copy OMoE's weights into MMoE, tie every MMoE gate to
    OMoE's gate, and both give the same outputs."""
    torch.manual_seed(2)
    omoe = build_arch("omoe", small_data, n_experts=4)
    mmoe = build_arch("mmoe", small_data, n_experts=4)
    state = {}
    for k, v in omoe.state_dict().items():
        if k.startswith("shared.gate."):
            for t in omoe.task_names:
                state[f"heads.{t}.gate.{k.split('.')[-1]}"] = v
        else:
            state[k] = v
    mmoe.load_state_dict(state)
    omoe.eval(), mmoe.eval()
    batch = _batch(small_data)
    for a, b in zip(omoe(batch).outputs, mmoe(batch).outputs):
        torch.testing.assert_close(a, b)


def test_options_match_mmoe():
    ours = {f.name: f.default for f in dataclasses.fields(get("arch", "omoe").options_class)}
    theirs = {f.name: f.default for f in dataclasses.fields(get("arch", "mmoe").options_class)}
    assert ours == theirs


@pytest.mark.parametrize("options,match", [({"n_experts": 0}, "n_experts"), ({"expert_units": []}, "expert_units"),
                                           ({"dropout": 1.5}, "dropout"), ({"gates": 2}, "unknown option")])
def test_bad_options_one_line(options, match, small_data):
    with pytest.raises(MtlbenchError, match=match) as info:
        build_arch("omoe", small_data, **options)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("optimizer", ["ew", "pcgrad"])
def test_cli_run(optimizer, tmp_path):
    argv = ["run", "--arch", "omoe", "--tasks", "ctr,cvr,ctcvr", *CLI, "--results-dir", str(tmp_path)]
    assert main(argv + (["--optimizer", optimizer] if optimizer != "ew" else [])) == 0
    (path,) = tmp_path.glob("*.json")
    rec = json.loads(path.read_text())
    assert rec["status"] == "ok"
    assert all(0.0 < rec["metrics"]["test"][t]["auc"] < 1.0 for t in ("ctr", "cvr", "ctcvr"))
    p = rec["parameters"]
    assert p["total"] == p["shared"] + sum(p["task"].values())
