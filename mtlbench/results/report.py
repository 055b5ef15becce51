"""Render the leaderboard: Markdown, CSV (long, canonical), LaTeX, JSON, a self-contained HTML page, and plots.

Everything is a deterministic function of the stored records: the same store gives the same bytes (sorted
rows, fixed number formats, no timestamps, PNGs without software/date metadata).
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mtlbench.results.leaderboard import (ARROW, INTERNAL_COLUMNS, Store, Table, build_tables, load_store,
                                          long_frame, table_records)
from mtlbench.results.options import DEFAULTS, StatOptions
from mtlbench.results.plots import (critical_difference_diagram, plot_bars, plot_cost, plot_curves,
                                    plot_expert_usage, plot_tradeoff)
from mtlbench.results.record import RunRecord

#: A figure's file name stays well under every file system's 255-byte limit, whatever the task names.
SLUG_MAX = 60
#: Markdown, LaTeX and HTML tables show per-task metric columns up to this many; beyond it only the primary
#: metrics, and beyond it again none (the CSV and JSON always hold every column).
TABLE_COLUMNS_MAX = 16


def slug(table: Table) -> str:
    """The file-name stem of a table's figures: dataset and task names while short, else dataset and task count;
    always the protocol's hash, so two tables never share a name."""
    p = table.protocol
    base = f"{p['dataset']}-{'-'.join(p['tasks'])}"
    if len(base) > SLUG_MAX:
        base = f"{p['dataset'][:SLUG_MAX - 12]}-{len(p['tasks'])}tasks"
    h = _short_hash(p)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{base}-{h}")


def shown_columns(table: Table) -> tuple[list[tuple[str, str]], str]:
    """The metric columns a rendered table shows, and a note when some are left to the CSV."""
    cols = table.columns
    if len(cols) <= TABLE_COLUMNS_MAX:
        return cols, ""
    tasks = list(dict.fromkeys(t for t, _ in cols))
    prim = [(t, next(m for tt, m in cols if tt == t)) for t in tasks]
    if len(prim) <= TABLE_COLUMNS_MAX:
        return prim, (f"{len(cols)} task metrics: only each task's primary metric is shown here; every metric is "
                      "in leaderboard.csv and leaderboard.json")
    return [], (f"{len(tasks)} tasks ({len(cols)} task metrics): per-task columns are left out here (more than "
                f"{TABLE_COLUMNS_MAX}); every one is in leaderboard.csv and leaderboard.json")


def md_escape(text: str) -> str:
    """A method or task name safe inside a Markdown table cell: no pipes, emphasis, code, links or HTML."""
    out = re.sub(r"([\\|*`\[\]#$~])", r"\\\1", html.escape(str(text), quote=False))
    return re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", out)   # intraword _ is literal already


