"""The leaderboard: a pure function of the stored run records. It never trains.

Runs are grouped into tables by *protocol* (dataset, its version and options, task set, and every training
setting that changes results: epochs, batch size, lr, weight decay, patience, embedding width, selection rule).
Within a table a *method* is an architecture with its options crossed with an MTL optimizer with its options.
For every method, task and metric the table reports the mean and standard deviation over seeds of the test-split
metric (the model having been selected on validation), and n. Δm% follows Maninis et al. (CVPR 2019): the mean
over tasks of the signed relative change of each task's primary metric against the single-task baseline (the
``single`` arch's runs under the same protocol), positive = better. A missing baseline is said, never faked.
Tables with dense (per-pixel) tasks follow the vision convention instead (Maninis et al. 2019; Vandenhende et al.,
TPAMI 2021; as MTAN-line papers and LibMTL report NYUv2): the mean over *every* metric of every task, each signed
by its direction; the table's Δm% note says which convention it uses.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mtlbench import settings
from mtlbench.results.store import read_record
from mtlbench.vision.kinds import DENSE_DIRECTIONS, DENSE_METRIC_NAMES

# what a table's runs must share: declared with the run settings (mtlbench/settings.py, torch-free)
PROTOCOL_KEYS = settings.protocol_keys()
BASELINE_ARCH = "single"
ARROW = {"max": "↑", "min": "↓"}


@dataclass
class Store:
    """The usable records of a results directory, and what was skipped and why."""

    records: list[dict[str, Any]]
    skipped: list[str] = field(default_factory=list)   # malformed or truncated files
    failed: list[dict[str, Any]] = field(default_factory=list)


def load_store(results_dir: str | Path) -> Store:
    """Read every ``*.json`` record; malformed ones are skipped with a warning naming the file."""
    store = Store(records=[])
    for path in sorted(Path(results_dir).glob("*.json")):
        rec = read_record(path)
        if rec is None or "spec" not in rec or "status" not in rec:
            store.skipped.append(path.name)
            warnings.warn(f"skipping {path}: not a complete run record (malformed or truncated)", stacklevel=2)
            continue
        if rec["status"] == "ok" and "metrics" in rec:
            store.records.append(rec)
        else:
            store.failed.append(rec)
    return store


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def protocol_of(spec: dict[str, Any]) -> dict[str, Any]:
    """A run's protocol; a setting added after spec version 1 (``threads``) appears only where it differs from
    the value every version-1 run had, so one table never mixes thread counts and old tables keep their text."""
    return settings.protocol_of(spec)


def _option_label(options: dict[str, Any], varying: set[str]) -> str:
    shown = [f"{k}={_fmt_opt(options.get(k))}" for k in sorted(varying)]
    return f"({', '.join(shown)})" if shown else ""


def _fmt_opt(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ",".join(_fmt_opt(x) for x in v) + "]"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def _varying(options: list[dict[str, Any]]) -> set[str]:
    keys = set().union(*[o.keys() for o in options]) if options else set()
    return {k for k in keys if len({_canon(o.get(k)) for o in options}) > 1}


def _second_half(spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A method's second half: its MTL optimizer, or for a merge record (``spec["merger"]``) ``merge:NAME``."""
    if spec.get("merger"):
        return f"merge:{spec['merger']}", spec.get("merger_options", {})
    return spec["optimizer"], spec["optimizer_options"]


def _merge_tag(spec: dict[str, Any]) -> str:
    """A merger's declared data access and task-id need, shown with its name: ``[labelled_val, task id]``."""
    if not spec.get("merger"):
        return ""
    return f" [{spec.get('data_access')}" + (", task id" if spec.get("needs_task_id") else "") + "]"


def long_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """The canonical long format: one row per run x split x task x metric, at full precision."""
    rows = []
    by_arch: dict[str, list[dict]] = {}
    by_opt: dict[str, list[dict]] = {}
    for rec in records:
        by_arch.setdefault(rec["spec"]["arch"], []).append(rec["spec"]["arch_options"])
        name, options = _second_half(rec["spec"])
        by_opt.setdefault(name, []).append(options)
    vary_arch = {a: _varying(o) for a, o in by_arch.items()}
    vary_opt = {a: _varying(o) for a, o in by_opt.items()}
    for rec in records:
        spec = rec["spec"]
        protocol = protocol_of(spec)
        tasks = {t["name"]: t for t in rec.get("dataset", {}).get("tasks", [])}
        arch = spec["arch"] + _option_label(spec["arch_options"], vary_arch[spec["arch"]])
        name, options = _second_half(spec)
        opt = name + _option_label(options, vary_opt[name]) + _merge_tag(spec)
        for split, per_task in rec["metrics"].items():
            for task, metrics in per_task.items():
                primary = tasks.get(task, {}).get("metrics", [None])[0]
                for metric, value in metrics.items():
                    rows.append({
                        "run_id": rec["run_id"], "dataset": spec["dataset"],
                        "dataset_version": spec["dataset_version"], "tasks": ",".join(spec["tasks"]),
                        "protocol": _canon(protocol), "arch": arch, "optimizer": opt,
                        "method": f"{arch} × {opt}", "seed": spec["seed"], "split": split, "task": task,
                        "metric": metric, "primary": metric == primary,
                        "direction": _direction(metric), "value": np.nan if value is None else float(value),
                        "selected_epoch": rec.get("selected_epoch"), "epochs_run": rec.get("epochs_run"),
                    })
    cols = ["run_id", "dataset", "dataset_version", "tasks", "protocol", "arch", "optimizer", "method", "seed",
            "split", "task", "metric", "primary", "direction", "value", "selected_epoch", "epochs_run"]
    frame = pd.DataFrame(rows, columns=cols)
    return frame.sort_values(["protocol", "method", "seed", "split", "task", "metric"], kind="stable",
                             ignore_index=True)


