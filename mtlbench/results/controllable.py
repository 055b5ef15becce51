"""Controllable models in the leaderboard: controllability, the grid summaries, and their table and figures.

A controllable run (the ``slimmable`` arch) stores under ``arch_info.controllable`` the evaluation grid it made once
after training: budgets ``b`` in {25, 50, 75, 100} % of the full model's analytical FLOPs x preferences ``r`` (the
simplex lattice of step 1/4 for T <= 3 tasks: 15 vectors for T = 3; for T > 3 the T one-hot-dominant vectors, 0.7 on
one task, plus the uniform one). For each point: the searched configuration, its exact FLOPs, whether it held the
budget, and its validation and test metrics (each distinct configuration evaluated once); plus, per encoder width
used, the *reference* configuration: the same encoder with every decoder at the narrowest width.

**Controllability** (ours, defined precisely; test split):

- normalised gain of task t at grid point (r, b) with chosen configuration (e, d):
  ``g_t = s_t (M_t(e, d) - M_t(e, d_min)) / |M_t(e, d_min)|``, ``M_t`` the task's primary metric, ``s_t`` +1 if higher
  is better and -1 otherwise, ``(e, d_min)`` the reference (same encoder, all decoders narrowest): the gain that the
  decoder allocation bought each task;
- per budget: ``C_rho(b)`` = mean over the grid's preferences of Spearman's rho between the vectors ``r`` and
  ``g(r, b)`` (over the T tasks, average ranks for ties); ``C_tau(b)`` the same with Kendall's tau-b;
- preferences with all-equal weights (uniform) carry no order and are left out; where the gains are all equal (the
  search gave every decoder the same width, or the metrics did not move) the correlation is undefined and counts
  as 0: no control was shown; a grid point whose reference metric is 0 or not finite is left out;
- reported per budget and as the mean over budgets (``controllability``).

What is known of the paper's metric (Aich et al., ICCV 2023): only its abstract could be read (no full text, no
code), and it says only that "our method shows a higher controllability by ~33.5% in the NYUD-v2 dataset over
prior methods"; how it defines controllability is unknown to us. What is inferred, not verified (the project's
reference notes, ``shared/reference/vision_methods.md`` §2.4, tagged as inference): that it follows the earlier
DYMU (Raychaudhuri et al., CVPR 2022), read as a rank correlation between the task-preference vector and the
achieved task performance over sampled preferences, averaged (possibly per budget). The definition above is
therefore our own, chosen to be unambiguous, and our numbers are not comparable with the paper's ~33.5 % claim.
Where ours would differ even if that inference is right: each task's metric is normalised by the same encoder's
all-narrowest-decoder configuration (so an encoder change does not count as control), and the mean is per budget
over a fixed grid instead of sampled preferences.

Other summaries (leaderboard columns), with Δm% the suite's convention against the ``single`` runs of the same
protocol (dense tasks: every metric of every task, signed):

- ``Δm% full``: the full-width configuration (budget 100 %, uniform preference) after recalibration;
- ``mean Δm% grid``: the mean over every grid point;
- ``AUC Δm%-FLOPs``: the area under the curve of (mean Δm% over the budget's preferences) against the budget
  fraction, by the trapezoid rule over 25-100 %, divided by the width of that range (0.75): a budget-averaged Δm%;
- ``violations``: the share of grid points whose configuration's FLOPs exceed the budget (0 by construction of the
  search; a non-zero value flags a bug).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _gains(section: dict[str, Any], point: dict[str, Any], split: str) -> np.ndarray | None:
    rows = section["configs"]
    chosen = rows[point["config"]]
    ref = rows[section["references"][f"{chosen['encoder']:g}"]]
    g = []
    for t in section["tasks"]:
        m = section["primary_metrics"][t]
        v, v0 = chosen["metrics"][split][t].get(m), ref["metrics"][split][t].get(m)
        if v is None or v0 is None or not (math.isfinite(v) and math.isfinite(v0)) or v0 == 0:
            return None
        sign = 1.0 if section["directions"][t] == "max" else -1.0
        g.append(sign * (v - v0) / abs(v0))
    return np.asarray(g, dtype=np.float64)


def _rank_corr(r: np.ndarray, g: np.ndarray) -> tuple[float, float]:
    from scipy import stats

    if np.ptp(g) == 0:
        return 0.0, 0.0
    rho = stats.spearmanr(r, g).statistic
    tau = stats.kendalltau(r, g).statistic
    return float(rho), float(tau)


def controllability(section: dict[str, Any], split: str = "test") -> dict[str, Any]:
    """Controllability per budget and averaged (see the module docstring), from a stored grid section."""
    per_budget: dict[str, dict[str, Any]] = {}
    for b in section["budgets"]:
        rhos, taus = [], []
        for p in section["grid"]:
            if p["budget"] != b:
                continue
            r = np.asarray(p["preference"], dtype=np.float64)
            if np.ptp(r) == 0:
                continue
            g = _gains(section, p, split)
            if g is None:
                continue
            rho, tau = _rank_corr(r, g)
            rhos.append(rho), taus.append(tau)
        per_budget[f"{b:g}"] = {"spearman": float(np.mean(rhos)) if rhos else None,
                                "kendall": float(np.mean(taus)) if taus else None, "n": len(rhos)}
    vals = [v["spearman"] for v in per_budget.values() if v["spearman"] is not None]
    kvals = [v["kendall"] for v in per_budget.values() if v["kendall"] is not None]
    return {"per_budget": per_budget, "spearman": float(np.mean(vals)) if vals else None,
            "kendall": float(np.mean(kvals)) if kvals else None, "split": split}


# ------------------------------------------------------------------------------------------- the leaderboard
def _section(rec: Any) -> dict[str, Any] | None:
    return (rec.arch_info or {}).get("controllable")


def _fixed(rec: Any) -> dict[str, Any] | None:
    s = (rec.arch_info or {}).get("slimmable") or {}
    return s if s.get("fixed_config") else None


def _delta(table: Any, metrics: dict[str, dict[str, float]]) -> float | None:
    """Δm% of one set of test metrics against the table's single-task baseline, the table's convention."""
    from mtlbench.results import stats
    from mtlbench.results.leaderboard import BASELINE_ARCH, _reference

    base = _reference(table.methods, table.ids, table.at_default, BASELINE_ARCH)
    if base is None:
        return None
    flat = "every metric" in table.delta_m_note or "all metrics" in table.delta_m_note or \
        "all task metrics" in table.delta_m_note
    cols = [c for c in table.columns if table.directions.get(c[1])]
    if not flat:
        seen, prim = set(), []
        for t, m in cols:
            if t not in seen:
                seen.add(t), prim.append((t, m))
        cols = prim
    ms = {f"{t}/{m}": (metrics.get(t) or {}).get(m, math.nan) for t, m in cols}
    bs = {f"{t}/{m}": table.stats[base].get((t, m), {}).get("mean", math.nan) for t, m in cols}
    res = stats.delta_m(ms, bs, {f"{t}/{m}": table.directions[m] == "min" for t, m in cols})
    return res.value if res.value is not None and math.isfinite(res.value) else None


def _full_index(section: dict[str, Any]) -> int | None:
    top = max(section["widths"])
    for i, c in enumerate(section["configs"]):
        if c["encoder"] == top and all(v == top for v in c["decoders"].values()):
            return i
    return None


def _auc(budgets: list[float], values: list[float]) -> float | None:
    if len(budgets) < 2 or any(v is None for v in values):
        return None
    b, v = np.asarray(budgets, dtype=float), np.asarray(values, dtype=float)
    return float(np.trapezoid(v, b) / (b[-1] - b[0])) if hasattr(np, "trapezoid") else \
        float(np.trapz(v, b) / (b[-1] - b[0]))


def summarise_run(table: Any, section: dict[str, Any]) -> dict[str, Any]:
    """The leaderboard's numbers of one controllable run (see the module docstring)."""
    ctl = controllability(section, "test")
    deltas = [_delta(table, section["configs"][p["config"]]["metrics"]["test"]) for p in section["grid"]]
    by_budget = {}
    for b in section["budgets"]:
        vals = [d for d, p in zip(deltas, section["grid"]) if p["budget"] == b and d is not None]
        by_budget[b] = float(np.mean(vals)) if vals else None
    full = _full_index(section)
    ok = [d for d in deltas if d is not None]
    return {"spearman": ctl["spearman"], "kendall": ctl["kendall"],
            "per_budget": {k: v["spearman"] for k, v in ctl["per_budget"].items()},
            "per_budget_kendall": {k: v["kendall"] for k, v in ctl["per_budget"].items()},
            "delta_full": None if full is None else _delta(table, section["configs"][full]["metrics"]["test"]),
            "delta_grid": float(np.mean(ok)) if ok else None,
            "auc": _auc(list(section["budgets"]), [by_budget[b] for b in section["budgets"]]),
            "violations": float(np.mean([not p["within_budget"] for p in section["grid"]])),
            "search_ms": section.get("search_ms_per_request")}


