"""The leaderboard: a pure function of the stored run records. It never trains.

Runs are grouped into tables by *protocol* (dataset, its version and options, task set, and every training
setting that changes results: epochs, batch size, lr, weight decay, patience, embedding width, selection rule).
Within a table a *method* is an architecture with its options crossed with an MTL optimizer with its options
(``mtlbench.results.methods``). One seed of one method counts once in a cell: if the store holds several runs of
the same protocol, method and seed (e.g. made by two versions of a plugin), the newest is kept and the table says
so. For every method, task and metric the table reports the mean and standard deviation over seeds of the
test-split metric (the model having been selected on validation), and n. Δm% follows Maninis et al. (CVPR 2019):
the mean over tasks of the signed relative change of each task's primary metric against the single-task baseline
(the ``single`` arch's runs under the same protocol), positive = better. A missing baseline is said, never faked.
A metric is ranked only with the direction its records store; without one it is shown but never ranked.
Tables with dense (per-pixel) tasks follow the vision convention instead (Maninis et al. 2019; Vandenhende et al.,
TPAMI 2021; as MTAN-line papers and LibMTL report NYUv2): the mean over *every* metric of every task, each signed
by its direction; the table's Δm% note says which convention it uses.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mtlbench import settings
from mtlbench.errors import MtlbenchError
from mtlbench.results import methods as mid
from mtlbench.results.options import DEFAULTS, StatOptions
from mtlbench.results.record import NewerSchema, RecordError, RunRecord
from mtlbench.results.store import load_record
from mtlbench.vision.kinds import DENSE_METRIC_NAMES

# what a table's runs must share: declared with the run settings (mtlbench/settings.py, torch-free)
PROTOCOL_KEYS = settings.protocol_keys()
BASELINE_ARCH = "single"
#: The reference of the relative training cost column: the first of these with runs in the table.
COST_REFERENCES = (("single", "ew"), ("shared_bottom", "ew"))
#: A merging table's single-task reference: the per-task fine-tuned experts (T single-task runs), for Δm% and cost.
EXPERTS = "merge:experts"
ARROW = {"max": "↑", "min": "↓", None: "(no direction: not ranked)"}
ALPHA = DEFAULTS.alpha   # the default significance level (mtlbench.results.options declares every setting)


@dataclass
class Store:
    """The usable records of a results directory, and what was left out and why (one line each)."""

    records: list[RunRecord]
    skipped: list[str] = field(default_factory=list)     # "file: reason" for unreadable or invalid files
    failed: list[RunRecord] = field(default_factory=list)
    superseded: list[tuple[RunRecord, RunRecord]] = field(default_factory=list)  # (dropped, kept newer)


def load_store(results_dir: str | Path) -> Store:
    """Read and validate every ``*.json`` record. An invalid file is skipped with one line naming it and why; a
    record stored under two file names (same run id) counts once; of several runs with the same protocol, method
    and seed only the newest counts."""
    store = Store(records=[])
    by_id: dict[str, tuple[Path, RunRecord]] = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            rec = load_record(path)
        except NewerSchema as exc:
            store.skipped.append(f"{path.name}: {exc}")
            continue
        except RecordError as exc:
            store.skipped.append(f"{path.name}: invalid run record: {exc}")
            continue
        if rec.run_id in by_id:
            first, other = by_id[rec.run_id]
            keep, drop = (path, first) if path.stem == rec.run_id and first.stem != rec.run_id else (first, path)
            by_id[rec.run_id] = (keep, rec if keep == path else other)
            store.skipped.append(f"{drop.name}: the same run as {keep.name} (run id {rec.run_id}), counted once")
            continue
        by_id[rec.run_id] = (path, rec)
    newest: dict[tuple[str, Any, int], RunRecord] = {}
    for _, rec in sorted(by_id.values(), key=lambda pr: pr[1].run_id):
        if not rec.ok:
            store.failed.append(rec)
            continue
        key = (_canon(protocol_of(rec.spec)), rec.method, rec.spec["seed"])
        old = newest.get(key)
        if old is None:
            newest[key] = rec
            continue
        keep, drop = (rec, old) if (rec.created, rec.run_id) > (old.created, old.run_id) else (old, rec)
        newest[key] = keep
        store.superseded.append((drop, keep))
    store.records = sorted(newest.values(), key=lambda r: r.run_id)
    return store


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def protocol_of(spec: dict[str, Any]) -> dict[str, Any]:
    """A run's protocol; a setting added after spec version 1 (``threads``) appears only where it differs from
    the value every version-1 run had, so one table never mixes thread counts and old tables keep their text."""
    return settings.protocol_of(spec)


FRAME_COLUMNS = ["run_id", "dataset", "dataset_version", "tasks", "protocol", "arch", "optimizer", "method", "seed",
                 "split", "task", "metric", "primary", "direction", "value", "selected_epoch", "epochs_run"]
#: Columns of the frame used to build tables but not written to the CSV.
INTERNAL_COLUMNS = ["protocol", "seconds_per_epoch", "compute_seconds", "at_default", "method_id", "family"]


def family_of(rec: RunRecord) -> str:
    """The kind of data a run read, from what its record shows (records do not name their dataset's modality):
    ``image`` when the dataset schema describes images, ``text`` when its inputs are token ids, else ``tabular``.
    Tables of one family are compared across datasets; tables of different families never are."""
    schema = (rec.dataset or {}).get("schema") or {}
    if isinstance(schema, dict) and schema.get("image"):
        return "image"
    extras = schema.get("extras") if isinstance(schema, dict) else None
    if isinstance(extras, list) and "input_ids" in extras:
        return "text"
    return "tabular"


def long_frame(records: list[RunRecord] | list[dict[str, Any]]) -> pd.DataFrame:
    """The canonical long format: one row per run x split x task x metric, at full precision (records as loaded,
    or as stored dicts, which are validated here). Method labels show the options that vary among the methods of
    the run's own table (protocol), so one table's ablation never relabels another's methods. ``selected_epoch`` is
    the epoch whose weights give that task's metrics: a run that selects per task (``single``) stores one per task
    (``selected_epochs``), every other run one for all tasks."""
    records = [r if isinstance(r, RunRecord) else RunRecord.from_dict(r) for r in records]
    rows = []
    protocols = {r.run_id: _canon(protocol_of(r.spec)) for r in records}
    by_protocol: dict[str, list[RunRecord]] = {}
    for rec in records:
        by_protocol.setdefault(protocols[rec.run_id], []).append(rec)
    names = {p: mid.labels(r.method for r in recs) for p, recs in by_protocol.items()}
    for rec in records:
        spec = rec.spec
        protocol = protocols[rec.run_id]
        tasks = {t["name"]: t for t in rec.dataset.get("tasks", [])}
        label = names[protocol][rec.method]
        arch, opt = label.split(mid.SEP)
        spe, default, family = rec.seconds_per_epoch, rec.at_default_options, family_of(rec)
        compute = rec.compute_seconds
        per_task_epoch = rec.selected_epochs or {}
        for split, per_task in (rec.metrics or {}).items():
            for task, metrics in per_task.items():
                primary = (tasks.get(task, {}).get("metrics") or [None])[0]
                epoch = per_task_epoch.get(task, rec.selected_epoch)
                for metric, value in metrics.items():
                    rows.append({
                        "run_id": rec.run_id, "dataset": spec["dataset"],
                        "dataset_version": spec.get("dataset_version"), "tasks": ",".join(spec["tasks"]),
                        "protocol": protocol, "arch": arch, "optimizer": opt,
                        "method": label, "seed": spec["seed"], "split": split, "task": task,
                        "metric": metric, "primary": metric == primary,
                        "direction": rec.directions.get(metric, ""), "value": np.nan if value is None else float(value),
                        "selected_epoch": epoch, "epochs_run": rec.epochs_run,
                        "seconds_per_epoch": np.nan if spe is None else spe,
                        "compute_seconds": np.nan if compute is None else compute, "at_default": default,
                        "method_id": rec.method, "family": family,
                    })
    frame = pd.DataFrame(rows, columns=FRAME_COLUMNS + INTERNAL_COLUMNS[1:])
    return frame.sort_values(["protocol", "method", "seed", "split", "task", "metric"], kind="stable",
                             ignore_index=True)


@dataclass
class Table:
    """One leaderboard table: a protocol, its methods' aggregated metrics, Δm%, ranks, cost and significance."""

    protocol: dict[str, Any]
    columns: list[tuple[str, str]]                 # (task, metric), primary metrics first per task
    directions: dict[str, str | None]              # metric -> max / min (None: not stored, never ranked)
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
    cost: dict[str, float | None] = field(default_factory=dict)         # time per epoch / the reference's
    seconds_per_epoch: dict[str, float | None] = field(default_factory=dict)
    cost_reference: str | None = None
    ids: dict[str, mid.MethodId] = field(default_factory=dict)
    at_default: dict[str, bool] = field(default_factory=dict)   # ran with its default options (as recorded)
    options: StatOptions = DEFAULTS                             # alpha, correction, ROPE, bootstrap settings
    family: str = "tabular"                                     # the kind of data (see family_of)
    reference: str | None = None                                # the Δm% reference (the `single` method)
    robust: dict[str, dict[str, Any]] = field(default_factory=dict)   # method -> IQM, P(improvement), Bayes
    robust_notes: list[str] = field(default_factory=list)
    delta_columns: list[tuple[str, str]] = field(default_factory=list)   # the (task, metric) columns of Δm%
    # "epoch": cost = time per epoch / the reference's; "compute" (merging tables, reference = the experts): total
    # fine-tuning compute (zoo + merge, or the joint training) / the experts' zoo
    cost_kind: str = "epoch"
    compute_seconds: dict[str, float | None] = field(default_factory=dict)

    @property
    def title(self) -> str:
        p = self.protocol
        tasks = p["tasks"]
        shown = ", ".join(tasks) if len(tasks) <= 8 else f"{len(tasks)} tasks ({', '.join(tasks[:4])}, ...)"
        return f"{p['dataset']} (v{p['dataset_version']}) — tasks {shown}"

    @property
    def ranked_columns(self) -> list[tuple[str, str]]:
        return [c for c in self.columns if self.directions.get(c[1]) in ("max", "min")]


def build_tables(frame: pd.DataFrame, flat_delta_m: bool = False, baseline: str | None = None,
                 superseded: list[tuple[RunRecord, RunRecord]] | None = None,
                 options: StatOptions = DEFAULTS) -> list[Table]:
    """One table per protocol. ``baseline`` (a method name as `mtlbench compare` takes it, see
    ``mtlbench.results.methods``) is the method every other is also tested against; default: the Δm% reference
    (``single``). ``superseded`` (from ``load_store``) is said in the notes of the tables it concerns. ``options``:
    the statistical settings (``mtlbench.results.options``)."""
    test = frame[frame["split"] == "test"]
    tables = []
    for protocol_json, part in test.groupby("protocol", sort=True):
        dropped = [(d, k) for d, k in superseded or [] if _canon(protocol_of(d.spec)) == protocol_json]
        tables.append(_table(json.loads(protocol_json), part, flat_delta_m, baseline, dropped, options))
    return tables


def resolve_method(text: str, table: Table) -> str | None:
    """The label of the method of ``table`` that ``text`` names (see ``mtlbench.results.methods.resolve``)."""
    found = mid.resolve(text, table.ids.values(), {table.ids[m]: d for m, d in table.at_default.items()})
    return None if found is None else next(label for label, m in table.ids.items() if m == found)


def _reference(methods: list[str], ids: dict[str, mid.MethodId], at_default: dict[str, bool],
               arch: str, optimizer: str | None = "ew") -> str | None:
    """The method of ``arch`` (with ``optimizer`` if that has runs), default options first, then by label."""
    found = [m for m in methods if ids[m].arch == arch]
    if optimizer and any(ids[m].optimizer == optimizer for m in found):
        found = [m for m in found if ids[m].optimizer == optimizer]
    return sorted(found, key=lambda m: (not at_default.get(m), m))[0] if found else None


def _table(protocol: dict[str, Any], part: pd.DataFrame, flat: bool, baseline: str | None = None,
           superseded: list[tuple[RunRecord, RunRecord]] = (), options: StatOptions = DEFAULTS) -> Table:
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
    directions: dict[str, str | None] = {}
    for metric, group in part.groupby("metric", sort=True)["direction"]:
        found = set(group) - {""}
        directions[metric] = found.pop() if len(found) == 1 and len(set(group)) == 1 else None
    notes = []
    unranked = sorted(m for m, d in directions.items() if d is None)
    if unranked:
        notes.append(f"metric(s) {', '.join(unranked)}: no direction stored in (every one of) their records, so "
                     "they are shown but not ranked, bolded, tested or used in Δm%")
    agg = part.groupby(["method", "task", "metric"])["value"].agg(["mean", "std", "count"])
    methods = sorted(part["method"].unique())
    ids = {m: part.loc[part["method"] == m, "method_id"].iloc[0] for m in methods}
    at_default = {m: bool(part.loc[part["method"] == m, "at_default"].eq(True).all()) for m in methods}
    table_stats: dict[str, dict] = {m: {} for m in methods}
    for (method, task, metric), row in agg.iterrows():
        table_stats[method][(task, metric)] = {"mean": float(row["mean"]),
                                               "std": float(row["std"]) if row["count"] > 1 else float("nan"),
                                               "n": int(row["count"])}
    seeds = {m: sorted(part.loc[part["method"] == m, "seed"].unique().tolist()) for m in methods}
    if superseded:
        notes.append(f"{len(superseded)} run(s) repeat a method and seed already in this table (another run id, "
                     "e.g. changed plugin code): each seed counts once, the newest run kept (dropped: "
                     + ", ".join(sorted(d.run_id for d, _ in superseded)) + ")")
    # Δm% against the single-task baseline
    base = _reference(methods, ids, at_default, BASELINE_ARCH)
    if base is None:  # a merging table: the experts are its T single-task runs
        base = next((m for m in methods if ids[m].optimizer == EXPERTS), None)
    experts_base = base is not None and ids[base].optimizer == EXPERTS
    delta: dict[str, float | None] = {}
    dense = any(c[1] in DENSE_METRIC_NAMES for c in columns)  # per-pixel tasks: every metric counts (vision papers)
    flat = flat or dense
    prim = [(t, metrics_by_task[t][0]) for t in tasks if metrics_by_task.get(t)]
    cols_for_delta = [c for c in (columns if flat else prim) if directions.get(c[1])]
    if base is None:
        note = "Δm% n/a: no single-task (`single`) runs under this protocol"
        delta = {m: None for m in methods}
    else:
        what = ("all metrics of every task (the dense-prediction convention, Maninis et al. 2019 / Vandenhende et "
                "al. 2021)" if dense else "all task metrics" if flat else "tasks of the primary metric")
        note = (f"Δm% (Maninis et al. 2019): mean over {what}"
                f" of the signed relative change vs `{base}`, in %, positive = better")
        if experts_base:
            note += " (the per-task fine-tuned experts: a merging table's single-task reference)"
        if len(cols_for_delta) < len(columns if flat else prim):
            note += " (metrics without a direction left out)"
        for m in methods:
            ms = {f"{t}/{k}": table_stats[m].get((t, k), {}).get("mean") for t, k in cols_for_delta}
            bs = {f"{t}/{k}": table_stats[base].get((t, k), {}).get("mean") for t, k in cols_for_delta}
            lower = {f"{t}/{k}": directions[k] == "min" for t, k in cols_for_delta}
            res = stats.delta_m(ms, bs, lower)
            delta[m] = None if res.value is None or not math.isfinite(res.value) else res.value
            if res.note:
                notes.append(f"{m}: Δm% {'n/a' if delta[m] is None else 'note'}: {res.note}")
    # mean rank over every ranked (task, metric) column; 1 = best; values within stats.REL_TOL tie
    ranked = [c for c in columns if directions.get(c[1])]
    if ranked:
        ranks = np.column_stack([stats.tie_ranks([table_stats[m].get(c, {}).get("mean", np.nan) for m in methods],
                                                 directions[c[1]] == "max") for c in ranked])
        mean_rank = dict(zip(methods, ranks.mean(axis=1).tolist()))
    else:
        mean_rank = {m: float("nan") for m in methods}
    order = sorted(methods, key=lambda m: (-(delta[m] if delta.get(m) is not None else -math.inf),
                                           mean_rank.get(m, math.inf), m))
    signif, why = _significance(part, order, tasks, metrics_by_task, directions, options)
    why_top = why
    chosen = base
    if baseline is not None:
        try:
            found = mid.resolve(baseline, ids.values(), {ids[m]: at_default[m] for m in methods},
                                " under this protocol")
        except MtlbenchError as exc:
            found = None
            notes.append(f"baseline: {exc}; no tests against it")
        else:
            if found is None:
                notes.append(f"baseline '{baseline}' has no runs under this protocol: no tests against it")
        chosen = None if found is None else next(m for m in methods if ids[m] == found)
    signif_base: dict[str, dict[str, Any]] = {}
    if chosen:
        signif_base, why = _significance(part, [chosen] + [m for m in order if m != chosen], tasks,
                                         metrics_by_task, directions, options)
        if why == why_top:
            notes += [f"tests vs the top row and vs the baseline: {w}" for w in why]
            why_top = []
        else:
            notes += [f"tests vs the baseline: {w}" for w in why]
    notes += [f"tests vs the top row: {w}" for w in why_top]
    # relative training cost: seconds per epoch (mean over seeds) against single x ew, else shared_bottom x ew
    spe = {m: _mean_or_none(part.loc[part["method"] == m].drop_duplicates("run_id")["seconds_per_epoch"])
           for m in methods}
    ref = next((r for a, o in COST_REFERENCES if (r := _reference(methods, ids, at_default, a, o))
                and ids[r].optimizer == o and spe.get(r)), None)
    cost = {m: (spe[m] / spe[ref] if ref and spe[m] is not None else None) for m in methods}
    compute = {m: _mean_or_none(part.loc[part["method"] == m].drop_duplicates("run_id")["compute_seconds"])
               for m in methods}
    cost_kind = "epoch"
    if ref is None and experts_base and compute.get(base):
        ref, cost_kind = base, "compute"
        cost = {m: (compute[m] / compute[ref] if compute[m] is not None else None) for m in methods}
    families = sorted(set(part["family"]))
    robust, robust_notes = _robust(part, order, base, chosen, cols_for_delta, directions, options)
    return Table(protocol, columns, directions, order, table_stats, delta, note,
                 {m: float(v) for m, v in mean_rank.items()}, seeds, signif, notes, chosen, signif_base, cost, spe,
                 ref, ids, at_default, options, "+".join(families), base, robust, robust_notes, cols_for_delta,
                 cost_kind, compute)


def _mean_or_none(values: pd.Series) -> float | None:
    v = values.to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else None


def _significance(part: pd.DataFrame, order: list[str], tasks: list[str], metrics_by_task: dict[str, list[str]],
                  directions: dict[str, str | None], options: StatOptions = DEFAULTS
                  ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Each method vs ``order[0]`` (the table's best, or a chosen baseline), per task on the primary metric: paired
    t-test and Wilcoxon over the shared seeds, corrected (Holm or Benjamini-Hochberg, ``options.correction``) across
    these comparisons. Returns the results and notes on what the tests cannot do (e.g. no Wilcoxon p can survive
    the correction with so few seeds)."""
    from mtlbench.results import stats

    alpha = options.alpha
    if len(order) < 2:
        return {}, []
    best = order[0]
    out: dict[str, dict[str, Any]] = {}
    raw_t, raw_w, keys, pairs = [], [], [], []
    prim = part[part["metric"] == part["task"].map(lambda t: (metrics_by_task.get(t) or [None])[0])]
    values = {k: dict(zip(g["seed"], g["value"])) for k, g in prim.groupby(["method", "task"], sort=False)}
    for m in order[1:]:
        out[m] = {}
        for t in tasks:
            if not metrics_by_task.get(t) or not directions.get(metrics_by_task[t][0]):
                continue
            metric = metrics_by_task[t][0]
            a, b = values.get((m, t), {}), values.get((best, t), {})
            common = sorted(set(a) & set(b))
            sign = 1.0 if directions[metric] == "max" else -1.0
            x = sign * np.array([a[k] for k in common], dtype=float)
            y = sign * np.array([b[k] for k in common], dtype=float)
            tt = stats.paired_t(x, y)
            wx = stats.wilcoxon(x, y, alpha=alpha)
            out[m][t] = {"metric": metric, "n": tt.n, "mean_diff": tt.mean_diff, "ci": [tt.ci_low, tt.ci_high],
                         "t_p": tt.pvalue, "wilcoxon_p": wx.pvalue, "note": "; ".join(n for n in (tt.note, wx.note) if n)}
            raw_t.append(tt.pvalue)
            raw_w.append(wx.pvalue)
            keys.append((m, t))
            pairs.append(wx.n)
    adj_t = stats.correct(raw_t, options.correction, alpha).adjusted
    adj_w = stats.correct(raw_w, options.correction, alpha).adjusted
    for (m, t), pt, pw in zip(keys, adj_t, adj_w):
        out[m][t]["t_p_adjusted"] = float(pt)
        out[m][t]["wilcoxon_p_adjusted"] = float(pw)
    notes = []
    t_can = max(pairs, default=0) >= 2    # a paired t-test needs 2 pairs; with fewer nothing can reject
    floor = stats.wilcoxon_floor(pairs, raw_w, alpha, options.correction, alternative="the paired t-test can" if
                                 t_can else "nor can the paired t-test, which needs at least 2 pairs")
    if math.isfinite(floor.floor) and floor.floor >= alpha:
        notes.append(floor.note)
    return out, notes


def _per_seed(part: pd.DataFrame, cols: list[tuple[str, str]]) -> dict[str, dict[int, np.ndarray]]:
    """method -> seed -> that run's values of ``cols`` (runs missing one of them are left out)."""
    want = {c: i for i, c in enumerate(cols)}
    out: dict[str, dict[int, np.ndarray]] = {}
    sub = part[[(t, m) in want for t, m in zip(part["task"], part["metric"])]]
    for (method, seed), g in sub.groupby(["method", "seed"], sort=True):
        row = np.full(len(cols), np.nan)
        for t, m, v in zip(g["task"], g["metric"], g["value"]):
            row[want[(t, m)]] = v
        if np.all(np.isfinite(row)):
            out.setdefault(method, {})[int(seed)] = row
    return out


def _relative(values: np.ndarray, ref: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """The signed relative change in % of ``values`` (... x columns) against ``ref`` (columns), positive = better."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(lower, -1.0, 1.0) * (values - ref) / np.abs(ref) * 100.0


def _robust(part: pd.DataFrame, order: list[str], base: str | None, chosen: str | None,
            cols: list[tuple[str, str]], directions: dict[str, str | None], options: StatOptions
            ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The reviewer statistics of a table, each over the columns of its Δm% (the same convention):

    - IQM (Agarwal et al. 2021): the interquartile mean of every run's signed relative change in % against the
      Δm% reference's mean, over runs x columns, with a stratified bootstrap percentile interval (each column a
      stratum, its runs resampled on their own): a Δm% that one outlying run or metric cannot move;
    - probability of improvement (Agarwal et al. 2021) over the baseline: per column the probability that a random
      run of the method beats a random run of the baseline (ties 1/2), averaged over columns, same bootstrap;
    - Bayesian signed-rank test with a ROPE (Benavoli et al. 2017) against the baseline and against the top row,
      on the shared seeds: per seed the Δm% of the method against the other method's run of that seed; the
      posterior probabilities that the method is practically better (> rope), equivalent, or worse.
    """
    from mtlbench.results import stats

    if not cols:
        return {}, ["no metric with a direction: no IQM, probability of improvement or Bayesian test"]
    lower = np.array([directions[m] == "min" for _, m in cols])
    runs = _per_seed(part, cols)
    out: dict[str, dict[str, Any]] = {m: {} for m in order}
    notes: list[str] = []
    ref_mean = np.mean(np.stack(list(runs[base].values())), axis=0) if base in runs else None
    if ref_mean is not None and np.any(ref_mean == 0):
        ref_mean = None
        notes.append(f"IQM n/a: {base} has a mean of 0 on a metric, so relative changes are undefined")
    top = order[0] if order else None
    few: set[int] = set()

    def bayes(m: str, other: str | None) -> dict[str, Any] | None:
        if other is None or m == other or m not in runs or other not in runs:
            return None
        shared = sorted(set(runs[m]) & set(runs[other]))
        if len(shared) < options.bayes_min_pairs:
            few.add(len(shared))
            return None
        ref = np.stack([runs[other][k] for k in shared])
        if np.any(ref == 0):
            return None
        z = _relative(np.stack([runs[m][k] for k in shared]), ref, lower).mean(axis=1)
        r = stats.bayesian_signed_rank(z, np.zeros_like(z), options.rope, options.bayes_prior,
                                       options.bayes_samples, options.stat_seed)
        return {"better": r.p_a, "equivalent": r.p_rope, "worse": r.p_b, "n": r.n,
                "mean_delta": float(z.mean()), "note": r.note}

    for m in order:
        if m not in runs:
            continue
        x = np.stack([runs[m][k] for k in sorted(runs[m])])
        if ref_mean is not None:
            ci = stats.iqm_ci(_relative(x, ref_mean, lower), options.confidence, options.bootstrap_resamples,
                              options.stat_seed)
            out[m]["iqm"] = {"estimate": ci.estimate, "ci": [ci.ci_low, ci.ci_high], "n": int(x.shape[0]),
                             "note": ci.note}
        if chosen and chosen in runs and m != chosen:
            sign = np.where(lower, -1.0, 1.0)
            y = np.stack([runs[chosen][k] for k in sorted(runs[chosen])])
            ci = stats.probability_of_improvement_ci(sign * x, sign * y, options.confidence,
                                                     options.bootstrap_resamples, options.stat_seed)
            out[m]["p_improvement"] = {"estimate": ci.estimate, "ci": [ci.ci_low, ci.ci_high], "note": ci.note}
        for key, other in (("bayes_vs_baseline", chosen), ("bayes_vs_top", top)):
            r = bayes(m, other)
            if r is not None:
                out[m][key] = r
    if base is None:
        notes.append("IQM n/a: no single-task (single) runs under this protocol")
    if chosen is None:
        notes.append("probability of improvement n/a: no baseline under this protocol")
    if few:
        notes.append(f"Bayesian signed-rank test not shown where fewer than {options.bayes_min_pairs} seeds are "
                     f"shared (here {', '.join(map(str, sorted(few)))}): with so few the prior decides")
    return {m: v for m, v in out.items() if v}, notes


def table_records(table: Table, records: list[RunRecord]) -> list[RunRecord]:
    """The stored records behind ``table`` (same protocol)."""
    proto = _canon(table.protocol)
    return [r for r in records if _canon({k: r.spec.get(k) for k in table.protocol}) == proto]