#: The directions of the metrics built in when records did not store them (schema 1); later records carry their own.
BUILTIN_DIRECTIONS = {"auc": "max", "logloss": "min", "accuracy": "max", "rmse": "min", "mae": "min",
                      **DENSE_DIRECTIONS}


def _direction(metric: str) -> str:
    if metric in BUILTIN_DIRECTIONS:
        return BUILTIN_DIRECTIONS[metric]
    try:
        from mtlbench.metrics import metric as get_metric

        return get_metric(metric).direction
    except Exception:  # a plugin metric whose plugin is not loaded: assume higher is better, visibly
        return "max"


@dataclass
class Table:
    """One leaderboard table: a protocol, its methods' aggregated metrics, Δm%, ranks and significance."""

    protocol: dict[str, Any]
    columns: list[tuple[str, str]]                 # (task, metric), primary metrics first per task
    directions: dict[str, str]                     # metric -> max / min
    methods: list[str]                             # sorted by Δm% (or mean rank when Δm% is missing)
    stats: dict[str, dict[tuple[str, str], dict[str, float]]]   # method -> column -> mean/std/n
    delta_m: dict[str, float | None]
    delta_m_note: str
    mean_rank: dict[str, float]
    seeds: dict[str, list[int]]
    significance: dict[str, dict[str, Any]]        # method -> task -> test results vs the best method
    notes: list[str] = field(default_factory=list)
    baseline: str | None = None                    # the chosen baseline method (default: the Δm% reference)
    significance_baseline: dict[str, dict[str, Any]] = field(default_factory=dict)  # ... vs that baseline

    @property
    def title(self) -> str:
        p = self.protocol
        return f"{p['dataset']} (v{p['dataset_version']}) — tasks {', '.join(p['tasks'])}"


def build_tables(frame: pd.DataFrame, flat_delta_m: bool = False, baseline: str | None = None) -> list[Table]:
    """One table per protocol. ``baseline`` (``ARCH`` or ``ARCH:OPTIMIZER``, as `mtlbench compare` takes them)
    is the method every other is also tested against; default: the Δm% reference (``single``)."""
    test = frame[frame["split"] == "test"]
    tables = []
    for protocol_json, part in test.groupby("protocol", sort=True):
        tables.append(_table(json.loads(protocol_json), part, flat_delta_m, baseline))
    return tables


def resolve_method(spec: str, methods: list[str]) -> str | None:
    """The method label meant by ``ARCH`` or ``ARCH:OPTIMIZER`` (an arch alone prefers its ``ew`` runs)."""
    arch, _, opt = spec.partition(":")
    found = [m for m in methods if m.split(" × ")[0] == arch and (not opt or m.split(" × ")[1] == opt)]
    return sorted(found, key=lambda m: (not m.endswith("× ew"), m))[0] if found else None