def _short_hash(obj: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


def _num(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _cell(table: Table, method: str, col: tuple[str, str]) -> tuple[str, float]:
    s = table.stats[method].get(col)
    if not s:
        return "—", float("nan")
    std = "" if not math.isfinite(s["std"]) else f" ± {s['std']:.4f}"
    return f"{s['mean']:.4f}{std}", s["mean"]


def _best_two(table: Table, col: tuple[str, str]) -> tuple[str | None, str | None]:
    if table.directions.get(col[1]) not in ("max", "min"):
        return None, None   # a metric without a direction is never ranked
    vals = [(table.stats[m][col]["mean"], m) for m in table.methods
            if col in table.stats[m] and math.isfinite(table.stats[m][col]["mean"])]
    reverse = table.directions[col[1]] == "max"
    vals.sort(key=lambda x: (-x[0] if reverse else x[0], x[1]))
    return (vals[0][1] if vals else None, vals[1][1] if len(vals) > 1 else None)


def protocol_text(table: Table) -> str:
    p = table.protocol
    seeds = sorted({s for v in table.seeds.values() for s in v})
    opts = ", ".join(f"{k}={v}" for k, v in sorted(p["dataset_options"].items())) or "defaults"
    return (f"Protocol: dataset `{p['dataset']}` version {p['dataset_version']} ({opts}); its fixed train/val/test "
            f"splits; metrics on **test** at the epoch selected on **validation** ({p['selection']}); up to "
            f"{p['epochs']} epochs, early-stopping patience {p['patience']}, batch {p['batch_size']}, lr {p['lr']}, "
            f"weight decay {p['weight_decay']}, embedding {p['embed_dim']}"
            + (f", {p['threads']} threads per run" if "threads" in p else "")  # only where not the v1 value, 1
            + f"; seeds {_seed_text(seeds)}; "
            f"mean ± std over seeds (n = runs)." + (MERGE_NOTE if any("merge:" in m for m in table.methods) else ""))


MERGE_NOTE = (" Merge rows (`merge:NAME`) combine one expert per task fine-tuned with the settings above (same total "
              "fine-tuning budget as joint training); in brackets the data each merger touched (none, labelled_val, "
              "unlabelled adaptation inputs, test_inputs) and whether it needs the task id at inference.")



def environment_text(runs: list[RunRecord]) -> str:
    """Where the numbers came from: software versions, device, threads and code versions, from the records."""
    env = [r.environment or {} for r in runs]

    def values(key: str) -> str:
        found = sorted({str(e.get(key)) for e in env if e.get(key) is not None})
        return ", ".join(found) or "not recorded"

    shas = [str(e.get("git_sha") or "") for e in env]
    commits = sorted({s.removesuffix("-dirty")[:10] for s in shas if s})
    dirty = sum(s.endswith("-dirty") for s in shas)
    code = (f"mtlbench commit(s) {', '.join(commits)}" if commits else "mtlbench commit not recorded") + (
        f" ({dirty} run(s) with uncommitted changes)" if dirty else "")
    return (f"Environment (from the {len(runs)} records): torch {values('torch')}; python {values('python')}; "
            f"device {values('device')}; {values('threads')} thread(s) per run; {code}.")


def _seed_text(seeds: list[int]) -> str:
    if seeds and seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{seeds[0]}–{seeds[-1]}"
    return ", ".join(map(str, seeds))


def _significant(table: Table, method: str, task: str) -> bool:
    """† : significantly *worse* than the top row on the task's primary metric (corrected paired t-test)."""
    s = table.significance.get(method, {}).get(task)
    p = s.get("t_p_adjusted") if s else None
    return (p is not None and math.isfinite(p) and p < table.options.alpha
            and s.get("mean_diff") is not None and math.isfinite(s["mean_diff"]) and s["mean_diff"] < 0)


def _primary(table: Table, col: tuple[str, str]) -> bool:
    return col == next(c for c in table.columns if c[0] == col[0])


# ------------------------------------------------------------------------------------ reviewer statistics

def robust_note(table: Table, name: Any = lambda m: f"`{m}`") -> str:
    """What the reviewer-statistics section shows, with every setting used (the same text in md, html and tex;
    ``name`` formats a method name for the output)."""
    o = table.options
    prim = {c for c in table.columns if _primary(table, c)}
    metrics = ("each task's primary metric" if set(table.delta_columns) <= prim else
               f"the {len(table.delta_columns)} task metrics of Δm%")
    base = table.baseline or "the baseline"
    boot = (f"{o.confidence:.0%} stratified bootstrap percentile interval ({o.bootstrap_resamples} resamples, the "
            f"runs of each metric resampled on their own, seed {o.stat_seed})")
    iqm = (f"IQM Δ% = interquartile mean (Agarwal et al. 2021) of every run's signed relative change in % against "
           f"the mean of {name(table.reference)}, over runs × metrics ({metrics}, as Δm%), with a {boot}"
           if table.reference else "IQM Δ% n/a (no `single` runs: no Δm% reference)")
    return (f"{iqm}. P(> {name(base)}) = probability of improvement (Agarwal et al. 2021): the chance that a random run "
            f"of the method beats a random run of {name(base)} on a metric (ties count 1/2), averaged over the same "
            f"metrics, same interval. Bayes = Bayesian signed-rank test (Benavoli et al. 2017; Dirichlet process "
            f"prior of weight {o.bayes_prior:g} at 0, {o.bayes_samples} posterior samples, seed {o.stat_seed}) on "
            f"the per-seed Δm% of the method against the other method's run with the same seed, with a region of "
            f"practical equivalence (ROPE) of ±{o.rope:g} Δm% points: the posterior probability that the method is "
            f"practically better / equivalent / worse (the share of posterior samples in which that region is the "
            f"most probable; above 0.95 is a clear decision). These estimate and decide instead of rejecting: no "
            f"multiple-comparison correction applies, and with n seeds the prior pseudo-observation weighs "
            f"{o.bayes_prior:g}/(n+{o.bayes_prior:g}) ({o.bayes_prior / (5 + o.bayes_prior):.0%} with 5 seeds, "
            f"{o.bayes_prior / (3 + o.bayes_prior):.0%} with 3); it is not shown below {o.bayes_min_pairs} shared seeds")


def _interval(r: dict[str, Any] | None, signed: bool = True, digits: int = 2) -> str:
    if not r or r.get("estimate") is None or not math.isfinite(r["estimate"]):
        return "—"
    f = (lambda v: f"{v:+.{digits}f}") if signed else (lambda v: f"{v:.{digits}f}")
    lo, hi = r["ci"]
    return f"{f(r['estimate'])} [{f(lo)}, {f(hi)}]"


def _bayes(r: dict[str, Any] | None) -> str:
    if not r:
        return "—"
    return f"{r['better']:.2f} / {r['equivalent']:.2f} / {r['worse']:.2f}"


def robust_rows(table: Table) -> list[list[str]]:
    """One row per method: method, n, IQM Δ%, P(improvement) over the baseline, Bayes vs it and vs the top row."""
    rows = []
    for m in table.methods:
        r = table.robust.get(m, {})
        n = max((v["n"] for v in table.stats[m].values()), default=0)
        rows.append([m, str(n), _interval(r.get("iqm")), _interval(r.get("p_improvement"), signed=False),
                     _bayes(r.get("bayes_vs_baseline")), _bayes(r.get("bayes_vs_top"))])
    return rows


def robust_header(table: Table, name: Any = str) -> list[str]:
    base = name(table.baseline or "baseline")
    return ["method", "n", "IQM Δ% ↑ [95% CI]", f"P(> {base}) ↑ [95% CI]",
            f"Bayes vs {base}: better / equiv. / worse", f"Bayes vs top row ({name(table.methods[0])}): better / "
            "equiv. / worse"]


def _robust_md(table: Table) -> list[str]:
    title = "### Robust aggregates and practical significance"
    if not table.robust:
        return [title, "", md_escape("; ".join(_robust_notes(table))).replace("\\_", "_") + ".", ""] \
            if _robust_notes(table) else []
    head = robust_header(table, md_escape)
    lines = [title, "",
             robust_note(table, lambda m: f"`{str(m).replace('`', '')}`") + ".", "",
             "| " + " | ".join(head) + " |", "|---|--:|--:|--:|--:|--:|"]
    for row in robust_rows(table):
        lines.append("| " + " | ".join([md_escape(row[0])] + row[1:]) + " |")
    notes = _robust_notes(table)
    if notes:
        lines += ["", "Notes: " + md_escape("; ".join(notes)).replace("\\_", "_")]
    return lines + [""]


def _robust_notes(table: Table) -> list[str]:
    """The table's own notes plus the distinct notes of its statistics (e.g. few runs), each once."""
    seen = list(table.robust_notes)
    for r in table.robust.values():
        for key in ("iqm", "p_improvement", "bayes_vs_baseline", "bayes_vs_top"):
            note = (r.get(key) or {}).get("note")
            if note and note not in seen:
                seen.append(note)
    return seen


def _cost_text(table: Table, method: str) -> str:
    c = table.cost.get(method)
    return "n/a" if c is None else f"{c:.2f}"


def cost_note(table: Table) -> str:
    if table.cost_reference is None:
        return ("Cost n/a: no `single × ew` or `shared_bottom × ew` runs with recorded training times under this "
                "protocol")
    if table.cost_kind == "compute":
        return (f"Cost = fine-tuning compute (mean over seeds, from the records; evaluation excluded) relative to "
                f"`{table.cost_reference}`, whose zoo took {table.compute_seconds[table.cost_reference]:.3g} s of "
                "training: a merge's zoo plus its own merge time, a joint run's training time, both for the same "
                "fine-tuning budget")
    return (f"Cost = training time per epoch (mean over seeds, from the records) relative to `{table.cost_reference}`"
            f" ({table.seconds_per_epoch[table.cost_reference]:.3g} s per epoch); methods are compared at equal "
            "epochs, so a cost of 3 means three times the compute for the same budget")


def markdown(tables: list[Table], store: Store, cross: dict[str, Any] | None) -> str:
    out = ["# mtlbench leaderboard", "",
           "Generated by `mtlbench leaderboard` from the stored run records alone; rerunning it on the same "
           "records reproduces this file byte for byte.", ""]
    for table in tables:
        cols, shown_note = shown_columns(table)
        out += [f"## {md_escape(table.title)}", "", protocol_text(table), "",
                environment_text(table_records(table, store.records)), "", table.delta_m_note + ". "
                "Best in **bold**, second <u>underlined</u>; ↑ higher is better, ↓ lower is better; † = "
                "significantly worse than the top row on that task's primary metric (paired t-test over seeds, "
                f"{table.options.correction_name}-corrected across this table, p < {table.options.alpha:g}). "
                f"{cost_note(table)}.", ""]
        if shown_note:
            out += [f"_{shown_note}._", ""]
        head = ["method", "n"] + [f"{md_escape(t)} {md_escape(m)} {ARROW[table.directions[m]]}" for t, m in cols] \
            + ["Δm% ↑", "mean rank ↓", "cost ↓"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---"] + ["--:"] * (len(head) - 1)) + "|")
        best = {c: _best_two(table, c) for c in cols}
        for m in table.methods:
            n = max((s["n"] for s in table.stats[m].values()), default=0)
            cells = [md_escape(m), str(n)]
            for c in cols:
                text, _ = _cell(table, m, c)
                if best[c][0] == m:
                    text = f"**{text}**"
                elif best[c][1] == m:
                    text = f"<u>{text}</u>"
                if _primary(table, c) and _significant(table, m, c[0]):
                    text += " †"
                cells.append(text)
            dm = table.delta_m.get(m)
            cells.append("n/a" if dm is None else f"{dm:+.2f}")
            cells.append(_num(table.mean_rank.get(m), 2))
            cells.append(_cost_text(table, m))
            out.append("| " + " | ".join(cells) + " |")
        if table.notes:
            out += ["", "Notes: " + md_escape("; ".join(table.notes)).replace("\\_", "_")]
        out += [""] + _robust_md(table)
        out += [_significance_md(table, compact=not cols or len(cols) < len(table.columns)), ""]
    if cross:
        out += ["## Across datasets", "", cross["text"], ""]
    if store.skipped or store.failed:
        out += ["## Not included", ""]
        for line in store.skipped:
            out.append(f"- {md_escape(line)}")
        if store.failed:
            out.append(f"- {len(store.failed)} failed run(s): " + ", ".join(
                f"{r.run_id} ({md_escape((r.error or {}).get('reason', 'unknown'))})" for r in
                sorted(store.failed, key=lambda r: r.run_id)))
        out.append("")
    return "\n".join(out)


def significance_counts(results: dict[str, Any], alpha: float = DEFAULTS.alpha) -> tuple[int, int, int]:
    """Over a method's tasks: (significantly better, significantly worse, not significant), corrected t-test."""
    better = worse = 0
    for s in results.values():
        p = s.get("t_p_adjusted")
        if p is not None and math.isfinite(p) and p < alpha and math.isfinite(s["mean_diff"]):
            better += s["mean_diff"] > 0
            worse += s["mean_diff"] < 0
    return better, worse, len(results) - better - worse


def _significance_md(table: Table, compact: bool = False) -> str:
    if not table.significance:
        return "_Significance: a single method, nothing to compare._"
    parts = [_significance_section(table, table.significance, f"the top row ({table.methods[0]})", compact)]
    if table.baseline and table.significance_baseline:
        parts.append(_significance_section(table, table.significance_baseline, f"the baseline ({table.baseline})",
                                           compact))
    return "\n\n".join(parts)


def _significance_section(table: Table, results: dict[str, dict[str, Any]], against: str,
                          compact: bool = False) -> str:
    if compact:  # one row per method: per-task rows would be methods x tasks lines
        lines = [f"<details><summary>Significance vs {md_escape(against)}: tasks where the method is significantly "
                 f"better / worse (paired t-test, {table.options.correction_name}-corrected), or not</summary>", "",
                 "| method | tasks | better | worse | n.s. |", "|---|--:|--:|--:|--:|"]
        for m in table.methods:
            if m in results:
                b, w, ns = significance_counts(results[m], table.options.alpha)
                lines.append(f"| {md_escape(m)} | {len(results[m])} | {b} | {w} | {ns} |")
        return "\n".join(lines + ["", "</details>"])
    lines = [f"<details><summary>Significance vs {md_escape(against)}; mean diff = method minus it, signed so that "
             "positive = better</summary>", "",
             f"| method | task | n | mean diff | 95% CI | t-test p ({table.options.correction_short}) | Wilcoxon p "
             f"({table.options.correction_short}) "
             "| note |",
             "|---|---|--:|--:|---|--:|--:|---|"]
    for m in table.methods:
        for t, s in results.get(m, {}).items():
            ci = f"[{_num(s['ci'][0])}, {_num(s['ci'][1])}]"
            lines.append(f"| {md_escape(m)} | {md_escape(t)} | {s['n']} | {_num(s['mean_diff'])} | {ci} | "
                         f"{_num(s['t_p'], 3)} ({_num(s.get('t_p_adjusted'), 3)}) | {_num(s['wilcoxon_p'], 3)} "
                         f"({_num(s.get('wilcoxon_p_adjusted'), 3)}) | {s['note']} |")
    lines += ["", "</details>"]
    return "\n".join(lines)


def latex(tables: list[Table]) -> str:
    out = ["% generated by mtlbench leaderboard; requires \\usepackage{booktabs}"]
    for table in tables:
        shown, shown_note = shown_columns(table)
        cols = "l" + "r" * (len(shown) + 3)
        out += ["\\begin{table}[t]", "\\centering", "\\small",
                f"\\caption{{{_tex(table.title)}. {_tex(protocol_text(table))} {_tex(table.delta_m_note)}. "
                f"{_tex(cost_note(table))}." + (f" {_tex(shown_note)}." if shown_note else "") + "}",
                f"\\begin{{tabular}}{{{cols}}}", "\\toprule"]
        arrow = {"max": "$\\uparrow$", "min": "$\\downarrow$", None: "(unranked)"}
        head = ["Method"] + [f"{_tex(t)} {_tex(m)} {arrow[table.directions[m]]}" for t, m in shown] + \
               ["$\\Delta_m$\\% $\\uparrow$", "Rank $\\downarrow$", "Cost $\\downarrow$"]
        out.append(" & ".join(head) + " \\\\")
        out.append("\\midrule")
        best = {c: _best_two(table, c) for c in shown}
        for m in table.methods:
            cells = [_tex(m)]
            for c in shown:
                s = table.stats[m].get(c)
                if not s:
                    cells.append("--")
                    continue
                text = f"{s['mean']:.4f}" + (f" $\\pm$ {s['std']:.4f}" if math.isfinite(s["std"]) else "")
                if best[c][0] == m:
                    text = f"\\textbf{{{text}}}"
                elif best[c][1] == m:
                    text = f"\\underline{{{text}}}"
                cells.append(text)
            dm = table.delta_m.get(m)
            cells.append("n/a" if dm is None else f"{dm:+.2f}")
            cells.append(_num(table.mean_rank.get(m), 2))
            cells.append(_cost_text(table, m))
            out.append(" & ".join(cells) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
        out += _robust_tex(table)
    return "\n".join(out)


def _robust_tex(table: Table) -> list[str]:
    """The reviewer statistics of ``table`` as a second LaTeX table (its caption says what each column is)."""
    if not table.robust:
        return []
    out = ["\\begin{table}[t]", "\\centering", "\\small",
           f"\\caption{{{_tex(table.title)}: robust aggregates and practical significance. "
           f"{_tex(robust_note(table, str))}.}}", "\\begin{tabular}{lrrrrr}", "\\toprule",
           " & ".join(_tex(h) for h in robust_header(table)) + " \\\\", "\\midrule"]
    for row in robust_rows(table):
        out.append(" & ".join(_tex(c) for c in row) + " \\\\")
    return out + ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]


_TEX = {"\\": "\\textbackslash{}", "{": "\\{", "}": "\\}", "$": "\\$", "&": "\\&", "#": "\\#", "%": "\\%",
        "_": "\\_", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}", "×": "$\\times$", "Δ": "$\\Delta$",
        "±": "$\\pm$", "–": "--", "—": "---", "`": "", "<": "\\textless{}", ">": "\\textgreater{}",
        "↑": "$\\uparrow$", "↓": "$\\downarrow$", "½": "1/2", "ρ": "$\\rho$", "τ": "$\\tau$"}


def _tex(s: str) -> str:
    """``s`` as LaTeX text: every special character escaped (a method name cannot inject commands)."""
    return "".join(_TEX.get(ch, ch) for ch in str(s).replace("**", ""))


def as_json(tables: list[Table], store: Store, cross: dict[str, Any] | None) -> str:
    def clean(v: Any) -> Any:
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, np.generic):
            return clean(v.item())
        return v

    doc = {"tables": [{
        "title": t.title, "protocol": t.protocol, "delta_m_note": t.delta_m_note, "methods": [{
            "method": m, "seeds": t.seeds[m], "delta_m": t.delta_m.get(m), "mean_rank": t.mean_rank.get(m),
            "relative_cost": t.cost.get(m), "seconds_per_epoch": t.seconds_per_epoch.get(m),
            "compute_seconds": t.compute_seconds.get(m),
            "metrics": {f"{task}/{metric}": t.stats[m].get((task, metric)) for task, metric in t.columns},
            "significance_vs_best": t.significance.get(m, {}),
            "significance_vs_baseline": t.significance_baseline.get(m, {}),
            "robust": t.robust.get(m, {})} for m in t.methods],
        "baseline": t.baseline, "cost_reference": t.cost_reference, "cost_kind": t.cost_kind,
        "directions": t.directions, "notes": t.notes,
        "family": t.family, "delta_m_reference": t.reference, "statistics": dataclasses.asdict(t.options),
        "robust_note": robust_note(t, str), "robust_notes": _robust_notes(t)}
        for t in tables],
        "across_datasets": cross and [{k: v for k, v in f.items() if k not in ("figure_path",)}
                                      for f in cross["families"]],
        "skipped_files": store.skipped, "failed_runs": sorted(r.run_id for r in store.failed),
        "superseded_runs": sorted(d.run_id for d, _ in store.superseded)}
    return json.dumps(clean(doc), indent=1, sort_keys=True, ensure_ascii=False) + "\n"


# ----------------------------------------------------------------------------------------------- html

HTML_SCRIPT = """
document.querySelectorAll('table.lb').forEach(function (tbl) {
  tbl.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = tbl.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var asc = th.getAttribute('data-order') !== 'asc';
      tbl.querySelectorAll('th').forEach(function (h) { h.removeAttribute('data-order'); });
      th.setAttribute('data-order', asc ? 'asc' : 'desc');
      rows.sort(function (a, b) {
        var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
        var nx = parseFloat(x), ny = parseFloat(y);
        var cmp = (isNaN(nx) || isNaN(ny)) ? String(x).localeCompare(String(y)) : nx - ny;
        if (isNaN(nx) && !isNaN(ny)) cmp = 1;
        if (!isNaN(nx) && isNaN(ny)) cmp = -1;
        return asc ? cmp : -cmp;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""

HTML_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table.lb{border-collapse:collapse;font-size:13px;margin:1em 0}
table.lb th,table.lb td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:right;white-space:nowrap}
table.lb th{cursor:pointer;background:#f4f4f4;position:sticky;top:0}
table.sig{border-collapse:collapse;font-size:12px;margin:.5em 0 1em}
table.sig th,table.sig td{border-bottom:1px solid #eee;padding:2px 6px;text-align:right}
table.sig th{background:#f8f8f8}
table.lb th[data-order=asc]::after{content:' ▲'} table.lb th[data-order=desc]::after{content:' ▼'}
table.lb td:first-child,table.lb th:first-child{text-align:left}
.best{font-weight:bold}.second{text-decoration:underline}.note{color:#555;font-size:12px}
img{max-width:100%;margin:0.5em 0;border:1px solid #eee}
"""


def _img(path: Path | None) -> str:
    if path is None or not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def html_page(tables: list[Table], figures: dict[str, list[Path]], cross: dict[str, Any] | None,
              records: list[RunRecord] | None = None) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>mtlbench leaderboard</title>", f"<style>{HTML_STYLE}</style></head><body>",
             "<h1>mtlbench leaderboard</h1>",
             '<p class="note">Click a column header to sort. Generated from stored run records.</p>']
    for table in tables:
        parts += [f"<h2>{e(table.title)}</h2>", f'<p class="note">{e(protocol_text(table).replace("**", "").replace("`", ""))}</p>',
                  f'<p class="note">{e(environment_text(table_records(table, records or [])))}</p>',
                  f'<p class="note">{e(table.delta_m_note)}. Bold: best, underlined: second. '
                  f'{e(cost_note(table).replace("`", ""))}.</p>']
        shown, shown_note = shown_columns(table)
        if shown_note:
            parts.append(f'<p class="note">{e(shown_note)}.</p>')
        if table.notes:
            parts.append(f'<p class="note">Notes: {e("; ".join(table.notes))}</p>')
        parts.append('<table class="lb"><thead><tr><th>method</th><th>n</th>')
        for t, m in shown:
            parts.append(f"<th>{e(t)} {e(m)} {ARROW[table.directions[m]]}</th>")
        parts.append("<th>Δm% ↑</th><th>mean rank ↓</th><th>cost ↓</th></tr></thead><tbody>")
        best = {c: _best_two(table, c) for c in shown}
        for m in table.methods:
            n = max((s["n"] for s in table.stats[m].values()), default=0)
            row = [f'<tr><td data-v="{e(m)}">{e(m)}</td><td data-v="{n}">{n}</td>']
            for c in shown:
                text, v = _cell(table, m, c)
                cls = "best" if best[c][0] == m else "second" if best[c][1] == m else ""
                row.append(f'<td data-v="{"" if not math.isfinite(v) else repr(v)}" class="{cls}">{e(text)}</td>')
            dm = table.delta_m.get(m)
            row.append(f'<td data-v="{"" if dm is None else repr(dm)}">{"n/a" if dm is None else f"{dm:+.2f}"}</td>')
            mr = table.mean_rank.get(m)
            row.append(f'<td data-v="{repr(mr)}">{_num(mr, 2)}</td>')
            cost = table.cost.get(m)
            row.append(f'<td data-v="{"" if cost is None else repr(cost)}">{_cost_text(table, m)}</td></tr>')
            parts.append("".join(row))
        parts.append("</tbody></table>")
        parts += _robust_html(table)
        parts += _significance_html(table)
        for fig in figures.get(slug(table), []):
            parts.append(_img(fig))
    if cross:
        parts.append("<h2>Across datasets</h2>")
        for f in cross["families"]:
            parts += [f"<h3>{e(f['name'])}</h3>", f'<p class="note">{e(f["text"])}</p>', _img(f.get("figure_path"))]
    parts += [f"<script>{HTML_SCRIPT}</script>", "</body></html>", ""]
    return "\n".join(parts)


