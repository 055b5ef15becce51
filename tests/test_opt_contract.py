"""Contract tests run on EVERY registered optimizer (a new method is checked without editing this file).

Issue 16: a task with no labelled row in a batch is absent from that step for every method -- weights, Jacobian
rows, loss histories, learned state -- rather than present with loss 0. The check: a method on three tasks with
``cvr`` absent must make exactly the update the same method makes on a two-task model without ``cvr`` (same
parameters, same batches, same generator), step after step, and log weight 0 for ``cvr``.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from mtlbench.optim import StepContext, present_tasks
from mtlbench.registry import get, names

from conftest import assert_close_fp, build_arch, make_method, short_run

OPTIMIZERS = names("optimizer")


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal up to float32 round-off (the two computations run the same operations except for the absent
    task): the shared dtype- and magnitude-derived tolerance."""
    assert_close_fp(got, want, msg=what)


def _ctx(model, batch, gen, step):
    def fwd():
        out = model(batch)
        return out, model.task_losses(out.outputs, batch)

    out, losses = fwd()
    return StepContext(model, batch, out, losses, fwd, gen, step, 1)


def _sgd(params, lr=0.05):
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)
                p.grad = None


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_an_absent_task_is_left_out_of_the_step(name, small_data):
    full = ("ctr", "cvr", "ctcvr")
    keep = [0, 2]
    data2 = small_data.select_tasks([full[i] for i in keep])
    torch.manual_seed(0)
    m3 = build_arch("mmoe", small_data)
    m2 = build_arch("mmoe", data2)
    m2.load_state_dict({k: v for k, v in m3.state_dict().items() if not k.startswith("heads.cvr.")})
    opt3, opt2 = make_method(name, full), make_method(name, [full[i] for i in keep])
    g3, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    rows = small_data.splits["train"].tensors
    for step in range(3):
        b3 = {k: v[step * 96:(step + 1) * 96].clone() for k, v in rows.items()}
        b3["masks"][:, 1] = False  # cvr has no labelled row in these batches
        b2 = dict(b3, labels=b3["labels"][:, keep], masks=b3["masks"][:, keep])
        ctx3, ctx2 = _ctx(m3, b3, g3, step), _ctx(m2, b2, g2, step)
        present = present_tasks(ctx3)
        assert present == keep
        assert present_tasks(ctx2) is None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with opt3.only(present):
                opt3.step(ctx3.restrict(present))
                grads3 = {n: None if p.grad is None else p.grad.clone() for n, p in m3.named_parameters()}
                _sgd([*m3.parameters(), *opt3.parameters()])
                opt3.after_step(ctx3.restrict(present))
            opt2.step(ctx2)
            grads2 = {n: None if p.grad is None else p.grad.clone() for n, p in m2.named_parameters()}
            _sgd([*m2.parameters(), *opt2.parameters()])
            opt2.after_step(ctx2)
        for n, g in grads3.items():
            if n.startswith("heads.cvr."):
                assert g is None or float(g.abs().max()) == 0.0, f"step {step + 1}: the absent task's head moved"
                continue
            assert (g is None) == (grads2[n] is None), n
            if g is not None:
                _close(g, grads2[n], f"{name}, step {step + 1}: gradient of {n}")
        if opt2.last_weights is not None:
            w3 = opt3.last_weights
            assert w3.shape == (3,) and float(w3[1]) == 0.0, f"{name}: the absent task got weight {w3}"
            _close(w3[keep].double(), opt2.last_weights.double(), f"{name}, step {step + 1}: task weights")
        for p3, p2 in zip(opt3.parameters(), opt2.parameters()):  # learned per-task method parameters (UW, IMTL)
            _close(p3.detach()[keep], p2.detach(), f"{name}: its own parameters")


@pytest.mark.parametrize("name", ["famo", "uw", "mgda"])
def test_training_with_a_task_absent_from_many_batches(name, tmp_path):
    """Small batches leave cvr (labelled on clicks only) out of many batches; the run must not treat it as a
    task with loss 0 (FAMO excluded such tasks with a min_loss warning and collapsed on 139 tasks)."""
    rec = short_run(tmp_path, name, epochs=1, extra=["--batch-size", "16"])
    warned = rec.get("optimizer_warnings", [])  # written only when not empty
    assert not any("min_loss" in w for w in warned), warned
    losses = rec["curves"][0]["train_loss"]
    assert all(v is not None and math.isfinite(v) and v > 0 for v in losses.values()), losses


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_defaults_resolve_and_build(name):
    """Every optimizer's defaults resolve to JSON values and build an instance for one and for three tasks."""
    entry = get("optimizer", name)
    resolved = entry.resolve_options({})
    assert isinstance(resolved, dict)
    for tasks in (("a",), ("a", "b", "c")):
        m = make_method(name, tasks)
        assert m.task_names == tasks
        assert set(m.task_state) <= {k for k in m.task_state}  # declared state names are strings
        for key in m.task_state:
            assert hasattr(m, key.partition(".")[0]), f"{name} declares task_state '{key}' it does not have"
