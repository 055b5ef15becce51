"""The single-task baseline is T separate runs: each task selected and stopped on its own validation metric."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtlbench.cli import main
from mtlbench.metrics import metric
from mtlbench.registry import get

TASKS = ("ctr", "cvr", "ctcvr")


def _run(tmp_path, *extra):
    assert main(["run", "--arch", "single", "--optimizer", "ew", "--tasks", ",".join(TASKS), "-D", "n_rows=3000",
                 "-D", "n_users=200", "-D", "n_items=150", "--epochs", "6", "--patience", "2", "--batch-size",
                 "256", "--lr", "0.01", "--quiet", "--results-dir", str(tmp_path), *extra]) == 0
    (path,) = Path(tmp_path).rglob("*.json")
    return json.loads(path.read_text())


def _primary(task):
    entry = get("dataset", "ecommerce")
    spec = next(t for t in entry.obj(entry.obj.Options(n_rows=3000, n_users=200, n_items=150)).load(0).tasks
                if t.name == task)
    name = spec.primary_metric
    return name, (1 if metric(name).direction == "max" else -1)


def _best_epoch(curves, task, upto=None):
    name, sign = _primary(task)
    scores = [sign * c["val"][task][name] for c in curves[:upto]]
    return scores.index(max(scores)) + 1  # the first epoch reaching the best score


@pytest.fixture(scope="module")
def per_task(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("per_task"))


def test_each_task_is_tested_at_its_own_best_validation_epoch(per_task):
    rec = per_task
    assert rec["spec"]["arch_options"]["selection"] == "per_task"
    curves = rec["curves"]
    for task in TASKS:
        best = _best_epoch(curves, task)
        assert rec["selected_epochs"][task] == best
        # the selected weights are that epoch's: the final validation metrics are the curve's at that epoch
        assert rec["metrics"]["val"][task] == pytest.approx(curves[best - 1]["val"][task], rel=1e-9, abs=0)
    assert rec["selected_epoch"] == max(rec["selected_epochs"].values())
    # the case is informative: one joint epoch could not have served every task
    assert len({_best_epoch(curves, t) for t in TASKS}) > 1


def test_training_stops_only_when_every_task_has_run_out_of_patience(per_task):
    curves, patience = per_task["curves"], 2
    n = per_task["epochs_run"]
    if n < 6:  # stopped early: every task had its best at least `patience` epochs before the end
        assert all(n - _best_epoch(curves, t) >= patience for t in TASKS)
    for m in range(patience + 1, n):  # and at no earlier epoch had every task run out of patience
        assert any(m - _best_epoch(curves, t, m) < patience for t in TASKS)


def test_joint_selection_is_a_named_option_with_its_own_run_id(per_task, tmp_path):
    rec = _run(tmp_path, "-A", "selection=joint")
    assert rec["run_id"] != per_task["run_id"]
    assert "selected_epochs" not in rec
    scores = [c["selection_score"] for c in rec["curves"]]
    assert rec["selected_epoch"] == scores.index(max(scores)) + 1
    for task in TASKS:
        assert rec["metrics"]["val"][task] == pytest.approx(rec["curves"][rec["selected_epoch"] - 1]["val"][task],
                                                            rel=1e-9, abs=0)


def test_bad_selection_is_one_line():
    from mtlbench.errors import MtlbenchError

    with pytest.raises(MtlbenchError, match="selection") as exc:
        get("arch", "single").resolve_options({"selection": "best"})
    assert "\n" not in str(exc.value)