def _robust_html(table: Table) -> list[str]:
    """The reviewer statistics (IQM, probability of improvement, Bayesian signed-rank) as a sortable table."""
    if not table.robust:
        return []
    e = html.escape
    out = ["<h3>Robust aggregates and practical significance</h3>",
           f'<p class="note">{e(robust_note(table, str))}.</p>',
           '<table class="sig"><thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in robust_header(table))
           + "</tr></thead><tbody>"]
    for m, row in zip(table.methods, robust_rows(table)):
        r = table.robust.get(m, {})
        keys = [m, row[1], (r.get("iqm") or {}).get("estimate"), (r.get("p_improvement") or {}).get("estimate"),
                (r.get("bayes_vs_baseline") or {}).get("better"), (r.get("bayes_vs_top") or {}).get("better")]
        out.append("<tr>" + "".join(
            f'<td data-v="{e(k) if isinstance(k, str) else "" if k is None else repr(float(k))}">{e(text)}</td>'
            for k, text in zip(keys, row)) + "</tr>")
    out.append("</tbody></table>")
    notes = _robust_notes(table)
    if notes:
        out.append(f'<p class="note">Notes: {e("; ".join(notes))}</p>')
    return out


def _significance_html(table: Table) -> list[str]:
    """The same tests as the Markdown's significance sections, as collapsed HTML tables."""
    e = html.escape
    sections = [(table.significance, f"the top row ({table.methods[0]})")] if table.significance else []
    if table.baseline and table.significance_baseline:
        sections.append((table.significance_baseline, f"the baseline ({table.baseline})"))
    out = []
    shown, _ = shown_columns(table)
    if len(shown) < len(table.columns):  # many tasks: one row per method, as in the Markdown
        for results, against in sections:
            out += [f"<details><summary>Significance vs {e(against)}: tasks where the method is significantly "
                    f"better / worse (paired t-test, {table.options.correction_name}-corrected), or not</summary>",
                    '<table class="sig"><thead><tr><th>method</th><th>tasks</th><th>better</th><th>worse</th>'
                    "<th>n.s.</th></tr></thead><tbody>"]
            for m in table.methods:
                if m in results:
                    b, w, ns = significance_counts(results[m], table.options.alpha)
                    out.append(f"<tr><td>{e(m)}</td><td>{len(results[m])}</td><td>{b}</td><td>{w}</td><td>{ns}</td>"
                               "</tr>")
            out.append("</tbody></table></details>")
        return out
    for results, against in sections:
        out += [f"<details><summary>Significance vs {e(against)}; mean diff = method minus it, positive = better"
                "</summary>", '<table class="sig"><thead><tr><th>method</th><th>task</th><th>n</th>'
                f"<th>mean diff</th><th>95% CI</th><th>t-test p ({table.options.correction_short})</th><th>Wilcoxon p "
                f"({table.options.correction_short})</th><th>note</th>"
                "</tr></thead><tbody>"]
        for m in table.methods:
            for t, r in results.get(m, {}).items():
                out.append(f"<tr><td>{e(m)}</td><td>{e(t)}</td><td>{r['n']}</td><td>{_num(r['mean_diff'])}</td>"
                           f"<td>[{_num(r['ci'][0])}, {_num(r['ci'][1])}]</td><td>{_num(r['t_p'], 3)} "
                           f"({_num(r.get('t_p_adjusted'), 3)})</td><td>{_num(r['wilcoxon_p'], 3)} "
                           f"({_num(r.get('wilcoxon_p_adjusted'), 3)})</td><td>{e(r['note'])}</td></tr>")
        out.append("</tbody></table></details>")
    return out


