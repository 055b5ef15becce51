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

from conftest import build_arch, check_contract as _check_contract, check_partition as _check_partition
from conftest import first_rows as _batch

CLI = ["-D", "n_rows=4000", "-D", "n_users=300", "-D", "n_items=200", "--epochs", "1", "--batch-size", "256",
       "--quiet"]


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
