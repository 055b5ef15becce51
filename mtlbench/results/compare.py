"""`mtlbench compare A B`: two methods on one dataset, per task and metric, paired over their shared seeds."""
from __future__ import annotations

import json
import math

import numpy as np

from mtlbench.errors import MtlbenchError
from mtlbench.results.leaderboard import load_store, long_frame


def _match(frame, text: str):
    arch, _, opt = text.partition(":")
    base_arch = frame["arch"].str.split("(").str[0]
    base_opt = frame["optimizer"].str.split("(").str[0]
    sel = (base_arch == arch) | (frame["arch"] == arch)
    if opt:
        sel &= (base_opt == opt) | (frame["optimizer"] == opt)
    return frame[sel]


def compare(results_dir: str, a: str, b: str, dataset: str | None = None, tasks: list[str] | None = None,
            split: str = "test") -> str:
    from mtlbench.results import stats

    frame = long_frame(load_store(results_dir).records)
    if frame.empty:
        raise MtlbenchError(f"no finished runs in '{results_dir}'")
    frame = frame[frame["split"] == split]
    if dataset:
        frame = frame[frame["dataset"] == dataset]
    if tasks:
        frame = frame[frame["tasks"] == ",".join(tasks)]
    fa, fb = _match(frame, a), _match(frame, b)
    for name, f in ((a, fa), (b, fb)):
        if f.empty:
            known = sorted({f"{x.split('(')[0]}:{y.split('(')[0]}" for x, y in zip(frame["arch"], frame["optimizer"])})
            raise MtlbenchError(f"no runs of '{name}' here (known: {', '.join(known) or 'none'})")
        if f["method"].nunique() > 1:
            raise MtlbenchError(f"'{name}' matches several methods ({', '.join(sorted(f['method'].unique()))}); "
                                f"name the optimizer as ARCH:OPTIMIZER")
    shared = sorted(set(fa["protocol"]) & set(fb["protocol"]))
    if not shared:
        raise MtlbenchError(f"'{a}' and '{b}' have no protocol (dataset, tasks, training settings) in common")
    if len(shared) > 1:
        options = sorted({f"{json.loads(p)['dataset']} [{','.join(json.loads(p)['tasks'])}]" for p in shared})
        raise MtlbenchError(f"several tables hold both methods ({'; '.join(options)}): pass --dataset/--tasks")
    fa, fb = fa[fa["protocol"] == shared[0]], fb[fb["protocol"] == shared[0]]
    proto = json.loads(shared[0])
    lines = [f"{fa['method'].iloc[0]}  vs  {fb['method'].iloc[0]}  on {proto['dataset']} "
             f"[{', '.join(proto['tasks'])}], {split} split, paired over shared seeds",
             "difference = A - B, oriented so that positive = A better; 95% CI from the paired t-test; "
             "Holm across the rows below", ""]
    rows, p_t, p_w = [], [], []
    for (task, metric), ga in fa.groupby(["task", "metric"], sort=False):
        gb = fb[(fb["task"] == task) & (fb["metric"] == metric)]
        va, vb = ga.set_index("seed")["value"], gb.set_index("seed")["value"]
        seeds = sorted(set(va.index) & set(vb.index))
        sign = 1.0 if ga["direction"].iloc[0] == "max" else -1.0
        x, y = sign * va.loc[seeds].to_numpy(float), sign * vb.loc[seeds].to_numpy(float)
        t = stats.paired_t(x, y)
        w = stats.wilcoxon(x, y)
        rows.append((task, metric, len(seeds), float(np.mean(va.loc[seeds])) if seeds else math.nan,
                     float(np.mean(vb.loc[seeds])) if seeds else math.nan, t, w))
        p_t.append(t.pvalue)
        p_w.append(w.pvalue)
    adj_t, adj_w = stats.holm(p_t).adjusted, stats.holm(p_w).adjusted
    head = f"{'task':<10} {'metric':<9} {'n':>3} {'mean A':>9} {'mean B':>9} {'diff':>9} {'95% CI':>21} " \
           f"{'t p (Holm)':>17} {'Wilcoxon p (Holm)':>18}"
    lines.append(head)
    notes = []
    for (task, metric, n, ma, mb, t, w), at, aw in zip(rows, adj_t, adj_w):
        f = lambda v, d=4: "n/a" if v is None or not math.isfinite(v) else f"{v:.{d}f}"  # noqa: E731
        lines.append(f"{task:<10} {metric:<9} {n:>3} {f(ma):>9} {f(mb):>9} {f(t.mean_diff):>9} "
                     f"{'[' + f(t.ci_low) + ', ' + f(t.ci_high) + ']':>21} {f(t.pvalue, 3) + ' (' + f(at, 3) + ')':>17} "
                     f"{f(w.pvalue, 3) + ' (' + f(aw, 3) + ')':>18}")
        for note in (t.note, w.note):
            if note and note not in notes:
                notes.append(note)
    if notes:
        lines += ["", "notes: " + "; ".join(notes)]
    return "\n".join(lines)
