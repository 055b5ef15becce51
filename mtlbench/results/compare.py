"""`mtlbench compare A B`: two methods on one dataset, per task and metric, paired over their shared seeds.

Methods are named as everywhere else (``mtlbench.results.methods``): ``ARCH``, ``ARCH:OPTIMIZER``, with options
``ARCH(k=v):OPTIMIZER`` or a leaderboard label. The rows end with a summary line: on how many rows each side is
better, how many of those are significant (paired t-test, corrected across the rows: Holm by default, or
Benjamini-Hochberg with ``--correction bh``; ``--alpha`` the level), and the ties.
"""
from __future__ import annotations

import json
import math

import numpy as np

from mtlbench.errors import MtlbenchError, unknown
from mtlbench.results import methods as mid
from mtlbench.results.leaderboard import Store, load_store, long_frame
from mtlbench.results.options import DEFAULTS, StatOptions


def compare(results_dir: str, a: str, b: str, dataset: str | None = None, tasks: list[str] | None = None,
            split: str = "test", store_out: list[Store] | None = None, options: StatOptions = DEFAULTS) -> str:
    from mtlbench.results import stats

    alpha, corr = options.alpha, options.correction_name
    store = load_store(results_dir)
    if store_out is not None:
        store_out.append(store)
    full = long_frame(store.records)
    if full.empty:
        raise MtlbenchError(f"no finished runs in '{results_dir}'")
    splits = sorted(full["split"].unique())
    if split not in splits:
        raise unknown("split", split, splits)
    frame = full[full["split"] == split]
    if dataset:
        if dataset not in set(frame["dataset"]):
            raise unknown("dataset (with finished runs here)", dataset, sorted(set(frame["dataset"])))
        frame = frame[frame["dataset"] == dataset]
    if tasks:
        sets = sorted(set(frame["tasks"]))
        if ",".join(tasks) not in sets:
            raise unknown("task set (with finished runs here)", ",".join(tasks), sets)
        frame = frame[frame["tasks"] == ",".join(tasks)]
    # methods by identity: labels are per table, so one label may name different option variants in two tables
    ids = list(dict.fromkeys(frame["method_id"]))
    defaults = {m: bool(g.eq(True).all()) for m, g in frame.groupby("method_id", sort=False)["at_default"]}
    found = []
    for name in (a, b):
        m = mid.resolve(name, ids, defaults)
        if m is None:
            raise MtlbenchError(f"no runs of '{name}' here (known: {', '.join(mid.known_names(ids)) or 'none'})")
        found.append(m)
    if found[0] == found[1]:
        label = frame.loc[frame["method_id"] == found[0], "method"].iloc[0]
        raise MtlbenchError(f"'{a}' and '{b}' name the same method ({label})")
    fa, fb = frame[frame["method_id"] == found[0]], frame[frame["method_id"] == found[1]]
    shared = sorted(set(fa["protocol"]) & set(fb["protocol"]))
    if not shared:
        raise MtlbenchError(f"'{a}' and '{b}' have no protocol (dataset, tasks, training settings) in common")
    if len(shared) > 1:
        options = sorted({f"{json.loads(p)['dataset']} [{','.join(json.loads(p)['tasks'])}]" for p in shared})
        raise MtlbenchError(f"several tables hold both methods ({'; '.join(options)}): pass --dataset/--tasks")
    fa, fb = fa[fa["protocol"] == shared[0]], fb[fb["protocol"] == shared[0]]
    chosen = [fa["method"].iloc[0], fb["method"].iloc[0]]   # their labels in that table
    proto = json.loads(shared[0])
    shown_tasks = ", ".join(proto["tasks"]) if len(proto["tasks"]) <= 8 else f"{len(proto['tasks'])} tasks"
    lines = [f"{chosen[0]}  vs  {chosen[1]}  on {proto['dataset']} [{shown_tasks}], {split} split, paired over "
             "shared seeds",
             "difference = A - B, oriented so that positive = A better; 95% CI from the paired t-test; "
             f"{corr} across the rows below (alpha {alpha:g})", ""]
    rows, p_t, p_w, pairs = [], [], [], []
    unranked = []
    for (task, metric), ga in fa.groupby(["task", "metric"], sort=False):
        gb = fb[(fb["task"] == task) & (fb["metric"] == metric)]
        direction = ga["direction"].iloc[0]
        if direction not in ("max", "min") or set(gb["direction"]) - {direction}:
            unranked.append(f"{task}/{metric}")
            continue
        va, vb = ga.set_index("seed")["value"], gb.set_index("seed")["value"]
        seeds = sorted(set(va.index) & set(vb.index))
        sign = 1.0 if direction == "max" else -1.0
        x, y = sign * va.loc[seeds].to_numpy(float), sign * vb.loc[seeds].to_numpy(float)
        t = stats.paired_t(x, y)
        w = stats.wilcoxon(x, y, alpha=alpha)
        with np.errstate(all="ignore"):
            ma = float(np.nanmean(va.loc[seeds])) if seeds else math.nan
            mb = float(np.nanmean(vb.loc[seeds])) if seeds else math.nan
        rows.append((task, metric, t.n, ma, mb, t, w))
        p_t.append(t.pvalue)
        p_w.append(w.pvalue)
        pairs.append(w.n)
    adj_t = stats.correct(p_t, options.correction, alpha).adjusted
    adj_w = stats.correct(p_w, options.correction, alpha).adjusted
    width = max([len(r[0]) for r in rows] + [10])
    head = f"{'task':<{width}} {'metric':<9} {'n':>3} {'mean A':>9} {'mean B':>9} {'diff':>9} {'95% CI':>21} " \
           f"{f't p ({options.correction_short})':>17} {f'Wilcoxon p ({options.correction_short})':>18}"
    lines.append(head)
    notes = []
    for (task, metric, n, ma, mb, t, w), at, aw in zip(rows, adj_t, adj_w):
        f = lambda v, d=4: "n/a" if v is None or not math.isfinite(v) else f"{v:.{d}f}"  # noqa: E731
        lines.append(f"{task:<{width}} {metric:<9} {n:>3} {f(ma):>9} {f(mb):>9} {f(t.mean_diff):>9} "
                     f"{'[' + f(t.ci_low) + ', ' + f(t.ci_high) + ']':>21} {f(t.pvalue, 3) + ' (' + f(at, 3) + ')':>17} "
                     f"{f(w.pvalue, 3) + ' (' + f(aw, 3) + ')':>18}")
        for note in (t.note, w.note):
            if note and note not in notes:
                notes.append(note)
    floor = stats.wilcoxon_floor(pairs, p_w, alpha, options.correction, alternative="the paired t-test can")
    if floor.note and math.isfinite(floor.floor) and floor.floor >= alpha:
        notes.append(floor.note)
    if unranked:
        notes.append(f"not compared (no direction stored for the metric): {', '.join(unranked)}")
    lines += ["", summary_line(rows, adj_t, alpha, corr)]
    if notes:
        lines += ["", "notes: " + "; ".join(notes)]
    return "\n".join(lines)


def summary_line(rows: list[tuple], adjusted_t: tuple[float, ...], alpha: float = DEFAULTS.alpha,
                 correction: str = DEFAULTS.correction_name) -> str:
    """Wins, losses and ties over the rows, with how many of each side's wins are significant."""
    a = b = a_sig = b_sig = ties = undefined = 0
    for row, p in zip(rows, adjusted_t):
        d = row[5].mean_diff
        if d is None or not math.isfinite(d):
            undefined += 1
            continue
        sig = p is not None and math.isfinite(p) and p < alpha
        if d > 0:
            a, a_sig = a + 1, a_sig + sig
        elif d < 0:
            b, b_sig = b + 1, b_sig + sig
        else:
            ties += 1
    return (f"summary over {len(rows)} rows: A better on {a} ({a_sig} significant), B better on {b} "
            f"({b_sig} significant), {ties} tied" + (f", {undefined} without a value" if undefined else "")
            + f" (significant: {correction}-corrected paired t-test p < {alpha:g})")
