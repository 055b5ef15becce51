"""TaskExpert: the ablation switches change the structure they name, the memory is read as an expert, expert usage
lands in the record and the leaderboard's figure, and its bad inputs are one line each. (The shared/task partition,
per-task gradients through the declared features and FLOPs are checked by the parametrized image-arch contract
tests in test_vision_archs.py, every MTL optimizer by test_vision_optimizers.py.)"""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from mtlbench import registry
from mtlbench.errors import MtlbenchError
from mtlbench.registry import build_options
from mtlbench.spec import build_spec
from mtlbench.train import run_to_record

TINY = {"resolution": 16, "train": 8, "val": 4, "test": 4}
SMALL_VIT = {"patch": 4, "depth": 4, "vit_dim": 8, "vit_heads": 2, "n_experts": 3}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import os

    os.environ.setdefault("MTLBENCH_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    e = registry.get("dataset", "scenes")
    return e.obj(build_options(e.options_class, e.resolve_options(TINY))).load(0)


def build(data, **options):
    e = registry.get("arch", "taskexpert", modality="image")
    return e.obj(data.schema, data.tasks, 8, build_options(e.options_class, e.resolve_options(options)))


def batch_of(data, n=4):
    return {k: v[:n] for k, v in data.splits["train"].tensors.items()}


@pytest.mark.parametrize("options,blocks,gate_widths,memory", [
    ({}, (2, 4), (3, 4), True),                                  # every other block; memory read from module 2 on
    ({"memory": False}, (2, 4), (3, 3), False),                  # MMoE on tokens at the same blocks
    ({"last_only": True}, (4,), (3,), True),
    ({"layers": [1, 3, 4]}, (1, 3, 4), (3, 4, 4), True),
    ({"n_experts": 1, "layers": [4, 2]}, (2, 4), (1, 2), True),
])
def test_switches_build_what_they_name(data, options, blocks, gate_widths, memory):
    model = build(data, **{**SMALL_VIT, **options})
    assert model.blocks == blocks
    k = options.get("n_experts", SMALL_VIT["n_experts"])
    for t in model.task_names:
        assert tuple(g.out_features for g in model.heads[t]["gates"]) == gate_widths
        assert ("write" in model.heads[t]) == memory
    out = model(batch_of(data))
    assert len(out.features) == 2 * len(blocks)
    for x, e in zip(out.features[::2], out.features[1::2]):
        assert x.shape == (4, 16, 8) and e.shape == (k, 4, 16, 8)


def test_memory_is_read_as_an_expert(data):
    """Force task 0's last gate onto the memory: its output no longer depends on the last module's experts (and
    does on the first's); with the memory off it does depend on the last module's experts."""
    torch.manual_seed(0)
    for memory in (True, False):
        model = build(data, **SMALL_VIT, memory=memory).eval()
        t = model.task_names[0]
        if memory:
            with torch.no_grad():
                g = model.heads[t]["gates"][-1]
                g.weight.zero_()
                g.bias.fill_(-1e4)
                g.bias[-1] = 1e4
        b = batch_of(data)
        with torch.no_grad():
            feats = model.encode(b)
            base = model.decode(feats, b)[0]
            last = list(feats)
            last[-1] = last[-1] + 1.0
            moved_last = model.decode(tuple(last), b)[0]
            first = list(feats)
            first[1] = first[1] + 1.0
            moved_first = model.decode(tuple(first), b)[0]
        assert torch.equal(base, moved_last) == memory
        assert not torch.allclose(base, moved_first)


def test_expert_usage(data):
    model = build(data, **SMALL_VIT)
    usage = model.record_extras(data.splits["test"], "cpu")["expert_usage"]
    assert usage["split"] == "test" and set(usage["tasks"]) == set(model.task_names)
    for t, rows in usage["tasks"].items():
        assert [r["block"] for r in rows] == [2, 4]
        assert rows[0]["memory"] is None and rows[1]["memory"] is not None
        for r in rows:
            total = sum(r["experts"]) + (r["memory"] or 0.0)
            assert len(r["experts"]) == 3 and math.isclose(total, 1.0, rel_tol=1e-9, abs_tol=1e-6)
            assert 0.0 <= r["entropy"] <= r["max_entropy"] + 1e-9
    assert model._usage is None  # training-time forwards pay nothing


def test_expert_usage_in_the_record_and_the_figure(tmp_path):
    from mtlbench.results.report import write_leaderboard
    from mtlbench.results.store import store_run

    specs = [build_spec(dataset="scenes", dataset_options=TINY, tasks=["seg", "depth"], arch="taskexpert",
                        arch_options=SMALL_VIT, optimizer="ew", device="cpu", seed=s, epochs=1, batch_size=4)
             for s in (0,)]
    (tmp_path / "runs").mkdir()
    for spec in specs:
        rec = run_to_record(spec)
        assert rec["status"] == "ok", rec.get("error")
        u = rec["arch_info"]["expert_usage"]["tasks"]
        assert set(u) == {"seg", "depth"} and rec["arch_info"]["tapped_blocks"] == [2, 4]
        store_run(tmp_path / "runs", rec)
    write_leaderboard(tmp_path / "runs", tmp_path / "out", formats=("md",))
    figs = sorted(p.name for p in (tmp_path / "out" / "figures").glob("*-experts.png"))
    assert len(figs) == 1


@pytest.mark.parametrize("kw,match", [
    (dict(dataset="ecommerce", tasks=None), r"^arch 'taskexpert' works on image data only, not on tabular data"),
    (dict(arch_options={"encoder": "segnet"}), r"^arch 'taskexpert': encoder must be 'vit' .*got 'segnet'$"),
    (dict(arch_options={"encoder": "resnet"}), r"encoder must be 'vit' .*got 'resnet'$"),
    (dict(arch_options={"layers": [2, 5]}), r"^arch 'taskexpert': layers \[2, 5\]: block\(s\) \[5\] outside the "
                                            r"ViT's depth; valid blocks are 1\.\.4$"),
    (dict(arch_options={"layers": [0]}), r"block\(s\) \[0\] outside the ViT's depth; valid blocks are 1\.\.4$"),
    (dict(arch_options={"n_experts": 0}), r"^arch 'taskexpert': n_experts must be at least 1, got 0$"),
    (dict(arch_options={"memory_write": "gru"}), r"memory_write must be one of replace, add, got 'gru'$"),
])
def test_bad_input_one_line(kw, match):
    args = dict(dataset="scenes", tasks=None, arch="taskexpert", optimizer="ew", device="cpu")
    args.update(kw)
    with pytest.raises(MtlbenchError, match=match) as info:
        build_spec(**args)
    assert "\n" not in str(info.value)


def test_cli_bad_input_is_one_line():
    r = subprocess.run([sys.executable, "-m", "mtlbench.cli", "run", "--dataset", "scenes", "--arch", "taskexpert",
                        "--arch-option", "n_experts=0", "--dry-run"], capture_output=True, text=True)
    err = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(err) == 1 and "n_experts must be at least 1, got 0" in err[0], r.stderr


def test_image_runs_do_not_relabel_tabular_ones():
    """An arch name with a tabular and an image variant: option labels compare runs of the same variant only."""
    from mtlbench.results.leaderboard import long_frame
    from mtlbench.testing import fake_record

    auc = {"ctr": 0.7, "cvr": 0.6}
    recs = [fake_record("x", "shared_bottom", "ew", 0, auc, arch_options={"bottom_units": [8]}),
            fake_record("y", "shared_bottom", "ew", 0, auc, arch_options={"encoder": "vit", "depth": 4}),
            fake_record("y", "shared_bottom", "ew", 0, auc, arch_options={"encoder": "vit", "depth": 2})]
    frame = long_frame(recs)
    assert dict(zip(frame["run_id"], frame["arch"])) == {recs[0]["run_id"]: "shared_bottom",
                                                         recs[1]["run_id"]: "shared_bottom(depth=4)",
                                                         recs[2]["run_id"]: "shared_bottom(depth=2)"}
