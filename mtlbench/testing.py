"""Synthetic run records, for testing and benchmarking the leaderboard without training anything."""
from __future__ import annotations

import math
import random
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mtlbench.results.record import SCHEMA1_DIRECTIONS, RunRecord, make_record
from mtlbench.results.store import write_record

TASKS = ({"name": "ctr", "kind": "binary", "metrics": ["auc", "logloss"]},
         {"name": "cvr", "kind": "binary", "metrics": ["auc", "logloss"]})


def fake_record(dataset: str, arch: str, optimizer: str, seed: int, auc: dict[str, float],
                tasks: tuple[dict[str, Any], ...] = TASKS, epochs: int = 3, noise: float = 0.0,
                rng: random.Random | None = None, arch_options: dict[str, Any] | None = None,
                optimizer_options: dict[str, Any] | None = None, seconds_per_epoch: float = 1.0,
                created: datetime | None = None, spec_changes: dict[str, Any] | None = None,
                option_defaults: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """A complete, valid 'ok' record (as stored: a JSON-ready dict) whose test AUC of each task is ``auc[task]``
    (+ optional noise), made by the same constructor as the trainer's records, its run id hashed by ``RunSpec``."""
    from mtlbench.spec import RunSpec

    rng = rng or random.Random(seed)
    names = [t["name"] for t in tasks]
    spec = RunSpec.from_dict({
        "dataset": dataset, "dataset_version": "1", "tasks": names, "arch": arch, "optimizer": optimizer,
        "seed": seed, "epochs": epochs, "batch_size": 1024, "lr": 0.001, "weight_decay": 1e-6, "patience": 3,
        "embed_dim": 16, "device": "cpu", "selection": "mean_primary", "dataset_options": {},
        "arch_options": dict(arch_options or {}), "optimizer_options": dict(optimizer_options or {}),
        "plugin_sources": {}, "spec_version": 1, **(spec_changes or {})})

    def split(shift: float) -> dict[str, dict[str, float]]:
        out = {}
        for t in names:
            a = auc[t] + shift + (rng.gauss(0.0, noise) if noise else 0.0)
            out[t] = {"auc": a, "logloss": -math.log(a)}
        return out

    curves = [{"epoch": e, "train_loss": {t: 1.0 / e for t in names}, "val": split(-0.01 * (epochs - e)),
               "selection_score": 0.0, "seconds": seconds_per_epoch} for e in range(1, epochs + 1)]
    test = split(0.0)
    named = {"auc", "logloss"} | {m for t in tasks for m in t["metrics"]}  # the tasks' own, for callers that set them
    return make_record(spec.to_dict(), spec.run_id, "ok",
                       created=created or datetime(2026, 1, 1, tzinfo=timezone.utc),
                       directions={m: SCHEMA1_DIRECTIONS[m] for m in sorted(named) if m in SCHEMA1_DIRECTIONS},
                       dataset={"name": dataset, "version": "1", "tasks": list(tasks)},
                       metrics={"train": split(0.05), "val": curves[-1]["val"], "test": test}, selected_epoch=epochs,
                       epochs_run=epochs, curves=curves, parameters={"total": 10, "shared": 5, "task": {}},
                       wall_seconds=seconds_per_epoch * epochs + 0.5, train_seconds=seconds_per_epoch * epochs,
                       train_samples_per_s=1000.0, environment={"device": "cpu"},
                       option_defaults=option_defaults or {}).to_dict()


def write_fake_store(directory: str | Path, records: list[RunRecord | dict[str, Any]]) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for rec in records:
        run_id = rec.run_id if isinstance(rec, RunRecord) else rec["run_id"]
        write_record(d / f"{run_id}.json", rec)
    return d
