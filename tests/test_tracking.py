"""Optional tracking: metrics mirrored to TensorBoard and MLflow; the JSON record stays the source of truth."""
from __future__ import annotations

import json

import pytest

from mtlbench.cli import main

SMALL = ["--tasks", "ctr,cvr", "-D", "n_rows=3000", "-D", "n_users=200", "-D", "n_items=100", "--epochs", "2",
         "--batch-size", "512", "--quiet"]


def test_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = tmp_path / "runs"
    assert main(["run", *SMALL, "--log", "tensorboard", "--results-dir", str(results)]) == 0
    (rec_path,) = results.glob("*.json")
    rec = json.loads(rec_path.read_text())
    acc = EventAccumulator(str(results / "tensorboard" / rec["run_id"]))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "val/ctr/auc" in tags and "train_loss/cvr" in tags and "final/test/ctr/auc" in tags
    vals = [e.value for e in acc.Scalars("val/ctr/auc")]
    assert vals == pytest.approx([c["val"]["ctr"]["auc"] for c in rec["curves"]], rel=1e-6)


def test_mlflow(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    results = tmp_path / "runs"
    assert main(["run", *SMALL, "--log", "mlflow", "--results-dir", str(results)]) == 0
    rec = json.loads(next(results.glob("*.json")).read_text())
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1 and runs[0].info.run_name == rec["run_id"] and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["final.test.ctr.auc"] == pytest.approx(rec["metrics"]["test"]["ctr"]["auc"])
    assert runs[0].data.params["arch"] == "shared_bottom"


def test_unknown_tracker(tmp_path, capsys):
    assert main(["run", *SMALL, "--log", "wandb", "--results-dir", str(tmp_path)]) == 2
    assert "unknown tracker 'wandb'" in capsys.readouterr().err


def test_mlflow_misconfigured_is_one_line(tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")
    assert main(["run", *SMALL, "--log", "mlflow", "--results-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--log mlflow failed to start a run" in err and len(err.splitlines()) == 1