@dataclass
class ControllableTable:
    """The controllable models of one leaderboard table (protocol), the static ones, and their comparison."""

    title: str
    methods: dict[str, list[dict[str, Any]]]          # label -> one summary per seed
    sections: dict[str, list[dict[str, Any]]]         # label -> stored grid sections per seed
    static: dict[str, list[tuple[dict[str, Any], float | None, int]]]  # label -> (fixed config, Δm%, flops) per seed
    table: Any = field(repr=False, default=None)


def build(tables: list[Any], records: list[Any]) -> list[ControllableTable]:
    """One :class:`ControllableTable` per leaderboard table that holds controllable runs."""
    from mtlbench.results.leaderboard import table_records

    out = []
    for t in tables:
        recs = table_records(t, records)
        label = {m: l for l, m in t.ids.items()}
        methods: dict[str, list] = {}
        sections: dict[str, list] = {}
        static: dict[str, list] = {}
        for r in sorted(recs, key=lambda r: (r.spec["seed"], r.run_id)):
            name = label.get(r.method)
            if name is None:
                continue
            sec = _section(r)
            if sec:
                methods.setdefault(name, []).append(summarise_run(t, sec))
                sections.setdefault(name, []).append(sec)
            elif _fixed(r):
                fx = _fixed(r)
                static.setdefault(name, []).append((fx["fixed_config"], _delta(t, r.metrics.get("test", {})),
                                                    fx["fixed_flops"]))
        if methods:
            out.append(ControllableTable(t.title, methods, sections, static, t))
    return out


