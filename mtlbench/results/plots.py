"""The leaderboard's figures: per-table bars, two-task trade-off, validation curves, and the critical difference
diagram. Drawing only; every number comes from a built ``Table`` or from ``stats``. Uses matplotlib's Agg backend,
PNGs without software/date metadata so the same inputs give the same bytes."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from mtlbench.results.leaderboard import ARROW, Table, table_records
from mtlbench.results.record import RunRecord
from mtlbench.results.stats import cd_cliques

def _fig_save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


CURVE_METHODS = 8  # validation-curve panels show the table's top methods (and the single-task baseline)
PANELS_MAX = 12    # per-task panels: the first this many tasks (a 139-task figure would be metres wide)


def _panel_note(n_tasks: int) -> str:
    return f"; the first {PANELS_MAX} of {n_tasks} tasks" if n_tasks > PANELS_MAX else ""


def plot_bars(table: Table, path: Path) -> Path:
    """Per task, the primary metric's mean ± std over seeds: horizontal bars in table order, so that dozens of
    methods stay readable (the figure grows with their number)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prim = [(t, m) for t, m in table.columns if m == next(mm for tt, mm in table.columns if tt == t)]
    n_tasks = len(prim)
    prim = prim[:PANELS_MAX]
    n = len(table.methods)
    fig, axes = plt.subplots(1, len(prim), figsize=(3.0 * len(prim) + 2.2, 0.9 + 0.22 * n), squeeze=False,
                             sharey=True)
    ys = np.arange(n)[::-1]  # first method on top
    for ax, col in zip(axes[0], prim):
        means = [table.stats[m].get(col, {}).get("mean", np.nan) for m in table.methods]
        stds = [table.stats[m].get(col, {}).get("std", np.nan) for m in table.methods]
        stds = [0.0 if not math.isfinite(s) else s for s in stds]
        ax.barh(ys, means, xerr=stds, capsize=2, color="#4c72b0", height=0.7, error_kw={"linewidth": 0.8})
        ax.set_title(f"{col[0]} {col[1]} {ARROW[table.directions[col[1]]]}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        finite = [v for v in means if math.isfinite(v)]
        if finite:
            lo, hi = min(finite), max(finite)
            pad = (hi - lo) * 0.15 + max(stds) + 1e-4
            ax.set_xlim(lo - pad, hi + pad)
        ax.grid(axis="x", linewidth=0.3)
    axes[0][0].set_yticks(ys, table.methods, fontsize=7)
    fig.suptitle(f"{table.title}: test, mean ± std over seeds{_panel_note(n_tasks)}", fontsize=9)
    return _fig_save(fig, path)


def plot_tradeoff(table: Table, path: Path) -> Path | None:
    """The first two tasks' primary metrics, one point per method; the Pareto front is drawn and labelled (other
    points are labelled only while there are few of them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(t for t, _ in table.ranked_columns))
    if len(tasks) < 2:
        return None
    cx = (tasks[0], next(m for t, m in table.columns if t == tasks[0]))
    cy = (tasks[1], next(m for t, m in table.columns if t == tasks[1]))
    pts = [(table.stats[m].get(cx, {}).get("mean", np.nan), table.stats[m].get(cy, {}).get("mean", np.nan), m)
           for m in table.methods]
    pts = [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]
    if not pts:
        return None
    sx = 1 if table.directions[cx[1]] == "max" else -1
    sy = 1 if table.directions[cy[1]] == "max" else -1
    front = [p for p in pts if not any(sx * q[0] >= sx * p[0] and sy * q[1] >= sy * p[1] and q[:2] != p[:2]
                                       for q in pts)]
    front.sort(key=lambda p: p[0])
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="#999999", s=14, zorder=2)
    ax.plot([p[0] for p in front], [p[1] for p in front], "-o", color="#c44e52", zorder=3, label="Pareto front")
    label_all = len(pts) <= 12
    for x, y, m in pts:
        if label_all or (x, y, m) in front or m.startswith("single"):
            ax.annotate(m, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"{cx[0]} {cx[1]} {ARROW[table.directions[cx[1]]]}")
    ax.set_ylabel(f"{cy[0]} {cy[1]} {ARROW[table.directions[cy[1]]]}")
    ax.set_title(f"{table.title}: two-task trade-off (test means)"
                 + ("" if label_all else "\nlabelled: the Pareto front and the single-task baseline"), fontsize=8)
    ax.legend(fontsize=7)
    return _fig_save(fig, path)


def plot_curves(table: Table, records: list[RunRecord], frame: pd.DataFrame, path: Path) -> Path:
    """Mean validation curve over seeds per method, for the table's top ``CURVE_METHODS`` methods and the
    single-task baseline (all of them would be unreadable), legend beside the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    method_of = dict(zip(frame["run_id"], frame["method"]))
    all_tasks = list(dict.fromkeys(t for t, _ in table.columns))
    tasks = all_tasks[:PANELS_MAX]
    prim = {t: next(m for tt, m in table.columns if tt == t) for t in tasks}
    runs = [r for r in table_records(table, records) if r.run_id in method_of]
    shown = table.methods[:CURVE_METHODS] + [m for m in table.methods[CURVE_METHODS:] if m.startswith("single")]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks) + 2.4, 3.2), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for m in shown:
            curves = [[((c.get("val") or {}).get(t) or {}).get(prim[t]) for c in r.curves]
                      for r in runs if method_of[r.run_id] == m and r.curves]  # merge records have no curves
            if not curves:
                continue
            L = max(len(c) for c in curves)
            arr = np.full((len(curves), L), np.nan)
            for i, c in enumerate(curves):
                arr[i, :len(c)] = [v if isinstance(v, (int, float)) else np.nan for v in c]
            with np.errstate(all="ignore"):
                mean = np.nanmean(arr, axis=0)
            ax.plot(range(1, L + 1), mean, marker=".", label=m, linewidth=1)
        ax.set_title(f"validation {t} {prim[t]} {ARROW[table.directions[prim[t]]]}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    more = len(table.methods) - len(shown)
    fig.suptitle(f"{table.title}: validation curves (mean over seeds){_panel_note(len(all_tasks))}"
                 + (f"; the top {CURVE_METHODS} methods of the table and the baseline ({more} more in the table)"
                    if more > 0 else ""), fontsize=9)
    return _fig_save(fig, path)


def plot_cost(table: Table, path: Path) -> Path | None:
    """Δm% against relative training cost (time per epoch vs the table's reference; in a merging table, fine-tuning
    compute vs the experts' zoo), one point per method: what a method gains for what it costs. None when the table has no Δm% or no cost reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(table.cost.get(m), table.delta_m.get(m), m) for m in table.methods]
    pts = [(c, d, m) for c, d, m in pts if c is not None and d is not None and c > 0 and math.isfinite(d)]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="#4c72b0", s=16, zorder=3)
    front = [p for p in pts if not any(q[0] <= p[0] and q[1] >= p[1] and q[:2] != p[:2] for q in pts)]
    front.sort(key=lambda p: p[0])
    ax.plot([p[0] for p in front], [p[1] for p in front], "-", color="#c44e52", zorder=2,
            label="best Δm% for its cost")
    label_all = len(pts) <= 14
    for c, d, m in pts:
        if label_all or (c, d, m) in front:
            ax.annotate(m, (c, d), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.axhline(0.0, color="#999999", linewidth=0.6)
    what = "fine-tuning compute" if table.cost_kind == "compute" else "training time per epoch"
    ax.set_xlabel(f"{what} relative to {table.cost_reference} (log scale) ↓")
    ax.set_ylabel("Δm% ↑")
    ax.set_title(f"{table.title}: Δm% vs cost" + ("" if label_all else "\nlabelled: the front"), fontsize=8)
    ax.legend(fontsize=7)
    return _fig_save(fig, path)


def critical_difference_diagram(avg_ranks: Mapping[str, float], cd: float, path: str | Path,
                                title: str | None = None) -> Path:
    """Draw a critical difference diagram in Demšar's (2006) style and save it to ``path`` (.png, .svg or .pdf).

    A rank axis from 1 to k (best on the left); each method hangs from its average rank by a line to its name, the
    better half labelled on the left, the rest on the right; thick bars join the groups from ``cd_cliques``; the CD
    interval is drawn above the axis (omitted when ``cd`` is NaN). Uses matplotlib's Agg canvas, never pyplot.
    Returns the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in {"png", "svg", "pdf"}:
        raise ValueError(f"unsupported diagram format {path.suffix!r} (use .png, .svg or .pdf)")
    if not avg_ranks:
        raise ValueError("no methods to draw")
    ranks = {str(k): float(v) for k, v in avg_ranks.items()}
    bad = [k for k, v in ranks.items() if not np.isfinite(v)]
    if bad:
        raise ValueError(f"average ranks must be finite, got NaN/inf for {bad}")
    items = sorted(ranks.items(), key=lambda kv: (kv[1], kv[0]))
    k = len(items)
    cd = float(cd)
    low = min(1, math.floor(items[0][1]))
    high = max(k, math.ceil(items[-1][1]), low + 1)
    cliques = cd_cliques(ranks, cd)

    # Layout in inches, y growing downwards.
    name_len = max(len(name) for name, _ in items)
    text_space = min(3.0, max(0.9, 0.25 + 0.075 * name_len))
    axis_width = max(3.0, 0.6 * (high - low))
    width = 2 * text_space + axis_width
    top = 0.45 if title else 0.1
    cd_y = top + 0.3
    axis_y = cd_y + 0.45
    clique_y0 = axis_y + 0.18
    clique_step = 0.1
    label_y0 = clique_y0 + clique_step * max(len(cliques), 1) + 0.15
    row = 0.24
    half = math.ceil(k / 2)
    height = label_y0 + row * max(half, k - half) + 0.15

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()

    def xr(rank: float) -> float:
        return text_space + (rank - low) / (high - low) * axis_width

    line = dict(color="black", linewidth=0.9, solid_capstyle="butt")
    if title:
        ax.text(width / 2, 0.1, title, ha="center", va="top", fontsize=11)
    ax.plot([xr(low), xr(high)], [axis_y, axis_y], **line)
    for tick in np.arange(low, high + 0.25, 0.5):
        major = float(tick).is_integer()
        ax.plot([xr(tick)] * 2, [axis_y, axis_y - (0.08 if major else 0.04)], **line)
        if major:
            ax.text(xr(tick), axis_y - 0.1, f"{int(tick)}", ha="center", va="bottom", fontsize=9)
    if np.isfinite(cd) and cd > 0:
        x0, x1 = xr(low), xr(min(low + cd, high))
        ax.plot([x0, x1], [cd_y, cd_y], color="black", linewidth=1.4)
        for xe in (x0, x1):
            ax.plot([xe, xe], [cd_y - 0.05, cd_y + 0.05], color="black", linewidth=1.4)
        ax.text((x0 + x1) / 2, cd_y - 0.07, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=9)
    for i, clique in enumerate(cliques):
        y = clique_y0 + i * clique_step
        ax.plot([xr(ranks[clique[0]]) - 0.04, xr(ranks[clique[-1]]) + 0.04], [y, y], color="black", linewidth=3.0,
                solid_capstyle="round")
    for i, (name, rank) in enumerate(items):
        if i < half:  # better half: the best is nearest the axis, labels on the left
            y, x_end, ha = label_y0 + i * row, text_space - 0.1, "right"
        else:  # worse half: the worst is nearest the axis, labels on the right
            y, x_end, ha = label_y0 + (k - 1 - i) * row, width - text_space + 0.1, "left"
        ax.plot([xr(rank), xr(rank), x_end], [axis_y, y, y], **line)
        ax.text(x_end + (-0.05 if ha == "right" else 0.05), y, name, ha=ha, va="center", fontsize=9)
        ax.text(x_end + (0.05 if ha == "right" else -0.05), y - 0.03, f"{rank:.2f}",
                ha="left" if ha == "right" else "right", va="bottom", fontsize=7, color="dimgray")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=fmt, dpi=150)
    return path


