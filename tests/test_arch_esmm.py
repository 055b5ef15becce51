"""ESMM (baselines/archs/esmm.py): pCTCVR = pCTR x pCVR computed stably, losses on ctr and ctcvr only, the CVR
tower trained only through the product, parameter placement, the encode/decode contract, task-list errors and
short CLI runs whose records carry AUCs for all three tasks."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mtlbench.baselines.archs.esmm import product_logit
from mtlbench.cli import main
from mtlbench.errors import MtlbenchError
from mtlbench.objectives import task_loss

from conftest import assert_close_fp, build_arch, check_contract as _check_contract
from conftest import check_partition as _check_partition
from conftest import first_rows as _batch

CLI = ["-D", "n_rows=4000", "-D", "n_users=300", "-D", "n_items=200", "--epochs", "1", "--batch-size", "256",
       "--quiet"]


@pytest.mark.parametrize("tasks", [("ctr", "cvr", "ctcvr"), ("ctr", "ctcvr"), ("ctcvr", "cvr", "ctr")])
def test_shapes_loss_tasks_and_partition(tasks, small_data):
    data = small_data.select_tasks(tasks)
    torch.manual_seed(0)
    model = build_arch("esmm", data)
    out = model(_batch(data))
    assert len(out.outputs) == len(tasks)
    assert all(o.shape == (64, 1) and torch.isfinite(o).all() for o in out.outputs)
    assert model.loss_tasks() == tuple(t for t in tasks if t != "cvr")
    assert set(model.heads) == {"ctr", "ctcvr"}
    assert "ctr_tower" in model.shared and set(model.heads["ctcvr"]) == {"cvr_tower"} and not len(model.heads["ctr"])
    _check_partition(model, 2)
    assert len(model.task_losses(out.outputs, _batch(data))) == 2


def test_ctcvr_is_the_product(small_data):
    torch.manual_seed(1)
    model = build_arch("esmm", small_data).eval()
    ctr, cvr, ctcvr = (torch.sigmoid(o.reshape(-1)) for o in model(_batch(small_data, 256)).outputs)
    assert_close_fp(ctcvr, ctr * cvr)
    # the ctr output is the shared CTR tower's logit (exposed as a feature)
    out = model(_batch(small_data, 256))
    torch.testing.assert_close(out.outputs[0], out.features[1])


def test_product_logit_is_stable_and_exact():
    a = torch.tensor([-1e4, -200.0, -30.0, -3.0, 0.0, 2.5, 30.0, 200.0, 1e4], dtype=torch.float64)
    A, B = torch.meshgrid(a, a, indexing="ij")
    z = product_logit(A, B)
    assert torch.isfinite(z).all()
    # reference in float64 where the plain formula is accurate
    ok = (A.abs() <= 3) & (B.abs() <= 3)
    p = torch.sigmoid(A[ok]) * torch.sigmoid(B[ok])
    torch.testing.assert_close(z[ok], torch.log(p) - torch.log1p(-p), rtol=1e-12, atol=1e-12)
    # p -> 1 (both logits large): 1 - p ~ e^-a + e^-b, where the plain formula has lost all its digits
    a30, a40 = torch.tensor(30.0, dtype=torch.float64), torch.tensor(40.0, dtype=torch.float64)
    torch.testing.assert_close(product_logit(a30, a40), -torch.log((-a30).exp() + (-a40).exp()), rtol=1e-12,
                               atol=1e-12)
    # p -> 0: logit ~ log p = -softplus(-a) - softplus(-b)
    torch.testing.assert_close(z[0, 1], torch.tensor(-1e4 - 200.0, dtype=torch.float64))
    # float32, extreme logits: finite loss and gradients for both labels
    a32 = torch.tensor([150.0, -150.0, 150.0, 40.0], requires_grad=True)
    b32 = torch.tensor([150.0, 150.0, -150.0, 40.0], requires_grad=True)
    zz = product_logit(a32, b32)
    for y in (0.0, 1.0):
        loss = F.binary_cross_entropy_with_logits(zz, torch.full_like(zz, y))
        ga, gb = torch.autograd.grad(loss, (a32, b32), retain_graph=True)
        assert torch.isfinite(loss) and torch.isfinite(ga).all() and torch.isfinite(gb).all()


def test_losses_are_ctr_and_ctcvr_over_all_impressions(small_data):
    torch.manual_seed(2)
    model = build_arch("esmm", small_data)
    batch = _batch(small_data, 128)
    out = model(batch)
    ctr_loss, ctcvr_loss = model.task_losses(out.outputs, batch)
    t = small_data.tasks
    torch.testing.assert_close(ctr_loss, task_loss(t[0], out.outputs[0], batch["labels"][:, 0], batch["masks"][:, 0]))
    p = torch.sigmoid(out.outputs[0]) * torch.sigmoid(out.outputs[1])
    y = batch["labels"][:, 2:3]
    assert bool(batch["masks"][:, 2].all())  # ctcvr: every impression
    assert_close_fp(ctcvr_loss, F.binary_cross_entropy(p, y))
    # no direct CVR loss: changing the cvr labels changes nothing
    flipped = dict(batch, labels=batch["labels"].clone())
    flipped["labels"][:, 1] = 1.0 - flipped["labels"][:, 1]
    for a, b in zip(model.task_losses(out.outputs, flipped), (ctr_loss, ctcvr_loss)):
        assert torch.equal(a, b)


def test_cvr_tower_gets_no_gradient_from_the_ctr_loss(small_data):
    torch.manual_seed(3)
    model = build_arch("esmm", small_data)
    batch = _batch(small_data, 128)
    ctr_loss, ctcvr_loss = model.task_losses(model(batch).outputs, batch)
    cvr_tower = list(model.heads["ctcvr"]["cvr_tower"].parameters())
    ctr_tower = list(model.shared["ctr_tower"].parameters())
    g = torch.autograd.grad(ctr_loss, cvr_tower, retain_graph=True, allow_unused=True)
    assert all(x is None or float(x.abs().max()) == 0.0 for x in g)
    g = torch.autograd.grad(ctcvr_loss, cvr_tower, retain_graph=True)
    assert all(float(x.abs().max()) > 0 for x in g)
    for loss in (ctr_loss, ctcvr_loss):  # the CTR tower is trained by both losses: a shared parameter group
        g = torch.autograd.grad(loss, ctr_tower, retain_graph=True)
        assert any(float(x.abs().max()) > 0 for x in g)


@pytest.mark.parametrize("tasks", [("ctr", "cvr", "ctcvr"), ("ctcvr", "ctr")])
def test_encode_decode_contract(tasks, small_data):
    torch.manual_seed(4)
    data = small_data.select_tasks(tasks)
    _check_contract(build_arch("esmm", data), _batch(data, 128))


def test_renamed_tasks_via_options(small_data):
    """-A ctr_task=... names the roles; a run is valid whatever the dataset calls its tasks."""
    from dataclasses import replace

    from mtlbench.data import MultiTaskData

    renamed = MultiTaskData("x", "1", small_data.schema,
                            tuple(replace(t, name=n) for t, n in zip(small_data.tasks, ("click", "conv", "buy"))),
                            small_data.splits)
    model = build_arch("esmm", renamed, ctr_task="click", cvr_task="conv", ctcvr_task="buy")
    assert model.loss_tasks() == ("click", "buy")
    with pytest.raises(MtlbenchError, match="ctr_task 'ctr'"):
        build_arch("esmm", renamed)


@pytest.mark.parametrize("tasks,options,match", [
    (("ctr", "cvr"), {}, "needs its ctcvr_task 'ctcvr'"),
    (("cvr", "ctcvr"), {}, "needs its ctr_task 'ctr'"),
    (("cvr",), {}, "needs its ctr_task"),
    (("ctr", "cvr", "ctcvr"), {"ctr_task": "click"}, "ctr_task 'click'"),
    (("ctr", "cvr", "ctcvr"), {"cvr_task": "ctr"}, "three different tasks"),
    (("ctr", "cvr", "ctcvr"), {"cvr_task": "purchase"}, "have no role"),
    (("ctr", "cvr", "ctcvr"), {"tower_units": [0]}, "tower_units"),
])
def test_bad_task_lists_and_options_one_line(tasks, options, match, small_data):
    with pytest.raises(MtlbenchError, match=match) as info:
        build_arch("esmm", small_data.select_tasks(tasks), **options)
    assert "\n" not in str(info.value)


def test_cli_without_ctcvr_is_one_line(tmp_path, capsys):
    assert main(["run", "--arch", "esmm", "--tasks", "ctr,cvr", *CLI, "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ctcvr" in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.parametrize("optimizer", ["ew", "pcgrad"])
def test_cli_run(optimizer, tmp_path):
    argv = ["run", "--arch", "esmm", "--tasks", "ctr,cvr,ctcvr", *CLI, "--results-dir", str(tmp_path)]
    assert main(argv + (["--optimizer", optimizer] if optimizer != "ew" else [])) == 0
    (path,) = tmp_path.glob("*.json")
    rec = json.loads(path.read_text())
    assert rec["status"] == "ok"
    for split in ("val", "test"):
        assert all(0.0 < rec["metrics"][split][t]["auc"] < 1.0 for t in ("ctr", "cvr", "ctcvr"))
    assert set(rec["curves"][0]["train_loss"]) == {"ctr", "ctcvr"}  # the optimised losses
    p = rec["parameters"]
    assert p["total"] == p["shared"] + sum(p["task"].values()) and set(p["task"]) == {"ctr", "ctcvr"}
    assert rec["arch_info"]["cvr_tower"] == "heads.ctcvr"
