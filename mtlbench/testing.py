"""Synthetic run records, for testing and benchmarking the leaderboard without training anything."""
from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path
from typing import Any

from mtlbench.results.store import RECORD_SCHEMA, write_record

TASKS = ({"name": "ctr", "kind": "binary", "metrics": ["auc", "logloss"]},
         {"name": "cvr", "kind": "binary", "metrics": ["auc", "logloss"]})


def fake_record(dataset: str, arch: str, optimizer: str, seed: int, auc: dict[str, float],
                tasks: tuple[dict[str, Any], ...] = TASKS, epochs: int = 3, noise: float = 0.0,
                rng: random.Random | None = None, arch_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A complete, valid 'ok' record whose test AUC of each task is ``auc[task]`` (+ optional noise)."""
    rng = rng or random.Random(seed)
    names = [t["name"] for t in tasks]
    spec = {"dataset": dataset, "dataset_version": "1", "tasks": names, "arch": arch, "optimizer": optimizer,
            "seed": seed, "epochs": epochs, "batch_size": 1024, "lr": 0.001, "weight_decay": 1e-6, "patience": 3,
            "embed_dim": 16, "device": "cpu", "selection": "mean_primary", "dataset_options": {},
            "arch_options": arch_options or {}, "optimizer_options": {}, "plugin_sources": {}, "spec_version": 1}
    run_id = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]

    def split(shift: float) -> dict[str, dict[str, float]]:
        out = {}
        for t in names:
            a = auc[t] + shift + (rng.gauss(0.0, noise) if noise else 0.0)
            out[t] = {"auc": a, "logloss": -math.log(a)}
        return out

    curves = [{"epoch": e, "train_loss": {t: 1.0 / e for t in names}, "val": split(-0.01 * (epochs - e)),
               "selection_score": 0.0, "seconds": 1.0} for e in range(1, epochs + 1)]
    test = split(0.0)
    return {"schema": RECORD_SCHEMA, "run_id": run_id, "spec": spec, "status": "ok", "created": "2026-01-01",
            "dataset": {"name": dataset, "version": "1", "tasks": list(tasks)},
            "metrics": {"train": split(0.05), "val": curves[-1]["val"], "test": test}, "selected_epoch": epochs,
            "epochs_run": epochs, "curves": curves, "parameters": {"total": 10, "shared": 5, "task": {}},
            "wall_seconds": 1.0, "train_samples_per_s": 1000.0, "environment": {"device": "cpu"}}


def write_fake_store(directory: str | Path, records: list[dict[str, Any]]) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for rec in records:
        write_record(d / f"{rec['run_id']}.json", rec)
    return d
