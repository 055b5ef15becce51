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

The paper (Aich et al., ICCV 2023) reports controllability following DYMU (Raychaudhuri et al., CVPR 2022) as a
rank correlation between task preference and task performance over sampled preferences; its exact formula (which
performance normalisation, per budget or pooled) could not be read (only the abstract was retrievable), so our
numbers are not comparable with its ~33.5 % claim. Differences we know of: ours normalises each task's metric by the
same encoder's all-narrowest-decoder configuration (so an encoder change does not count as control) and averages
per budget on a fixed grid instead of sampled preferences.

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