# ----------------------------------------------------------------------------------------------- driver

FIGURE_KEYS = ".figure-keys.json"


class FigureCache:
    """Redraw a figure only when what it shows changed: its key hashes the plotted inputs, the drawing code and
    the matplotlib version. Regenerating a leaderboard from unchanged records then costs no matplotlib time, and
    after new runs only their tables' figures are redrawn. PNGs of tables that no longer exist are removed."""

    def __init__(self, fig_dir: Path) -> None:
        import matplotlib

        from mtlbench.results import plots, stats

        self.dir = fig_dir
        code = "".join(Path(f).read_text(encoding="utf-8") for f in (stats.__file__, plots.__file__))
        self.salt = hashlib.sha256((code + matplotlib.__version__).encode()).hexdigest()
        try:
            self.old = json.loads((fig_dir / FIGURE_KEYS).read_text())
        except (OSError, ValueError):
            self.old = {}
        self.new: dict[str, dict[str, Any]] = {}

    def figure(self, path: Path, inputs: str, draw: Any) -> Path | None:
        key = hashlib.sha256((self.salt + inputs).encode()).hexdigest()
        old = self.old.get(path.name)
        if isinstance(old, dict) and old.get("key") == key and (not old.get("drawn") or path.exists()):
            self.new[path.name] = old
            return path if old.get("drawn") else None
        drawn = draw()
        self.new[path.name] = {"key": key, "drawn": drawn is not None}
        return drawn

    def finish(self) -> None:
        for png in self.dir.glob("*.png"):
            if png.name not in self.new or not self.new[png.name]["drawn"]:
                png.unlink()
        (self.dir / FIGURE_KEYS).write_text(json.dumps(self.new, indent=1, sort_keys=True), encoding="utf-8")


