"""DTRN: shapes, the shared/task partition, the encode/decode contract, sequence handling and its errors."""
from __future__ import annotations

import json

import pytest
import torch

from mtlbench.cli import main
from mtlbench.data import CategoricalField, FeatureSchema, SequenceField, TaskSpec
from mtlbench.errors import MtlbenchError
from mtlbench.objectives import task_loss
from mtlbench.optim import StepContext
from mtlbench.registry import get, names

from conftest import assert_close_fp, grad_scale, build_arch, check_contract

VARIANTS = [{}, {"upper": "ple"}, {"trm": False}, {"tim": False},
            {"upper": "ple", "task_experts": 2, "n_layers": 2, "n_heads": 4, "pre_ln": False}]


def _warm(model):
    """The pre-LN encoder starts as the identity (zero-initialised residual outputs), where no task conditioning
    shows yet; give those layers the non-zero weights training would, so the checks see a conditioned encoder."""
    if "encoder" in model.shared:
        enc = model.shared["encoder"]
        with torch.no_grad():
            for lin in [*enc.out, *(f[-1] for f in enc.ffn)]:
                lin.weight.normal_(0.0, 0.3)
    return model


def _batch(data, n=64):
    return {k: v[:n] for k, v in data.splits["train"].tensors.items()}


def _losses(model, data, batch, out):
    return [task_loss(t, o, batch["labels"][:, i], batch["masks"][:, i])
            for i, (t, o) in enumerate(zip(data.tasks, out.outputs))]


def test_registered():
    assert "dtrn" in names("arch")
    assert get("arch", "dtrn").description.startswith("DTRN")


@pytest.mark.parametrize("options", VARIANTS)
def test_forward_shapes(options, small_data):
    torch.manual_seed(0)
    model = build_arch("dtrn", small_data, **options)
    out = model(_batch(small_data))
    assert len(out.outputs) == 3
    for o in out.outputs:
        assert o.shape == (64, 1) and torch.isfinite(o).all()
    fields = out.features[0]
    assert fields.shape == (64, 9, 8)  # 8 categorical fields + the dense field
    if options.get("tim", True):
        assert out.features[2].shape == (64, 3, 3, 8)  # [B, tasks, behaviour types, d]
        assert model.describe()["behaviour_types"] == ["click_history", "cart_history", "purchase_history"]
    else:
        assert len(out.features) == 2


@pytest.mark.parametrize("options", [{}, {"upper": "ple"}])
@pytest.mark.parametrize("tasks", [("ctr", "cvr"), ("cvr",)])
def test_parameters_partitioned(options, tasks, small_data):
    data = small_data.select_tasks(tasks)
    model = build_arch("dtrn", data, **options)
    shared = {id(p) for p in model.shared_parameters()}
    per_task = [{id(p) for p in ps} for ps in model.task_parameters().values()]
    assert len(per_task) == len(tasks) and shared
    union = set(shared)
    for s in per_task:
        assert s and not (s & union), "a parameter is declared twice"
        union |= s
    assert union == {id(p) for p in model.parameters()}
    names_ = {n.split(".")[1] for n, _ in model.named_parameters() if n.startswith("shared.")}
    assert {"hypernetwork", "encoder", "task_embedding", "type_embedding", "experts", "input"} <= names_
    head_names = {n.split(".")[2] for n, _ in model.named_parameters() if n.startswith("heads.")}
    assert {"senet", "gate", "tower"} <= head_names
    counts = model.parameter_counts()
    assert counts["total"] == counts["shared"] + sum(counts["task"].values())


@pytest.mark.parametrize("options", VARIANTS)
def test_outputs_depend_on_shared_only_through_features(options, small_data):
    """Per-task gradients of the shared parameters via the features equal plain per-task autograd, and a task's
    loss never reaches another task's head."""
    torch.manual_seed(1)
    model = _warm(build_arch("dtrn", small_data, **options))
    batch = _batch(small_data, 48)
    check_contract(model, batch)
    out = model(batch)
    losses = _losses(model, small_data, batch, out)
    for i, loss in enumerate(losses):
        if options.get("tim", True):  # the shared task-embedding table: task i's loss reaches row i only
            g = torch.autograd.grad(loss, model.shared["task_embedding"].weight, retain_graph=True)[0]
            others = [j for j in range(3) if j != i]
            assert float(g[others].abs().max()) == 0.0 and float(g[i].abs().max()) > 0.0


def test_batched_jacobian_matches_per_task_autograd(small_data):
    """The optimizers' fast path (one batched VJP through the trunk) works through the conditional encoder."""
    torch.manual_seed(2)
    model = _warm(build_arch("dtrn", small_data, upper="ple"))
    model.train()
    batch = _batch(small_data, 48)
    out = model(batch)
    losses = _losses(model, small_data, batch, out)
    ctx = StepContext(model, batch, out, losses, lambda: None, torch.Generator(), 0, 1)
    jac = ctx.jacobian()
    for t, loss in enumerate(losses):
        g = torch.autograd.grad(loss, model.shared_parameters(), retain_graph=True, allow_unused=True)
        flat = torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1)
                          for p, x in zip(model.shared_parameters(), g)])
        assert_close_fp(jac[t], flat, scale=grad_scale([jac]))