def _ms(vals: list[float | None], digits: int = 3, signed: bool = False) -> str:
    v = [x for x in vals if x is not None]
    if not v:
        return "n/a"
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return f.format(np.mean(v)) + ("" if len(v) < 2 else " ± " + f"{{:.{digits}f}}".format(np.std(v, ddof=1)))


def _config_text(c: dict[str, Any]) -> str:
    return f"e {c['encoder']:g} / d " + ",".join(f"{v:g}" for v in c["decoders"].values())


def equal_flops(ct: ControllableTable) -> list[dict[str, Any]]:
    """Per static model: its configuration and Δm%, and each controllable method's Δm% at the same configuration
    (the grid point of the uniform preference at the static model's budget, which the same search gives)."""
    rows = []
    for name, runs in sorted(ct.static.items(), key=lambda kv: kv[1][0][2]):
        cfg, flops = runs[0][0], runs[0][2]
        row = {"static": name, "config": cfg, "flops": flops, "static_delta": [d for _, d, _ in runs], "at": {}}
        for m, secs in ct.sections.items():
            vals = []
            for sec in secs:
                idx = next((i for i, c in enumerate(sec["configs"]) if c["encoder"] == cfg["encoder"]
                            and c["decoders"] == cfg["decoders"]), None)
                vals.append(None if idx is None else _delta(ct.table, sec["configs"][idx]["metrics"]["test"]))
            row["at"][m] = vals
        rows.append(row)
    return rows


INTRO = ("One trained network, any (compute budget, task preference) at inference (`slimmable`, Aich et al. ICCV "
         "2023). Grid per run: budgets 25/50/75/100 % of the full model's analytical FLOPs x preferences (simplex "
         "lattice of step 1/4 for T <= 3, plus uniform; T > 3: one-hot-dominant 0.7 + uniform), test split, each "
         "configuration after BN recalibration. Controllability: mean over preferences of Spearman's rho (Kendall's "
         "tau-b) between the preference and each task's normalised gain over the same encoder with all-narrowest "
         "decoders, per budget (cells ρ / τ), then averaged over budgets (definition: "
         "`mtlbench/results/controllable.py`); at 100 % every preference gets the full model, so no control is "
         "possible there. Δm% as the main table (same "
         "single-task baseline); AUC: area under mean-Δm% vs budget (25-100 %) / 0.75; violations: share of grid "
         "points over budget. Mean ± std over seeds.")
STATIC_NOTE = ("Dedicated (static) models vs the controllable ones at the same configuration (the search's choice "
               "for the uniform preference at each budget): Δm%, mean ± std over seeds.")