def _usage_of(record: RunRecord) -> dict[str, Any] | None:
    info = record.arch_info
    usage = info.get("expert_usage") if isinstance(info, dict) else None
    return usage if isinstance(usage, dict) and isinstance(usage.get("tasks"), dict) else None


def plot_expert_usage(table: Table, records: list[RunRecord], frame: pd.DataFrame, path: Path) -> Path | None:
    """Mixture-of-experts gate usage (records whose ``arch_info`` holds an ``expert_usage``, e.g. TaskExpert's):
    one heat map per method and tapped block, rows = tasks, columns = experts and the memory, cells = mean gate
    weight on the test split (mean over seeds); each row is labelled with its mean per-token gate entropy over its
    maximum. Gates that specialise show as rows that differ; a uniform gate as a flat row at entropy = max. None
    when no record of the table stores expert usage."""
    method_of = dict(zip(frame["run_id"], frame["method"]))
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in table_records(table, records):
        u = _usage_of(r)
        if u is not None and r.run_id in method_of:
            by_method.setdefault(method_of[r.run_id], []).append(u)
    if not by_method:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in table.methods if m in by_method]
    tasks = list(by_method[methods[0]][0]["tasks"])
    n_blocks = max(len(u["tasks"][t]) for m in methods for u in by_method[m] for t in u["tasks"])
    width = max(len(row["experts"]) + 1 for m in methods for u in by_method[m] for t in u["tasks"]
                for row in u["tasks"][t])
    fig, axes = plt.subplots(len(methods), n_blocks, figsize=(n_blocks * (0.32 * width + 3.2),
                                                              0.3 * len(tasks) * len(methods) + 0.9 * len(methods) + 0.4),
                             squeeze=False, layout="constrained")
    for i, m in enumerate(methods):
        for b in range(n_blocks):
            ax = axes[i][b]
            rows_of = {t: [u["tasks"][t][b] for u in by_method[m] if t in u["tasks"] and b < len(u["tasks"][t])]
                       for t in tasks}
            if not any(rows_of.values()):
                ax.set_axis_off()  # this variant taps fewer blocks
                continue
            k = max(len(r["experts"]) for rows in rows_of.values() for r in rows)
            grid = np.full((len(tasks), k + 1), np.nan)
            labels, block = [], None
            for j, t in enumerate(tasks):
                rows = rows_of[t]
                if not rows:
                    labels.append(t)
                    continue
                block = rows[0]["block"]
                grid[j, :len(rows[0]["experts"])] = np.mean([r["experts"] for r in rows], axis=0)
                mem = [r["memory"] for r in rows if r["memory"] is not None]
                if mem:
                    grid[j, k] = float(np.mean(mem))
                labels.append(f"{t} H {float(np.mean([r['entropy'] for r in rows])):.2f}/"
                              f"{float(rows[0]['max_entropy']):.2f}")
            im = ax.imshow(grid, vmin=0.0, vmax=max(float(np.nanmax(grid)), 1e-6), cmap="viridis", aspect="auto")
            ax.set_xticks(range(k + 1), [f"E{c + 1}" for c in range(k)] + ["mem"], fontsize=6)
            ax.set_yticks(range(len(tasks)), labels, fontsize=6)
            ax.set_title(f"{m}\nblock {block}", fontsize=6)
            fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02).ax.tick_params(labelsize=5)
    fig.suptitle(f"{table.title}: mean gate weight per task and expert on test (mean over seeds; blank = not "
                 "gated: no memory at the first module, or without the memory)\nH: mean per-token gate entropy "
                 "(nats) / its maximum", fontsize=7)
    return _fig_save(fig, path)