FAMILY_NAMES = {"tabular": "Tabular", "image": "Image", "text": "Text"}


def across_datasets(tables: list[Table], fig_dir: Path, plots: bool = True, cache: FigureCache | None = None,
                    options: StatOptions = DEFAULTS) -> dict[str, Any] | None:
    """Rank tests over the tables of each family (the kind of data: tabular, image, text; tables of different
    families share too few methods to compare, and a method's meaning changes with the data): for each family with
    at least two tables, Friedman / Iman-Davenport, pairwise Wilcoxon and Demšar's comparison against a control
    (corrected by ``options.correction``) and the Nemenyi CD diagram, over the methods that every table of the
    family holds (matched by their label in each table); each table is one 'dataset', scored by its mean rank."""
    if len(tables) < 2:
        return None
    by_family: dict[str, list[Table]] = {}
    for t in tables:
        by_family.setdefault(t.family, []).append(t)
    order = [f for f in FAMILY_NAMES if f in by_family] + sorted(set(by_family) - set(FAMILY_NAMES))
    families = [_across_family(fam, by_family[fam], fig_dir, plots, cache, options) for fam in order]
    text = "\n\n".join(f"**{f['name']}** — {f['text']}" for f in families)
    return {"text": text, "families": families}


def _across_family(family: str, tables: list[Table], fig_dir: Path, plots: bool, cache: FigureCache | None,
                   options: StatOptions) -> dict[str, Any]:
    from mtlbench.results import stats

    name = FAMILY_NAMES.get(family, family)
    listed = "; ".join(t.title for t in tables)
    out: dict[str, Any] = {"family": family, "name": f"{name} tables", "tables": [t.title for t in tables]}
    if len(tables) < 2:
        out["text"] = f"one table ({listed}): nothing to compare across datasets."
        return out
    common = sorted(set.intersection(*[set(t.methods) for t in tables]))
    every = sorted(set.union(*[set(t.methods) for t in tables]))
    out["methods"] = common
    head = (f"{len(tables)} tables ({listed}); {len(common)} of their {len(every)} methods are in every one "
            "(matched by the label each table shows)")
    if len(common) < 2:
        out["text"] = head + ": no across-dataset comparison."
        return out
    alpha = options.alpha
    matrix = np.array([[-t.mean_rank[m] for m in common] for t in tables])  # higher = better
    fr = stats.friedman(matrix)
    cd = stats.nemenyi_cd(len(common), len(tables), alpha)
    ranks = dict(zip(common, [float(r) for r in fr.avg_ranks]))
    title = f"{name} tables: average rank over {len(tables)} tables (Nemenyi CD)"
    fig_path = fig_dir / f"critical_difference-{re.sub(r'[^A-Za-z0-9_.-]+', '_', family)}.png"

    def draw() -> Any:
        return critical_difference_diagram(ranks, cd.cd, fig_path, title=title)

    fig = None
    if plots:
        fig = cache.figure(fig_path, repr((ranks, cd.cd, title)), draw) if cache else draw()
    pw = stats.pairwise_wilcoxon_holm(matrix, common, alpha)
    pw_adjusted = stats.correct([r.pvalue for r in pw.rows], options.correction, alpha).adjusted
    pairwise = [{**dataclasses.asdict(r), "p_adjusted": float(p), "significant": bool(p < alpha)}
                for r, p in zip(pw.rows, pw_adjusted)]
    control = next((m for m in common if all(t.baseline == m for t in tables)), None) or min(
        common, key=lambda m: (ranks[m], m))
    ctl = stats.control_comparison(matrix, common, control, alpha=alpha, correction=options.correction)
    pw_floor = stats.wilcoxon_floor([len(tables)] * len(pw.rows), alpha=alpha, correction=options.correction,
                                    unit="tables")
    corr = options.correction_name
    text = (f"{head}, each table scored by its mean rank over metrics: "
            f"Friedman chi2 = {_num(fr.chi2, 3)}, p = {_num(fr.pvalue, 4)}; Iman-Davenport F = "
            f"{_num(fr.f_stat, 3)}, p = {_num(fr.f_pvalue, 4)}; Nemenyi CD = {_num(cd.cd, 3)} (alpha {alpha:g}). "
            + (fr.note[0].upper() + fr.note[1:] + ". " if fr.note else "") + "Average ranks: " + ", ".join(
                f"{m} {r:.2f}" for m, r in sorted(ranks.items(), key=lambda x: x[1])) + ". "
            + f"Against {control} (Demšar's rank z-tests, {corr}): "
            + ", ".join(f"{r.method} p = {_num(r.p_adjusted, 3)}" for r in ctl.rows) + ". "
            + " ".join(n[0].upper() + n[1:] + "." for n in (ctl.note, pw_floor.note) if n))
    out.update({"text": text, "avg_ranks": ranks, "friedman": dataclasses.asdict(fr), "cd": cd.cd,
                "pairwise": pairwise, "vs_control": dataclasses.asdict(ctl), "correction": options.correction,
                "figure": fig and f"figures/{Path(fig).name}", "figure_path": fig and Path(fig)})
    return out