def _tables(ct: ControllableTable) -> list[tuple[list[str], list[list[str]]]]:
    """(header, rows) of the section's two tables for one protocol (the second only with static models)."""
    budgets = sorted({b for runs in ct.methods.values() for s in runs for b in s["per_budget"]}, key=float)
    head = (["method", "n", "controllability ρ ↑", "τ ↑"] + [f"ρ / τ @{float(b) * 100:g}%" for b in budgets]
            + ["Δm% full ↑", "mean Δm% grid ↑", "AUC Δm%-FLOPs ↑", "violations", "search ms"])
    rows = []
    for m, runs in sorted(ct.methods.items()):
        cells = [m, str(len(runs)), _ms([s["spearman"] for s in runs]), _ms([s["kendall"] for s in runs])]
        cells += [_ms([s["per_budget"].get(b) for s in runs]) + " / "
                  + _ms([s.get("per_budget_kendall", {}).get(b) for s in runs]) for b in budgets]
        cells += [_ms([s["delta_full"] for s in runs], 2, True), _ms([s["delta_grid"] for s in runs], 2, True),
                  _ms([s["auc"] for s in runs], 2, True), _ms([s["violations"] for s in runs], 3),
                  _ms([s["search_ms"] for s in runs], 2)]
        rows.append(cells)
    out = [(head, rows)]
    eq = equal_flops(ct)
    if eq:
        names = sorted(ct.sections)
        head2 = ["static model", "configuration", "FLOPs", "static Δm%"] + [f"{n} Δm%" for n in names]
        rows2 = [[r["static"], _config_text(r["config"]), f"{r['flops']:,}", _ms(r["static_delta"], 2, True)]
                 + [_ms(r["at"][n], 2, True) for n in names] for r in eq]
        out.append((head2, rows2))
    return out


def markdown(cts: list[ControllableTable], figures: dict[str, list[str]] | None = None) -> str:
    """The controllable-models section of leaderboard.md ("" when no table has controllable runs)."""
    if not cts:
        return ""
    from mtlbench.results.report import md_escape

    out = ["## Controllable models", "", INTRO, ""]
    for ct in cts:
        out += [f"### {md_escape(ct.title)}", ""]
        for k, (head, rows) in enumerate(_tables(ct)):
            if k:
                out += ["", STATIC_NOTE, ""]
            out.append("| " + " | ".join(md_escape(h) for h in head) + " |")
            out.append("|" + "|".join(["---"] * (1 + k) + ["--:"] * (len(head) - 1 - k)) + "|")
            out += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in rows]
        for f in (figures or {}).get(ct.title, []):
            out += ["", f"![{f}]({f})"]
        out.append("")
    return "\n".join(out)


def html(cts: list[ControllableTable], figures: dict[str, list[str]], fig_dir: Any) -> str:
    """The same section for leaderboard.html (figures embedded as the page's others are)."""
    if not cts:
        return ""
    import html as h
    from pathlib import Path

    from mtlbench.results.report import _img

    parts = ["<h2>Controllable models</h2>", f'<p class="note">{h.escape(INTRO.replace("`", ""))}</p>']
    for ct in cts:
        parts.append(f"<h3>{h.escape(ct.title)}</h3>")
        for k, (head, rows) in enumerate(_tables(ct)):
            if k:
                parts.append(f'<p class="note">{h.escape(STATIC_NOTE)}</p>')
            parts.append('<table class="lb"><thead><tr>' + "".join(f"<th>{h.escape(x)}</th>" for x in head)
                         + "</tr></thead><tbody>")
            parts += ["<tr>" + "".join(f'<td data-v="{h.escape(c)}">{h.escape(c)}</td>' for c in row) + "</tr>"
                      for row in rows]
            parts.append("</tbody></table>")
        parts += [_img(Path(fig_dir) / Path(f).name) for f in figures.get(ct.title, [])]
    return "\n".join(parts) + "\n"


def latex(cts: list[ControllableTable]) -> str:
    """The same tables for leaderboard.tex, one ``table`` environment each ("" when no table has controllable
    runs)."""
    if not cts:
        return ""
    from mtlbench.results.report import _tex

    out = []
    for ct in cts:
        for k, (head, rows) in enumerate(_tables(ct)):
            note = STATIC_NOTE if k else INTRO
            what = "dedicated (static) models" if k else "controllable models"
            out += ["\\begin{table}[t]", "\\centering", "\\small",
                    f"\\caption{{{_tex(ct.title)}: {what}. {_tex(note)}}}",
                    f"\\begin{{tabular}}{{{'l' * (1 + k) + 'r' * (len(head) - 1 - k)}}}", "\\toprule",
                    " & ".join(_tex(h) for h in head) + " \\\\", "\\midrule"]
            out += [" & ".join(_tex(c) for c in row) + " \\\\" for row in rows]
            out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(out)


