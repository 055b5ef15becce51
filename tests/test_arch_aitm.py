"""AITM (baselines/archs/aitm.py): the calibrator against hand-computed values, plain BCE at alpha 0, gradient
flow through the information transfer, the AIT attention, parameter placement, the encode/decode contract,
options and short CLI runs."""
from __future__ import annotations

import json
import math

import pytest
import torch

from mtlbench.baselines.archs.aitm import AIT
from mtlbench.cli import main
from mtlbench.data import TaskSpec
from mtlbench.errors import MtlbenchError
from mtlbench.objectives import task_loss
from mtlbench.registry import build_options, get

from conftest import build_arch, check_contract as _check_contract, check_partition as _check_partition
from conftest import first_rows as _batch

CLI = ["-D", "n_rows=4000", "-D", "n_users=300", "-D", "n_items=200", "--epochs", "1", "--batch-size", "256",
       "--quiet"]
VARIANTS = [{}, {"alpha": 0.0}, {"transfer_from": "tower"}, {"alpha": 0.0, "transfer_from": "tower"},
            {"tower_units": [16], "attention_dim": 8, "batch_norm": False, "dropout": 0.2}]


def _logit(p):
    return math.log(p / (1 - p))


@pytest.mark.parametrize("options", VARIANTS)
@pytest.mark.parametrize("tasks", [("ctr", "cvr", "ctcvr"), ("ctr", "ctcvr"), ("cvr",)])
def test_forward_shapes_and_partition(options, tasks, small_data):
    data = small_data.select_tasks(tasks)
    torch.manual_seed(0)
    model = build_arch("aitm", data, **options)
    out = model(_batch(data))
    assert len(out.outputs) == len(tasks)
    assert all(o.shape == (64, 1) and torch.isfinite(o).all() for o in out.outputs)
    _check_partition(model, len(tasks))
    assert model.loss_tasks() == tasks


@pytest.mark.parametrize("options", VARIANTS)
def test_encode_decode_contract(options, small_data):
    torch.manual_seed(1)
    _check_contract(build_arch("aitm", small_data, **options), _batch(small_data, 128))


def test_calibrator_matches_hand_computed_values(small_data):
    """Two rows, three funnel steps; task_losses = BCE + alpha * mean(max(p_t - p_(t-1), 0)) for t >= 2."""
    model = build_arch("aitm", small_data, alpha=0.5)
    p = [[0.5, 0.5], [0.7, 0.2], [0.4, 0.3]]  # p[t][row]
    outputs = [torch.tensor([[_logit(v)] for v in row]) for row in p]
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    masks = torch.tensor([[True, True, True], [True, False, True]])
    batch = {"labels": labels, "masks": masks}
    losses = model.task_losses(outputs, batch)
    # calibrator: t=2: max(.7-.5, 0)=.2, max(.2-.5, 0)=0 -> mean .1 -> x.5 = .05
    #             t=3: max(.4-.7, 0)=0, max(.3-.2, 0)=.1 -> mean .05 -> x.5 = .025
    cal = [t.item() for t in model.calibrator(outputs)]
    assert cal == pytest.approx([0.0, 0.05, 0.025], abs=1e-6)
    bce0 = -(math.log(0.5) + math.log(0.5)) / 2
    bce1 = -math.log(0.3)  # the second row of task 2 is masked
    bce2 = -(math.log(0.4) + math.log(0.7)) / 2
    assert [l.item() for l in losses] == pytest.approx([bce0, bce1 + 0.05, bce2 + 0.025], abs=1e-5)


def test_default_alpha_is_the_official_value(small_data):
    assert build_arch("aitm", small_data).o.alpha == 0.6


def test_alpha_zero_gives_plain_bce(small_data):
    torch.manual_seed(2)
    model = build_arch("aitm", small_data, alpha=0.0)
    batch = _batch(small_data, 128)
    out = model(batch)
    plain = [task_loss(t, o, batch["labels"][:, i], batch["masks"][:, i])
             for i, (t, o) in enumerate(zip(small_data.tasks, out.outputs))]
    for a, b in zip(model.task_losses(out.outputs, batch), plain):
        torch.testing.assert_close(a, b)
    with_cal = build_arch("aitm", small_data, alpha=0.6)
    losses = with_cal.task_losses(out.outputs, batch)
    torch.testing.assert_close(losses[0], plain[0])
    assert all(float((l - b).detach()) >= 0 for l, b in zip(losses, plain))