def _records_of(obj: Any) -> Any:
    if isinstance(obj, pd.DataFrame):
        return obj.to_dict(orient="records")
    if isinstance(obj, list):
        return [getattr(x, "__dict__", x) for x in obj]
    return obj


def summary_lines(tables: list[Table]) -> list[str]:
    """One line per table for the terminal: its size and its top method by Δm% (or mean rank without a baseline)."""
    lines = []
    for t in tables:
        runs = sum(max((v["n"] for v in t.stats[m].values()), default=0) for m in t.methods)
        top = t.methods[0] if t.methods else None
        dm = t.delta_m.get(top) if top else None
        best = ("" if top is None else f"; top: {top} (Δm% {dm:+.2f})" if dm is not None
                else f"; top: {top} (mean rank {t.mean_rank.get(top, float('nan')):.2f}; no single-task baseline)")
        lines.append(f"{t.title}: {len(t.methods)} methods, {runs} runs{best}")
    return lines


FORMATS = ("md", "csv", "tex", "json", "html")


def write_leaderboard(results_dir: str | Path, out_dir: str | Path, flat_delta_m: bool = False,
                      formats: tuple[str, ...] = FORMATS, plots: bool | None = None,
                      tables_out: list[Table] | None = None, baseline: str | None = None,
                      store_out: list[Store] | None = None, options: StatOptions = DEFAULTS) -> dict[str, Path]:
    """Build every table from the records in ``results_dir`` and write the ``formats`` and figures to ``out_dir``
    (the built tables are appended to ``tables_out`` and the store read to ``store_out`` when given, e.g. for a
    summary on the terminal). ``plots`` defaults to drawing figures only when a format shows them (md, html).
    ``options``: the statistical settings (alpha, correction, ROPE, bootstrap; ``mtlbench.results.options``)."""
    from mtlbench.errors import MtlbenchError, unknown

    for fmt in formats:
        if fmt not in FORMATS:
            raise unknown("leaderboard format", fmt, FORMATS)
    if plots is None:
        plots = any(f in formats for f in ("md", "html"))
    out = Path(out_dir)
    try:
        (out / "figures" if plots else out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MtlbenchError(f"output directory '{out}' cannot be written: {exc.strerror or exc}") from exc
    store = load_store(results_dir)
    if store_out is not None:
        store_out.append(store)
    frame = long_frame(store.records)
    tables = build_tables(frame, flat_delta_m, baseline, store.superseded, options)
    if tables_out is not None:
        tables_out.extend(tables)
    figures: dict[str, list[Path]] = {}
    cache = FigureCache(out / "figures") if plots else None
    method_of = dict(zip(frame["run_id"], frame["method"])) if plots else {}
    for t in tables if plots else []:
        s, d = slug(t), out / "figures"
        shown = repr(t)
        curves = repr([(r.run_id, method_of.get(r.run_id), r.curves) for r in table_records(t, store.records)])
        figs = [cache.figure(d / f"{s}-bars.png", shown, lambda: plot_bars(t, d / f"{s}-bars.png")),
                cache.figure(d / f"{s}-tradeoff.png", shown, lambda: plot_tradeoff(t, d / f"{s}-tradeoff.png")),
                cache.figure(d / f"{s}-curves.png", shown + curves,
                             lambda: plot_curves(t, store.records, frame, d / f"{s}-curves.png")),
                cache.figure(d / f"{s}-cost.png", shown, lambda: plot_cost(t, d / f"{s}-cost.png")),
                cache.figure(d / f"{s}-experts.png", shown + repr([(r.run_id, r.arch_info.get("expert_usage"))
                                                                    for r in table_records(t, store.records)]),
                             lambda: plot_expert_usage(t, store.records, frame, d / f"{s}-experts.png"))]
        figures[s] = [f for f in figs if f is not None]
    cross = across_datasets(tables, out / "figures", plots, cache, options)
    ctl, ctl_figs = _controllable(tables, store, out / "figures", plots, cache)
    if cache:
        cache.finish()
    written = {}
    texts = {"md": lambda: markdown(tables, store, cross), "tex": lambda: latex(tables),
             "json": lambda: as_json(tables, store, cross), "html": lambda: html_page(tables, figures, cross, store.records),
             "csv": lambda: frame.drop(columns=INTERNAL_COLUMNS).to_csv(index=False, float_format="%.17g",
                                                                         lineterminator="\n")}
    if ctl:  # controllable models (issue 11): their section in md, html, tex and json, only where such runs exist
        from mtlbench.results import controllable

        md, js, page = texts["md"], texts["json"], texts["html"]
        texts["md"] = lambda: _insert_section(md(), controllable.markdown(ctl, ctl_figs))
        tex = texts["tex"]
        texts["tex"] = lambda: tex() + "\n" + controllable.latex(ctl)
        texts["json"] = lambda: _json_with(js(), "controllable", controllable.as_dict(ctl))
        texts["html"] = lambda: page().replace(f"<script>{HTML_SCRIPT}</script>", controllable.html(
            ctl, ctl_figs, out / "figures") + f"<script>{HTML_SCRIPT}</script>", 1)
    for fmt in formats:
        path = out / f"leaderboard.{fmt}"
        path.write_text(texts[fmt](), encoding="utf-8")
        written[fmt] = path
    return written


def _controllable(tables: list[Table], store: Store, fig_dir: Path, plots: bool, cache: Any
                  ) -> tuple[list[Any], dict[str, list[str]]]:
    """The controllable-models tables (``mtlbench.results.controllable``) and their figures, by table title."""
    from mtlbench.results import controllable

    cts = controllable.build(tables, store.records)
    figs: dict[str, list[str]] = {}
    for ct in cts if plots else []:
        stem = f"{slug(ct.table)}-controllable"
        shown = json.dumps([ct.sections, ct.static, repr(ct.table.stats), Path(controllable.__file__).read_text(
            encoding="utf-8")], sort_keys=True, default=str)
        drawn = [cache.figure(fig_dir / f"{stem}-pareto.png", shown,
                              lambda ct=ct, p=fig_dir / f"{stem}-pareto.png": controllable.plot_pareto(ct, p))]
        for i, m in enumerate(sorted(ct.sections)):
            p = fig_dir / f"{stem}-fan{i}.png"
            drawn.append(cache.figure(p, shown + m, lambda ct=ct, m=m, p=p: controllable.plot_fan(ct, m, p)))
        figs[ct.title] = [f"figures/{Path(f).name}" for f in drawn if f is not None]
    return cts, figs


def _insert_section(text: str, section: str) -> str:
    """``section`` before the "Across datasets" / "Not included" sections of the markdown, else at the end."""
    for marker in ("## Across datasets", "## Not included"):
        i = text.find("\n" + marker)
        if i >= 0:
            return text[:i + 1] + section + "\n" + text[i + 1:]
    return text + section + "\n"


def _json_with(text: str, key: str, value: Any) -> str:
    doc = json.loads(text)
    doc[key] = value
    return json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