def _table(protocol: dict[str, Any], part: pd.DataFrame, flat: bool, baseline: str | None = None) -> Table:
    from mtlbench.results import stats

    tasks = list(protocol["tasks"])
    metrics_by_task: dict[str, list[str]] = {}
    for (task, metric, primary), _ in part.groupby(["task", "metric", "primary"], sort=False):
        lst = metrics_by_task.setdefault(task, [])
        if primary:
            lst.insert(0, metric)
        elif metric not in lst:
            lst.append(metric)
    columns = [(t, m) for t in tasks for m in metrics_by_task.get(t, [])]
    directions = dict(zip(part["metric"], part["direction"]))
    agg = part.groupby(["method", "task", "metric"])["value"].agg(["mean", "std", "count"])
    methods = sorted(part["method"].unique())
    table_stats: dict[str, dict] = {m: {} for m in methods}
    for (method, task, metric), row in agg.iterrows():
        table_stats[method][(task, metric)] = {"mean": float(row["mean"]),
                                               "std": float(row["std"]) if row["count"] > 1 else float("nan"),
                                               "n": int(row["count"])}
    seeds = {m: sorted(part.loc[part["method"] == m, "seed"].unique().tolist()) for m in methods}
    notes = []
    # Δm% against the single-task baseline
    base_methods = [m for m in methods if m.split(" × ")[0].split("(")[0] == BASELINE_ARCH]
    base = sorted(base_methods, key=lambda m: (not m.endswith("× ew"), m))[0] if base_methods else None
    delta: dict[str, float | None] = {}
    dense = any(c[1] in DENSE_METRIC_NAMES for c in columns)  # per-pixel tasks: every metric counts (vision papers)
    flat = flat or dense
    cols_for_delta = columns if flat else [(t, metrics_by_task[t][0]) for t in tasks if metrics_by_task.get(t)]
    if base is None:
        note = "Δm% n/a: no single-task (`single`) runs under this protocol"
        delta = {m: None for m in methods}
    else:
        what = ("all metrics of every task (the dense-prediction convention, Maninis et al. 2019 / Vandenhende et "
                "al. 2021)" if dense else "all task metrics" if flat else "tasks of the primary metric")
        note = (f"Δm% (Maninis et al. 2019): mean over {what}"
                f" of the signed relative change vs `{base}`, in %, positive = better")
        for m in methods:
            ms = [table_stats[m].get(c, {}).get("mean", float("nan")) for c in cols_for_delta]
            bs = [table_stats[base].get(c, {}).get("mean", float("nan")) for c in cols_for_delta]
            lower = [directions[c[1]] == "min" for c in cols_for_delta]
            res = stats.delta_m(ms, bs, lower)
            delta[m] = None if res.value is None or not math.isfinite(res.value) else res.value
            if res.note:
                notes.append(f"{m}: {res.note}")
    # mean rank over every (task, metric) column; 1 = best
    ranks = pd.DataFrame({c: [table_stats[m].get(c, {}).get("mean", np.nan) for m in methods] for c in columns},
                         index=methods)
    for c in columns:
        ranks[c] = ranks[c].rank(ascending=directions[c[1]] == "min", method="average", na_option="bottom")
    mean_rank = ranks.mean(axis=1).to_dict() if columns else {m: float("nan") for m in methods}
    order = sorted(methods, key=lambda m: (-(delta[m] if delta.get(m) is not None else -math.inf),
                                           mean_rank.get(m, math.inf), m))
    signif = _significance(part, order, tasks, metrics_by_task, directions)
    chosen = base if baseline is None else resolve_method(baseline, methods)
    if baseline is not None and chosen is None:
        notes.append(f"baseline '{baseline}' has no runs under this protocol: no tests against it")
    signif_base = _significance(part, [chosen] + [m for m in order if m != chosen], tasks, metrics_by_task,
                                directions) if chosen else {}
    return Table(protocol, columns, directions, order, table_stats, delta, note,
                 {m: float(v) for m, v in mean_rank.items()}, seeds, signif, notes, chosen, signif_base)


def _significance(part: pd.DataFrame, order: list[str], tasks: list[str], metrics_by_task: dict[str, list[str]],
                  directions: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Each method vs ``order[0]`` (the table's best, or a chosen baseline), per task on the primary metric: paired
    t-test and Wilcoxon over the shared seeds, Holm-corrected across these comparisons."""
    from mtlbench.results import stats

    if len(order) < 2:
        return {}
    best = order[0]
    out: dict[str, dict[str, Any]] = {}
    raw_t, raw_w, keys = [], [], []
    prim = part[part["metric"] == part["task"].map(lambda t: (metrics_by_task.get(t) or [None])[0])]
    values = {k: dict(zip(g["seed"], g["value"])) for k, g in prim.groupby(["method", "task"], sort=False)}
    for m in order[1:]:
        out[m] = {}
        for t in tasks:
            if not metrics_by_task.get(t):
                continue
            metric = metrics_by_task[t][0]
            a, b = values.get((m, t), {}), values.get((best, t), {})
            common = sorted(set(a) & set(b))
            sign = 1.0 if directions[metric] == "max" else -1.0
            x = sign * np.array([a[k] for k in common], dtype=float)
            y = sign * np.array([b[k] for k in common], dtype=float)
            tt = stats.paired_t(x, y)
            wx = stats.wilcoxon(x, y)
            out[m][t] = {"metric": metric, "n": len(common), "mean_diff": tt.mean_diff, "ci": [tt.ci_low, tt.ci_high],
                         "t_p": tt.pvalue, "wilcoxon_p": wx.pvalue, "note": "; ".join(n for n in (tt.note, wx.note) if n)}
            raw_t.append(tt.pvalue)
            raw_w.append(wx.pvalue)
            keys.append((m, t))
    adj_t, adj_w = stats.holm(raw_t).adjusted, stats.holm(raw_w).adjusted
    for (m, t), pt, pw in zip(keys, adj_t, adj_w):
        out[m][t]["t_p_holm"] = float(pt)
        out[m][t]["wilcoxon_p_holm"] = float(pw)
    return out

def table_records(table: Table, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stored records behind ``table`` (same protocol)."""
    proto = json.dumps(table.protocol, sort_keys=True, separators=(",", ":"))
    return [r for r in records if json.dumps({k: r["spec"].get(k) for k in table.protocol}, sort_keys=True,
                                             separators=(",", ":")) == proto]