@pytest.mark.parametrize("transfer_from", ["ait", "tower"])
def test_gradient_flows_into_the_previous_tower_through_the_info_transfer(transfer_from, small_data):
    """With alpha 0 the only path from task t's loss to task t-1's tower is the info transfer; it carries
    gradient. Nothing flows backwards: task t-1's loss never reaches task t's modules."""
    torch.manual_seed(3)
    model = build_arch("aitm", small_data, alpha=0.0, transfer_from=transfer_from)
    batch = _batch(small_data, 128)
    losses = model.task_losses(model(batch).outputs, batch)
    funnel = model.shared["funnel"]
    for t in (1, 2):
        prev = list(funnel[model.task_names[t - 1]]["tower"].parameters())
        g = torch.autograd.grad(losses[t], prev, retain_graph=True)
        assert all(float(x.abs().max()) > 0 for x in g)
    later = list(funnel["cvr"].parameters()) + list(model.heads["ctcvr"].parameters())
    g = torch.autograd.grad(losses[0], later, retain_graph=True, allow_unused=True)
    assert all(x is None or float(x.abs().max()) == 0.0 for x in g)
    # zeroing the info layer's output weights cuts the transfer: task 2's loss no longer reaches task 1's tower
    info = funnel["cvr"]["info"] if "info" in funnel["cvr"] else model.heads["cvr"]["info"]
    with torch.no_grad():
        info.net[0].weight.zero_()
    losses = model.task_losses(model(batch).outputs, batch)
    g = torch.autograd.grad(losses[1], list(funnel["ctr"]["tower"].parameters()), allow_unused=True)
    assert all(x is None or float(x.abs().max()) == 0.0 for x in g)


def test_placement(small_data):
    m = build_arch("aitm", small_data)  # alpha > 0: everything of ctr and cvr feeds a later loss
    assert not len(m.heads["ctr"]) and not len(m.heads["cvr"])
    assert set(m.heads["ctcvr"]) == {"tower", "info", "ait", "out"}
    assert set(m.shared["funnel"]) == {"ctr", "cvr"}
    m = build_arch("aitm", small_data, alpha=0.0)
    assert set(m.heads["ctr"]) == {"out"} and set(m.heads["cvr"]) == {"out"}
    assert m.describe()["placement"]["cvr.ait"] == "shared"
    m = build_arch("aitm", small_data, alpha=0.0, transfer_from="tower")
    assert set(m.heads["cvr"]) == {"info", "ait", "out"}
    single = build_arch("aitm", small_data.select_tasks(("ctcvr",)))
    assert "funnel" not in single.shared and set(single.heads["ctcvr"]) == {"tower", "out"}


def test_ait_attention_by_hand():
    torch.manual_seed(4)
    ait = AIT(3, 2)
    p, q = torch.randn(5, 3), torch.randn(5, 3)
    a, v = ait.weights(p, q)
    Wq, Wk, Wv = ait.query.weight, ait.key.weight, ait.value.weight
    for u, col in ((p, 0), (q, 1)):
        torch.testing.assert_close(v[:, col], u @ Wv.T)
    s = torch.stack([((u @ Wq.T) * (u @ Wk.T)).sum(-1) / math.sqrt(2) for u in (p, q)], dim=1)
    torch.testing.assert_close(a, torch.softmax(s, dim=1))
    torch.testing.assert_close(ait(p, q), a[:, :1] * (p @ Wv.T) + a[:, 1:] * (q @ Wv.T))


@pytest.mark.parametrize("options,match", [
    ({"alpha": -0.1}, "alpha"), ({"attention_dim": 0}, "attention_dim"), ({"tower_units": []}, "tower_units"),
    ({"transfer_from": "info"}, "transfer_from"), ({"dropout": 1.0}, "dropout"), ({"weight": 0.6}, "unknown option"),
])
def test_bad_options_one_line(options, match, small_data):
    with pytest.raises(MtlbenchError, match=match) as info:
        build_arch("aitm", small_data, **options)
    assert "\n" not in str(info.value)


def test_non_binary_task_is_one_line(small_data):
    tasks = (small_data.tasks[0], TaskSpec("spend", "regression", ("mse",)))
    e = get("arch", "aitm")
    with pytest.raises(MtlbenchError, match="spend is regression") as info:
        e.obj(small_data.schema, tasks, 8, build_options(e.options_class, e.resolve_options({})))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("optimizer", ["ew", "pcgrad"])
def test_cli_run(optimizer, tmp_path):
    argv = ["run", "--arch", "aitm", "--tasks", "ctr,cvr,ctcvr", *CLI, "--results-dir", str(tmp_path)]
    assert main(argv + (["--optimizer", optimizer] if optimizer != "ew" else [])) == 0
    (path,) = tmp_path.glob("*.json")
    rec = json.loads(path.read_text())
    assert rec["status"] == "ok"
    assert all(0.0 < rec["metrics"]["test"][t]["auc"] < 1.0 for t in ("ctr", "cvr", "ctcvr"))
    p = rec["parameters"]
    assert p["total"] == p["shared"] + sum(p["task"].values())
    assert rec["arch_info"]["funnel"] == ["ctr", "cvr", "ctcvr"]