def as_dict(cts: list[ControllableTable]) -> list[dict[str, Any]]:
    """The section's numbers for leaderboard.json."""
    return [{"title": ct.title, "methods": {m: runs for m, runs in sorted(ct.methods.items())},
             "equal_flops": equal_flops(ct)} for ct in cts]


# ------------------------------------------------------------------------------------------------ figures
def _mean_metric(secs: list[dict[str, Any]], cfg_of: Any, task: str, metric: str) -> float:
    vals = [sec["configs"][cfg_of(sec)]["metrics"]["test"][task].get(metric) for sec in secs]
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else math.nan


def plot_fan(ct: ControllableTable, method: str, path: Any) -> Any:
    """Per task, its primary metric vs FLOPs, one line per preference coloured by the task's weight (mean over
    seeds); grey verticals: the static models' FLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtlbench.results.plots import _fig_save

    secs = ct.sections[method]
    s0 = secs[0]
    tasks = s0["tasks"]
    prefs = [tuple(p) for p in s0["preferences"]]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for k, t in enumerate(tasks):
        ax = axes[0][k]
        m = s0["primary_metrics"][t]
        for j, r in enumerate(prefs):
            pts = [p for p in s0["grid"] if tuple(p["preference"]) == r]
            xs = [p["flops"] / s0["full_flops"] * 100 for p in pts]
            ys = [_mean_metric(secs, lambda sec, p=p: next(q["config"] for q in sec["grid"] if q["budget"] ==
                                                           p["budget"] and q["preference"] == p["preference"]), t, m)
                  for p in pts]
            ax.plot(xs, ys, "-o", ms=3, lw=1, color=cmap(r[k]), alpha=0.85)
        for name, runs in sorted(ct.static.items()):
            ax.axvline(runs[0][2] / s0["full_flops"] * 100, color="0.85", lw=0.8, zorder=0)
        ax.set_title(f"{t} {m} {'↑' if s0['directions'][t] == 'max' else '↓'}")
        ax.set_xlabel("FLOPs, % of full")
    sm = plt.cm.ScalarMappable(cmap=cmap)
    fig.colorbar(sm, ax=axes[0].tolist(), label="preference weight of the panel's task")
    fig.suptitle(f"{method}: metric vs FLOPs, one line per preference (mean over {len(secs)} seed(s))", fontsize=9)
    return _fig_save(fig, path)


def plot_pareto(ct: ControllableTable, path: Any) -> Any:
    """Δm% vs FLOPs of every evaluated configuration (mean over seeds) per controllable method, its Pareto front,
    and the static models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtlbench.results.plots import _fig_save

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (m, secs) in enumerate(sorted(ct.sections.items())):
        s0 = secs[0]
        pts = []
        for c in s0["configs"]:
            key = (c["encoder"], tuple(c["decoders"].values()))
            ds = []
            for sec in secs:
                idx = next((j for j, d in enumerate(sec["configs"]) if (d["encoder"], tuple(d["decoders"].values()))
                            == key), None)
                ds.append(None if idx is None else _delta(ct.table, sec["configs"][idx]["metrics"]["test"]))
            ds = [d for d in ds if d is not None]
            if ds:
                pts.append((c["flops"] / s0["full_flops"] * 100, float(np.mean(ds))))
        if not pts:
            continue
        color = f"C{i}"
        xs, ys = zip(*pts)
        ax.scatter(xs, ys, s=10, color=color, alpha=0.5)
        front, best = [], -math.inf
        for x, y in sorted(pts):
            if y > best:
                front.append((x, y))
                best = y
        fx, fy = zip(*front)
        ax.step(fx, fy, where="post", color=color, label=f"{m} (front)")
    for name, runs in sorted(ct.static.items()):
        ds = [d for _, d, _ in runs if d is not None]
        sec = next(iter(ct.sections.values()))[0]
        if ds:
            ax.errorbar([runs[0][2] / sec["full_flops"] * 100], [np.mean(ds)],
                        yerr=[np.std(ds, ddof=1)] if len(ds) > 1 else None, fmt="ks", ms=5)
    ax.plot([], [], "ks", label="static models (mean ± std)")
    ax.set_xlabel("FLOPs, % of the full model")
    ax.set_ylabel("Δm% vs single-task ↑")
    ax.legend(fontsize=7)
    ax.set_title(ct.title, fontsize=8)
    return _fig_save(fig, path)