def test_interests_are_task_specific_and_ignore_padding(small_data):
    torch.manual_seed(3)
    model = build_arch("dtrn", small_data).eval()
    batch = _batch(small_data, 64)
    with torch.no_grad():
        u = model(batch).features[2]  # [B, T, S, d]
        # at initialisation the pre-LN encoder is the identity: a target attention over the item embeddings
        assert torch.equal(u[:, 0], u[:, 1])
        _warm(model)
        u = model(batch).features[2]
        assert float((u[:, 0] - u[:, 1]).abs().max()) > 0, "each task extracts its own interests"
        # garbage beyond each history's length changes nothing
        noisy = dict(batch)
        for s in model.sequences:
            h = batch[s.name].clone()
            pad = torch.arange(h.shape[1]) >= batch[s.name + "_len"].unsqueeze(1)
            h[pad] = 7
            noisy[s.name] = h
        torch.testing.assert_close(model(noisy).features[2], u)
        # an empty history gives a zero interest and finite outputs
        empty = dict(batch)
        for s in model.sequences:
            empty[s.name] = torch.zeros_like(batch[s.name])
            empty[s.name + "_len"] = torch.zeros_like(batch[s.name + "_len"])
        out = model(empty)
        assert float(out.features[2].abs().max()) == 0.0
        assert all(torch.isfinite(o).all() for o in out.outputs)


def _tasks():
    return (TaskSpec("a", "binary", ("auc",)), TaskSpec("b", "binary", ("auc",)))


def test_error_on_dataset_without_sequences(small_data):
    schema = FeatureSchema(categorical=(CategoricalField("user_id", 10), CategoricalField("item_id", 20)),
                           dense=("x",))
    entry = get("arch", "dtrn")
    with pytest.raises(MtlbenchError, match="needs behaviour sequences") as info:
        entry.obj(schema, _tasks(), 8, entry.obj.Options())
    assert "\n" not in str(info.value) and "tim=false" in str(info.value)
    model = entry.obj(schema, _tasks(), 8, entry.obj.Options(tim=False))  # the explicit TRM-only ablation
    batch = {"categorical": torch.randint(0, 10, (16, 2)), "dense": torch.randn(16, 1)}
    assert model(batch).outputs[0].shape == (16, 1)


@pytest.mark.parametrize("schema,embed_dim,options,match", [
    (FeatureSchema(categorical=(CategoricalField("item_id", 20),), sequences=(SequenceField("s", "shop", 5),)),
     8, {}, "not a categorical field"),
    (FeatureSchema(categorical=(CategoricalField("item_id", 20),), sequences=(SequenceField("s", "item_id", 5),)),
     10, {"n_heads": 4}, "not divisible by n_heads"),
])
def test_bad_schema_or_width(schema, embed_dim, options, match):
    entry = get("arch", "dtrn")
    with pytest.raises(MtlbenchError, match=match) as info:
        entry.obj(schema, _tasks(), embed_dim, entry.obj.Options(**options))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("key,value,match", [("upper", "cgc", "mmoe, ple"), ("shared_experts", 0, "shared_experts"),
                                             ("n_heads", 0, "n_heads"), ("dropout", 1.0, "dropout")])
def test_bad_options(key, value, match):
    with pytest.raises(MtlbenchError, match=match) as info:
        get("arch", "dtrn").resolve_options({key: value})
    assert "\n" not in str(info.value)


SMALL = ["-D", "n_rows=3000", "-D", "n_users=200", "-D", "n_items=150", "--batch-size", "256", "--quiet"]


def test_cli_one_epoch_on_ecommerce(tmp_path, capsys):
    code = main(["run", "--arch", "dtrn", "--tasks", "ctr,cvr", "--epochs", "1", *SMALL, "-A", "upper=ple",
                 "--results-dir", str(tmp_path)])
    assert code == 0
    (path,) = tmp_path.glob("*.json")
    rec = json.loads(path.read_text())
    assert rec["status"] == "ok" and rec["spec"]["arch_options"]["upper"] == "ple"
    assert rec["arch_info"]["behaviour_types"] == ["click_history", "cart_history", "purchase_history"]
    assert rec["dataset"]["schema"]["sequences"]["click_history"] == {"of_field": "item_id", "max_len": 20}
    for t in ("ctr", "cvr"):
        assert 0.0 <= rec["metrics"]["test"][t]["auc"] <= 1.0


def test_cli_dataset_without_sequences_is_one_line(tmp_path, capsys):
    code = main(["run", "--arch", "dtrn", "--epochs", "1", *SMALL, "-D", "sequences=false",
                 "--results-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "needs sequences" in err and len(err.splitlines()) == 1
    assert not list(tmp_path.glob("*.json"))


def test_same_seed_same_model_and_outputs(small_data):
    batch = _batch(small_data, 32)
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        model = build_arch("dtrn", small_data, upper="ple").eval()
        with torch.no_grad():
            outs.append(torch.cat(model(batch).outputs, dim=1))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("args,ok", [
    (["--dataset", "census"], False),
    (["-D", "sequences=false"], False),
    (["-D", "sequences=false", "-A", "tim=false"], True),  # TRM-only needs no sequences
    ([], True),
])
def test_missing_sequences_caught_before_any_data_loads(args, ok, tmp_path, capsys):
    """The spec check compares the arch's required features with what the dataset declares it provides."""
    from mtlbench.cli import main

    rc = main(["run", "--arch", "dtrn", *args, "--dry-run", "--results-dir", str(tmp_path)])
    err = capsys.readouterr().err
    if ok:
        assert rc == 0 and not err
    else:
        assert rc == 2 and "arch 'dtrn' needs sequences" in err and "datasets that do: ecommerce" in err
        assert len(err.strip().splitlines()) == 1
