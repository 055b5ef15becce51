"""Statistics behind the leaderboard: paired tests, rank tests, multiple comparisons, bootstrap intervals and Δm%.

Pure functions on numbers; they know nothing of run records. Each returns a small frozen dataclass holding the
numbers and a ``note``: ``""`` when there is nothing to say, otherwise short clauses joined by ``"; "`` that explain a
degenerate or underpowered case. Degenerate input (n = 1, zero variance, every value tied, two methods for Friedman,
NaN values) never raises: the affected numbers are NaN and the note says why. NaN and infinite values are dropped
(pairwise for two-sample tests, whole rows for the Friedman test and whole seeds for Δm%) and the note says how many.
Malformed input (arrays of mismatched shape, p-values outside [0, 1], unknown option values) raises ``ValueError``.

References
----------
- Demšar, J. (2006). Statistical comparisons of classifiers over multiple data sets. JMLR 7, 1-30.
- Benavoli, A., Corani, G., Mangili, F. (2016). Should we really use post-hoc tests based on mean-ranks? JMLR 17.
- Holm, S. (1979). A simple sequentially rejective multiple test procedure. Scand. J. Statist. 6, 65-70.
- Wilcoxon, F. (1945). Individual comparisons by ranking methods. Biometrics Bulletin 1, 80-83.
- Iman, R. L., Davenport, J. M. (1980). Approximations of the critical region of the Friedman statistic.
  Commun. Statist. A 9, 571-595.
- Efron, B., Tibshirani, R. (1993). An Introduction to the Bootstrap. Chapman & Hall.
- Maninis, K.-K., Radosavovic, I., Kokkinos, I. (2019). Attentive single-tasking of multiple tasks. CVPR.
- Benjamini, Y., Hochberg, Y. (1995). Controlling the false discovery rate. J. R. Statist. Soc. B 57, 289-300.
- Benavoli, A., Corani, G., Demšar, J., Zaffalon, M. (2017). Time for a change: a tutorial for comparing multiple
  classifiers through Bayesian analysis. JMLR 18(77), 1-36 (official code: the ``baycomp`` package).
- Agarwal, R., Schwarzer, M., Castro, P. S., Courville, A., Bellemare, M. G. (2021). Deep reinforcement learning at
  the edge of the statistical precipice. NeurIPS (official code: ``rliable``).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache
from itertools import combinations
from typing import TYPE_CHECKING, Callable, Mapping, Sequence, Union

import numpy as np
from scipy import stats as sps

from mtlbench.results.options import CORRECTIONS  # torch-free: the names of the corrections, declared once

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "PairedT", "paired_t",
    "Wilcoxon", "wilcoxon",
    "Holm", "holm", "BH", "benjamini_hochberg", "correct", "WilcoxonFloor", "holm_wilcoxon_floor", "wilcoxon_floor",
    "merge_close", "tie_ranks", "ControlRow", "ControlComparison", "control_comparison", "BayesSignedRank",
    "bayesian_signed_rank", "StratifiedCI", "iqm", "iqm_ci", "probability_of_improvement",
    "probability_of_improvement_ci",
    "Friedman", "friedman",
    "NemenyiCD", "nemenyi_cd",
    "PairwiseRow", "PairwiseWilcoxonHolm", "pairwise_wilcoxon_holm",
    "BootstrapCI", "bootstrap_ci", "bootstrap_delta_m_ci",
    "DeltaM", "delta_m",
    "cd_cliques",
]

NAN = float("nan")

#: Differences within this fraction of the data's magnitude are treated as equal (ties) or as zero. It sits far
#: above float64 round-off (~1e-16), so ``0.1 + 0.2 - 0.3`` counts as a zero difference, and far below any real
#: difference between two metrics.
REL_TOL = 1e-12
#: Wilcoxon: the exact null distribution (no ties) is used up to this many non-zero differences (scipy's own limit).
WILCOXON_EXACT_MAX_N = 50
#: Wilcoxon: with tied |differences|, the exact conditional null distribution is enumerated over all 2^n sign
#: flips up to this n (2^13 = 8192 flips, well under 0.1 s; scipy's own threshold); beyond it the tie-corrected
#: normal approximation is used.
WILCOXON_PERMUTATION_MAX_N = 13
#: Below this many values a bootstrap interval is flagged: it is known to under-cover for small samples.
BOOTSTRAP_SMALL_N = 10
#: Below this many data sets the Friedman chi-square approximation is flagged as rough.
FRIEDMAN_SMALL_N = 10

Directions = Union[bool, Sequence[bool], Mapping[str, bool]]


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def _check_confidence(confidence: float, name: str = "confidence") -> None:
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {confidence!r}")


def _vector(x: object, name: str) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(x, dtype=float))
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def _complete_pairs(a: object, b: object) -> tuple[np.ndarray, np.ndarray, str]:
    """The pairs where both values are finite, and a note on how many were dropped."""
    x, y = _vector(a, "a"), _vector(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired samples must have the same length, got {x.size} and {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    dropped = int(x.size - keep.sum())
    note = f"dropped {dropped} pair(s) with a missing or non-finite value" if dropped else ""
    return x[keep], y[keep], note


def merge_close(values: object, scale: float | None = None) -> np.ndarray:
    """``values`` with every run of values closer than ``REL_TOL * scale`` to the next replaced by the run's first
    value (``scale`` defaults to the largest magnitude; NaN stays NaN). The one tolerance of this module: the
    Wilcoxon test's zero and tied differences, the Friedman ranks and the leaderboard's mean rank all use it."""
    v = np.array(values, dtype=float, copy=True).ravel()
    finite = np.isfinite(v)
    if scale is None:
        scale = float(np.max(np.abs(v[finite]), initial=0.0))
    tol = REL_TOL * scale
    if tol == 0.0 or finite.sum() < 2:
        return v
    idx = np.flatnonzero(finite)
    order = idx[np.argsort(v[idx], kind="stable")]
    sorted_v = v[order]
    starts = np.concatenate(([True], np.diff(sorted_v) > tol))
    v[order] = sorted_v[np.flatnonzero(starts)[np.cumsum(starts) - 1]]
    return v


def tie_ranks(values: object, higher_is_better: bool = True) -> np.ndarray:
    """Ranks of ``values``, 1 = best, values within the module's tolerance tied (average rank), NaN ranked last."""
    v = merge_close(values)
    key = np.where(np.isfinite(v), -v if higher_is_better else v, np.inf)
    return sps.rankdata(key, method="average")


def _snapped_differences(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a - b`` with differences within ``REL_TOL`` of the data's magnitude of zero set to 0 and of each other
    merged (``merge_close``), so round-off cannot split ties or fake non-zeros."""
    d = a - b
    scale = float(max(np.max(np.abs(a), initial=0.0), np.max(np.abs(b), initial=0.0)))
    if scale == 0.0:
        return d
    d = np.where(np.abs(d) <= REL_TOL * scale, 0.0, d)
    return np.sign(d) * merge_close(np.abs(d), scale)


# ----------------------------------------------------------------------------------------------------------------
# Two-sample paired tests
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PairedT:
    """Paired t-test of ``a - b``: mean difference, its t interval, t statistic and two-sided p-value."""

    mean_diff: float
    ci_low: float
    ci_high: float
    statistic: float
    pvalue: float
    df: int
    n: int
    confidence: float
    note: str = ""


def paired_t(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedT:
    """Paired (Student 1908) t-test of ``a`` vs ``b`` measured on the same seeds, two-sided.

    Returns the mean of ``a - b``, its t-based ``confidence`` interval, t, p and n (complete pairs). Zero variance
    of the differences (every seed moves by the same amount) leaves t, p and the interval NaN with a note, instead
    of dividing by zero. Equivalent to ``scipy.stats.ttest_rel(a, b)``.
    """
    _check_confidence(confidence)
    x, y, note = _complete_pairs(a, b)
    n = int(x.size)
    d = x - y
    mean = float(d.mean()) if n else NAN

    def degenerate(why: str) -> PairedT:
        return PairedT(mean, NAN, NAN, NAN, NAN, max(n - 1, 0), n, confidence, _join(note, why))

    if n == 0:
        return degenerate("no complete pairs")
    if n == 1:
        return degenerate("n=1: a paired t-test needs at least 2 pairs")
    snapped = _snapped_differences(x, y)
    if np.all(snapped == snapped[0]):
        if snapped[0] == 0:
            return degenerate(f"a and b are identical on all {n} pairs: the t statistic is undefined (0/0)")
        return degenerate(f"all {n} differences are identical (zero variance): the t statistic and interval are "
                          "undefined")
    res = sps.ttest_1samp(d, 0.0)
    ci = res.confidence_interval(confidence_level=confidence)
    return PairedT(mean, float(ci.low), float(ci.high), float(res.statistic), float(res.pvalue), n - 1, n,
                   confidence, note)


@dataclass(frozen=True)
class Wilcoxon:
    """Wilcoxon signed-rank test of ``a - b``.

    ``statistic`` is min(R+, R-); ``n`` counts the non-zero differences actually ranked, ``n_zeros`` the dropped
    zeros; ``method`` is ``"exact"``, ``"exact-permutation"`` (exact null distribution with tied ranks) or
    ``"asymptotic"``; ``min_pvalue`` = 2 / 2^n is the smallest two-sided p the exact test can produce with n
    differences; ``median_diff`` is the median of ``a - b`` over complete pairs (its sign gives the direction).
    """

    statistic: float
    pvalue: float
    n: int
    n_zeros: int
    method: str
    zero_method: str
    min_pvalue: float
    median_diff: float
    alpha: float
    note: str = ""

    @property
    def underpowered(self) -> bool:
        """True when even the most extreme outcome could not reach p < ``alpha`` (or there was nothing to test)."""
        return not self.min_pvalue <= self.alpha


def _min_wilcoxon_p(n: int) -> float:
    return min(1.0, 2.0 ** (1 - n)) if n >= 1 else NAN


def wilcoxon(a: Sequence[float], b: Sequence[float], alpha: float = 0.05, unit: str = "seeds") -> Wilcoxon:
    """Two-sided Wilcoxon (1945) signed-rank test of ``a`` vs ``b`` (paired), as recommended by Demšar (2006).

    Choices, made explicitly rather than left to scipy's defaults:

    - ``zero_method="wilcox"``: zero differences (identical values for a seed) are dropped before ranking, the
      original Wilcoxon convention. The test is then conditional on the non-zero differences, which keeps the exact
      null distribution valid and the attainable p-values transparent (a tie between the methods carries no
      evidence either way). The note reports how many zeros were dropped. ("pratt" would keep them in the ranking
      but then only an approximation or a permutation distribution applies; "zsplit" likewise.)
    - ``method``: ``"exact"`` when the non-zero |differences| are all distinct and n <= 50; with tied |differences|
      the exact conditional null distribution is enumerated over all 2^n sign flips for n <= 13
      (``scipy.stats.permutation_test``, as ``scipy.stats.wilcoxon(method=PermutationMethod())`` does); otherwise
      the normal approximation with tie-corrected variance (``"asymptotic"``, no continuity correction). The normal
      approximation is never used for n <= 13: with n=5 and ties it reports p = 0.04 where no exact p below 0.0625
      exists.

    Differences are quantised to ``REL_TOL`` of the data's magnitude first, so float round-off cannot split ties.
    When ``min_pvalue`` = 2 / 2^n exceeds ``alpha``, the note says that no outcome could be significant
    ("with n=5 seeds the exact Wilcoxon test cannot reach p < 0.0625"); ``unit`` names what the pairs are.
    """
    x, y, note = _complete_pairs(a, b)
    d = _snapped_differences(x, y)
    median = float(np.median(x - y)) if x.size else NAN
    nonzero = d[d != 0]
    n, n_zeros = int(nonzero.size), int(d.size - nonzero.size)
    min_p = _min_wilcoxon_p(n)
    zeros_note = f"dropped {n_zeros} zero difference(s) (zero_method='wilcox')" if n_zeros else ""

    def empty(why: str) -> Wilcoxon:
        return Wilcoxon(NAN, NAN, n, n_zeros, "", "wilcox", min_p, median, alpha, _join(note, zeros_note, why))

    if d.size == 0:
        return empty("no complete pairs")
    if n == 0:
        return empty(f"a and b are identical on all {n_zeros} pairs: no non-zero difference to test")

    ties = np.unique(np.abs(nonzero)).size < n
    approx_note = ""
    if not ties and n <= WILCOXON_EXACT_MAX_N:
        label, method = "exact", "exact"
    elif ties and n <= WILCOXON_PERMUTATION_MAX_N:
        label, method = "exact-permutation", "permutation"
    else:
        label, method = "asymptotic", "asymptotic"
        if n <= WILCOXON_EXACT_MAX_N:
            approx_note = f"tied differences with n={n}: p from the tie-corrected normal approximation"
    # (with ties, scipy's "exact" p is only an approximation; it is then used for the statistic alone)
    res = sps.wilcoxon(nonzero, zero_method="wilcox", correction=False, alternative="two-sided",
                       method="exact" if method == "permutation" else method)
    pvalue = float(res.pvalue)
    if method == "permutation":
        # The same exact conditional null distribution as scipy.stats.wilcoxon(method=PermutationMethod()): R+ over
        # all 2^n sign flips with the tied ranks held fixed, but with a vectorised statistic (~50x faster).
        ranks = sps.rankdata(np.abs(nonzero))
        pvalue = float(sps.permutation_test(
            (nonzero,), lambda s, axis=-1: np.sum((s > 0) * ranks, axis=axis), permutation_type="samples",
            vectorized=True, n_resamples=np.inf, alternative="two-sided").pvalue)
    power_note = ""
    if min_p > alpha:
        power_note = (f"with n={n} {unit} the exact Wilcoxon test cannot reach p < {min_p:.4g}, so it cannot reject "
                      f"at alpha={alpha:g}")
    return Wilcoxon(float(res.statistic), pvalue, n, n_zeros, label, "wilcox", min_p, median, alpha,
                    _join(note, zeros_note, approx_note, power_note))


# ----------------------------------------------------------------------------------------------------------------
# Multiple comparisons
# ----------------------------------------------------------------------------------------------------------------

def _adjust(pvalues: Sequence[float], rule: Callable[[np.ndarray], np.ndarray]
            ) -> tuple[np.ndarray, np.ndarray, int, str]:
    """Shared by Holm and BH: check the p-values, apply ``rule`` to the non-NaN ones sorted ascending, put the
    adjusted values back in input order (NaN passes through and does not count towards m)."""
    p = np.atleast_1d(np.asarray(pvalues, dtype=float)).ravel()
    valid = ~np.isnan(p)
    if np.any((p[valid] < 0) | (p[valid] > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p[valid][(p[valid] < 0) | (p[valid] > 1)].tolist()}")
    pv = p[valid]
    m = int(pv.size)
    order = np.argsort(pv, kind="stable")
    inner = np.empty(m)
    inner[order] = rule(pv[order])
    adjusted = np.full(p.shape, NAN)
    adjusted[valid] = inner
    n_nan = int(p.size - m)
    note = _join("no p-values" if p.size == 0 else "",
                 f"{n_nan} NaN p-value(s) passed through, not counted in m={m}" if n_nan else "")
    return p, adjusted, m, note


@dataclass(frozen=True)
class Holm:
    """Holm-adjusted p-values, in the input order; ``reject`` is ``adjusted < alpha`` (False for NaN)."""

    pvalues: tuple[float, ...]
    adjusted: tuple[float, ...]
    reject: tuple[bool, ...]
    n_tests: int
    alpha: float
    note: str = ""


def holm(pvalues: Sequence[float], alpha: float = 0.05) -> Holm:
    """Holm (1979) step-down adjustment, as statsmodels' ``multipletests(method="holm")``.

    With the m non-NaN p-values sorted ascending, p_(1) <= ... <= p_(m), the adjusted value of p_(i) is
    ``max_{j <= i} min(1, (m - j + 1) p_(j))``: monotone in the raw order, never below the raw p, capped at 1.
    NaN p-values are passed through as NaN and do not count towards m.
    """
    def step_down(sorted_p: np.ndarray) -> np.ndarray:
        m = sorted_p.size
        return np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * sorted_p))

    p, adjusted, m, note = _adjust(pvalues, step_down)
    reject = tuple(bool(v < alpha) for v in adjusted)  # NaN < alpha is False
    return Holm(tuple(map(float, p)), tuple(map(float, adjusted)), reject, m, alpha, note)


@dataclass(frozen=True)
class BH:
    """Benjamini-Hochberg adjusted p-values (false discovery rate), in the input order; ``reject`` is
    ``adjusted < alpha`` (False for NaN)."""

    pvalues: tuple[float, ...]
    adjusted: tuple[float, ...]
    reject: tuple[bool, ...]
    n_tests: int
    alpha: float
    note: str = ""


def benjamini_hochberg(pvalues: Sequence[float], alpha: float = 0.05) -> BH:
    """Benjamini & Hochberg (1995) step-up adjustment, as statsmodels' ``multipletests(method="fdr_bh")``: an
    alternative to Holm that controls the false discovery rate instead of the family-wise error rate.

    With the m non-NaN p-values sorted ascending, the adjusted value of p_(i) is ``min_{j >= i} min(1, m p_(j) / j)``.
    NaN p-values pass through as NaN and do not count towards m.
    """
    def step_up(sorted_p: np.ndarray) -> np.ndarray:
        scaled = sorted_p * sorted_p.size / np.arange(1, sorted_p.size + 1)
        return np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])

    p, adjusted, m, note = _adjust(pvalues, step_up)
    return BH(tuple(map(float, p)), tuple(map(float, adjusted)), tuple(bool(v < alpha) for v in adjusted), m,
              alpha, note)


@dataclass(frozen=True)
class WilcoxonFloor:
    """The smallest Holm-adjusted p any outcome of m exact Wilcoxon tests on at most n pairs each can give."""

    floor: float
    m: int
    n: int
    alpha: float
    note: str = ""


def _tested_pairs(n_pairs: Sequence[int], pvalues: Sequence[float] | None) -> tuple[int, int]:
    """(m, n_max): how many tests produced a p (all of them when ``pvalues`` is None) and their largest n."""
    n = [int(k) for k in n_pairs]
    if pvalues is not None:
        n = [k for k, pv in zip(n, pvalues) if pv is not None and np.isfinite(pv)]
    return len(n), max(n, default=0)


def holm_wilcoxon_floor(n_pairs: Sequence[int], pvalues: Sequence[float] | None = None, alpha: float = 0.05,
                        unit: str = "seeds", alternative: str = "") -> WilcoxonFloor:
    """Whether Holm-corrected exact Wilcoxon tests can reject at all: the smallest two-sided exact p with n
    non-zero pairs is 2 / 2^n, and Holm multiplies the smallest p by m, so no outcome goes below
    ``min(1, m * 2 / 2^n_max)``. ``pvalues`` (optional) says which tests produced a p (NaN ones do not count in m).
    The note says so when that floor is at least ``alpha`` (e.g. 5 seeds and 4 comparisons: 4 x 0.0625 = 0.25)."""
    m, n_max = _tested_pairs(n_pairs, pvalues)
    if m == 0 or n_max == 0:
        return WilcoxonFloor(NAN, m, n_max, alpha, "no Wilcoxon test")
    floor = min(1.0, m * _min_wilcoxon_p(n_max))
    note = ""
    if floor >= alpha:
        note = (f"with at most n={n_max} {unit} per comparison and m={m} comparisons, no Holm-corrected Wilcoxon p "
                f"can fall below {floor:.3g} (m x 2/2^n), so that test cannot reject at alpha={alpha:g}"
                + (f" ({alternative})" if alternative else ""))
    return WilcoxonFloor(floor, m, n_max, alpha, note)


def correct(pvalues: Sequence[float], correction: str = "holm", alpha: float = 0.05) -> Holm | BH:
    """``pvalues`` adjusted by ``correction``: ``"holm"`` (:func:`holm`) or ``"bh"`` (:func:`benjamini_hochberg`)."""
    if correction == "holm":
        return holm(pvalues, alpha)
    if correction == "bh":
        return benjamini_hochberg(pvalues, alpha)
    raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}, got {correction!r}")


def wilcoxon_floor(n_pairs: Sequence[int], pvalues: Sequence[float] | None = None, alpha: float = 0.05,
                   correction: str = "holm", unit: str = "seeds", alternative: str = "") -> WilcoxonFloor:
    """:func:`holm_wilcoxon_floor` for either correction. Under Benjamini-Hochberg the smallest adjusted p is
    ``min_j m p_(j) / j >= p_(1)``, reached when all m tests give the smallest exact p, so the floor is
    ``2 / 2^n_max`` whatever m: with 5 seeds (0.0625) BH cannot reject at 0.05 either, with 6 (0.031) it can."""
    if correction == "holm":
        return holm_wilcoxon_floor(n_pairs, pvalues, alpha, unit, alternative)
    if correction != "bh":
        raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}, got {correction!r}")
    m, n_max = _tested_pairs(n_pairs, pvalues)
    if m == 0 or n_max == 0:
        return WilcoxonFloor(NAN, m, n_max, alpha, "no Wilcoxon test")
    floor = min(1.0, _min_wilcoxon_p(n_max))
    note = ""
    if floor >= alpha:
        note = (f"with at most n={n_max} {unit} per comparison, no Benjamini-Hochberg-corrected Wilcoxon p can fall "
                f"below {floor:.3g} (2/2^n, whatever the m={m} comparisons), so that test cannot reject at "
                f"alpha={alpha:g}" + (f" ({alternative})" if alternative else ""))
    return WilcoxonFloor(floor, m, n_max, alpha, note)


# ----------------------------------------------------------------------------------------------------------------
# Rank tests over data sets
# ----------------------------------------------------------------------------------------------------------------

def _row_signs(higher_is_better: bool | Sequence[bool], n_rows: int) -> np.ndarray:
    hib = np.asarray(higher_is_better, dtype=bool)
    if hib.ndim == 0:
        hib = np.full(n_rows, bool(hib))
    if hib.shape != (n_rows,):
        raise ValueError(f"higher_is_better must be a bool or one bool per row ({n_rows}), got shape {hib.shape}")
    return np.where(hib, 1.0, -1.0)


def _matrix(matrix: object) -> np.ndarray:
    x = np.asarray(matrix, dtype=float)
    if x.ndim != 2:
        raise ValueError(f"expected a (data sets x methods) matrix, got shape {x.shape}")
    return x


@dataclass(frozen=True)
class Friedman:
    """Friedman test on a data sets x methods matrix, with Iman-Davenport's F.

    ``avg_ranks`` are in column order, rank 1 = best, ties averaged. ``chi2`` is Friedman's chi^2_F (df = k - 1);
    ``f_stat`` is Iman-Davenport's F_F with df ``(k - 1, (k - 1)(n - 1))``.
    """

    avg_ranks: tuple[float, ...]
    n: int
    k: int
    chi2: float
    pvalue: float
    f_stat: float
    f_pvalue: float
    f_df: tuple[int, int]
    tie_correction: bool
    note: str = ""


def friedman(matrix: Sequence[Sequence[float]], higher_is_better: bool | Sequence[bool] = True,
             tie_correction: bool = True) -> Friedman:
    """Friedman test with average ranks and the Iman-Davenport F (Demšar 2006, section 3.2.2).

    ``matrix`` has one row per data set (or task) and one column per method; ``higher_is_better`` is one bool or
    one per row (rows may use different metrics). Ranks are taken within each row, 1 = best, ties averaged
    (values within ``REL_TOL`` of each other tie, as in ``merge_close``); R_j is
    the average rank of method j over the n rows. Then (Demšar's equations)

        chi^2_F = 12 n / (k (k + 1)) * (sum_j R_j^2 - k (k + 1)^2 / 4),   df = k - 1
        F_F     = (n - 1) chi^2_F / (n (k - 1) - chi^2_F),                 df = (k - 1, (k - 1)(n - 1))

    With ``tie_correction`` (default) chi^2_F is divided by ``1 - sum(t^3 - t) / (n k (k^2 - 1))`` over tie groups
    of size t, which reproduces ``scipy.stats.friedmanchisquare``; ``tie_correction=False`` is Demšar's formula as
    printed (smaller, i.e. conservative, when there are ties). Rows with a NaN are dropped. Fewer than 3 methods,
    fewer than 2 rows, or every row tied leave the statistics NaN with a note; rows that all rank the methods the
    same way give F_F = inf (p = 0) with a note.
    """
    x = _matrix(matrix)
    signs = _row_signs(higher_is_better, x.shape[0])
    keep = np.all(np.isfinite(x), axis=1)
    dropped = int(x.shape[0] - keep.sum())
    note = f"dropped {dropped} row(s) with a missing or non-finite value" if dropped else ""
    x, signs = x[keep], signs[keep]
    n, k = x.shape
    df = (k - 1, (k - 1) * (n - 1))
    ranks = (np.stack([tie_ranks(row, bool(s > 0)) for row, s in zip(x, signs)]) if n and k
             else np.empty((n, k)))
    avg = tuple(map(float, ranks.mean(axis=0))) if n else (NAN,) * k

    def result(chi2: float, p: float, f: float, fp: float, why: str = "") -> Friedman:
        return Friedman(avg, n, k, chi2, p, f, fp, df, tie_correction, _join(note, why))

    if k < 3:
        return result(NAN, NAN, NAN, NAN, f"the Friedman test needs at least 3 methods, got k={k}"
                      + ("; compare two methods with the Wilcoxon signed-rank test" if k == 2 else ""))
    if n < 2:
        return result(NAN, NAN, NAN, NAN, f"the Friedman test needs at least 2 data sets, got n={n}")
    # tie groups per row: sum over rows of sum(t^3 - t)
    tie_sum = 0.0
    for row in ranks:
        _, counts = np.unique(row, return_counts=True)
        tie_sum += float(np.sum(counts.astype(float) ** 3 - counts))
    c = 1.0 - tie_sum / (n * k * (k * k - 1))
    if c <= REL_TOL:
        return result(NAN, NAN, NAN, NAN, "all methods tie on every data set: no ranking information")
    r = np.asarray(avg)
    chi2 = 12.0 * n / (k * (k + 1)) * (float(np.sum(r * r)) - k * (k + 1) ** 2 / 4.0)
    chi2 = max(chi2, 0.0)
    if tie_correction:
        chi2 /= c
    p = float(sps.chi2.sf(chi2, k - 1))
    small = (f"only n={n} data sets: the chi-square approximation is rough, prefer the Iman-Davenport p"
             if n < FRIEDMAN_SMALL_N else "")
    denom = n * (k - 1) - chi2
    if denom <= REL_TOL * n * (k - 1):
        return result(chi2, p, math.inf, 0.0, _join(small, "every data set ranks the methods the same way "
                                                          "(Kendall's W = 1): F_F is infinite"))
    f = (n - 1) * chi2 / denom
    return result(chi2, p, f, float(sps.f.sf(f, *df)), small)


@dataclass(frozen=True)
class NemenyiCD:
    """Nemenyi critical difference: average ranks further apart than ``cd`` differ significantly."""

    k: int
    n: int
    alpha: float
    q_alpha: float
    cd: float
    note: str = ""


def nemenyi_cd(k: int, n: int, alpha: float = 0.05) -> NemenyiCD:
    """Nemenyi (1963) critical difference ``CD = q_alpha sqrt(k (k + 1) / (6 n))`` (Demšar 2006, section 3.2.2).

    ``q_alpha`` is the studentized range quantile over sqrt(2):
    ``scipy.stats.studentized_range.ppf(1 - alpha, k, inf) / sqrt(2)`` (Demšar's Table 5a: 2.569 for k=4 at 0.05).
    k methods, n data sets.
    """
    _check_confidence(alpha, "alpha")
    k, n = int(k), int(n)
    if k < 2:
        return NemenyiCD(k, n, alpha, NAN, NAN, f"a critical difference needs at least 2 methods, got k={k}")
    q = float(sps.studentized_range.ppf(1.0 - alpha, k, np.inf) / math.sqrt(2.0))
    if n < 1:
        return NemenyiCD(k, n, alpha, q, NAN, f"a critical difference needs at least 1 data set, got n={n}")
    return NemenyiCD(k, n, alpha, q, q * math.sqrt(k * (k + 1) / (6.0 * n)))


@dataclass(frozen=True)
class PairwiseRow:
    """One pair of methods: Wilcoxon over data sets, Holm-adjusted across all pairs.

    ``better`` names the method with the better median (direction-aware) difference, ``""`` when it is zero.
    """

    method_a: str
    method_b: str
    n: int
    statistic: float
    pvalue: float
    p_adjusted: float
    significant: bool
    better: str
    note: str = ""


@dataclass(frozen=True)
class PairwiseWilcoxonHolm:
    """All pairwise Wilcoxon tests with Holm's adjustment; ``to_frame()`` gives one row per pair."""

    rows: tuple[PairwiseRow, ...]
    alpha: float
    note: str = ""

    def to_frame(self) -> "pd.DataFrame":
        import pandas as pd

        columns = list(PairwiseRow.__dataclass_fields__)
        return pd.DataFrame([asdict(r) for r in self.rows], columns=columns)


def pairwise_wilcoxon_holm(matrix: Sequence[Sequence[float]], names: Sequence[str], alpha: float = 0.05,
                           higher_is_better: bool | Sequence[bool] = True) -> PairwiseWilcoxonHolm:
    """All pairs of methods compared by the Wilcoxon signed-rank test over data sets, then Holm-adjusted.

    This is the post-hoc procedure Benavoli et al. (2016) recommend instead of mean-rank tests such as Nemenyi (whose
    outcome for a pair depends on the other methods in the comparison). ``matrix`` is data sets x methods with
    columns named by ``names``; ``higher_is_better`` is one bool or one per row. Each pair uses the rows where both
    methods have a value (see ``wilcoxon`` for the method/zero_method choice); ``significant`` is Holm-adjusted
    p < ``alpha``.
    """
    x = _matrix(matrix)
    names = [str(s) for s in names]
    if len(names) != x.shape[1]:
        raise ValueError(f"got {len(names)} names for {x.shape[1]} methods")
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {names}")
    oriented = _row_signs(higher_is_better, x.shape[0])[:, None] * x
    pairs = list(combinations(range(len(names)), 2))
    tests = [wilcoxon(oriented[:, i], oriented[:, j], alpha=alpha, unit="data sets") for i, j in pairs]
    adjusted = holm([t.pvalue for t in tests], alpha=alpha)
    rows = []
    for (i, j), t, padj, rej in zip(pairs, tests, adjusted.adjusted, adjusted.reject):
        better = names[i] if t.median_diff > 0 else names[j] if t.median_diff < 0 else ""
        rows.append(PairwiseRow(names[i], names[j], t.n, t.statistic, t.pvalue, padj, rej, better, t.note))
    m = adjusted.n_tests  # pairs with a p-value
    floors = [min(1.0, m * t.min_pvalue) for t in tests if t.n]  # Holm's first step multiplies by m
    note = ""
    if not pairs:
        note = f"no pairs to compare with k={len(names)} method(s)"
    elif not floors:
        note = "no pair has a non-zero difference on any data set"
    elif min(floors) > alpha:
        note = (f"with {m} pairs, even the most extreme outcome has Holm-adjusted p >= {min(floors):.4g} > "
                f"alpha={alpha:g}: no pair can be declared significant with this many data sets")
    return PairwiseWilcoxonHolm(tuple(rows), alpha, _join(note, adjusted.note if pairs else ""))


# ----------------------------------------------------------------------------------------------------------------
# Bootstrap intervals and Δm%
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BootstrapCI:
    """A bootstrap confidence interval around ``estimate`` (the statistic on the original sample)."""

    estimate: float
    ci_low: float
    ci_high: float
    standard_error: float
    n: int
    confidence: float
    method: str
    n_resamples: int
    note: str = ""


_BOOTSTRAP_METHODS = {"percentile": "percentile", "basic": "basic", "bca": "BCa"}


def _bootstrap_method(method: str) -> str:
    try:
        return _BOOTSTRAP_METHODS[str(method).lower()]
    except KeyError:
        raise ValueError(f"unknown bootstrap method {method!r} (valid: percentile, basic, bca)") from None


def _run_bootstrap(data: tuple[np.ndarray, ...], statistic: Callable, *, paired: bool, method: str,
                   confidence: float, n_resamples: int, seed: int) -> tuple[float, float, float, str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = sps.bootstrap(data, statistic, n_resamples=n_resamples, paired=paired, confidence_level=confidence,
                            method=method, rng=np.random.default_rng(seed))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    note = ""
    if not (np.isfinite(low) and np.isfinite(high)):
        detail = str(caught[0].message).split(".")[0] if caught else "non-finite interval"
        note = f"the {method} interval is undefined for this sample ({detail})"
        low = high = NAN
    return low, high, float(res.standard_error), note


def bootstrap_ci(values: Sequence[float], statistic: Callable[..., float] = np.mean, method: str = "percentile",
                 confidence: float = 0.95, n_resamples: int = 10000, seed: int = 0) -> BootstrapCI:
    """Bootstrap confidence interval of ``statistic(values)`` via ``scipy.stats.bootstrap`` (Efron & Tibshirani 1993).

    ``method`` is ``"percentile"``, ``"basic"`` or ``"bca"`` (bias-corrected and accelerated). Seeded by ``seed``
    (``numpy.random.default_rng``) so the interval is reproducible; vectorised when ``statistic`` takes an ``axis``
    argument, as numpy reductions do. NaN values are dropped with a note. Fewer than 2 values or all values equal
    leave the interval NaN with a note; fewer than 10 values add a note that bootstrap intervals under-cover.
    """
    _check_confidence(confidence)
    kind = _bootstrap_method(method)
    v = _vector(values, "values")
    finite = np.isfinite(v)
    dropped = int(v.size - finite.sum())
    note = f"dropped {dropped} missing or non-finite value(s)" if dropped else ""
    v = v[finite]
    n = int(v.size)
    estimate = float(statistic(v)) if n else NAN

    def degenerate(why: str) -> BootstrapCI:
        return BootstrapCI(estimate, NAN, NAN, NAN, n, confidence, kind, n_resamples, _join(note, why))

    if n == 0:
        return degenerate("no values")
    if n == 1:
        return degenerate("n=1: cannot bootstrap a single value")
    if np.all(v == v[0]):
        return degenerate(f"all {n} values are equal: the bootstrap distribution is a single point")
    low, high, se, why = _run_bootstrap((v,), statistic, paired=False, method=kind, confidence=confidence,
                                        n_resamples=n_resamples, seed=seed)
    small = (f"only n={n} values: bootstrap intervals are too narrow (under-cover) for small samples"
             if n < BOOTSTRAP_SMALL_N else "")
    return BootstrapCI(estimate, low, high, se, n, confidence, kind, n_resamples, _join(note, why, small))


@dataclass(frozen=True)
class DeltaM:
    """Δm% (positive = better than the baseline) and the signed relative change of each task, in percent."""

    value: float
    per_task: tuple[float, ...]
    tasks: tuple[str, ...]
    note: str = ""


def _values(x: object, name: str) -> np.ndarray:
    return _vector([NAN if v is None else float(v) for v in np.atleast_1d(np.asarray(x, dtype=object)).ravel()],
                   name)


def _aligned(method: object, baseline: object, lower_is_better: Directions
             ) -> tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray]:
    """Tasks, method values, baseline values (NaN where missing) and lower-is-better flags, aligned."""
    if isinstance(method, Mapping):
        if not isinstance(baseline, Mapping):
            raise ValueError("baseline_means must be a mapping when method_means is one")
        tasks = tuple(dict.fromkeys([*method, *baseline]))   # a task the method lacks is NaN, never dropped
        m = _values([method.get(t) for t in tasks], "method_means")
        b = _values([baseline.get(t) for t in tasks], "baseline_means")
        if isinstance(lower_is_better, Mapping):
            absent = [t for t in tasks if t not in lower_is_better]
            if absent:
                raise ValueError(f"lower_is_better has no direction for task(s) {absent}")
            lower_is_better = [bool(lower_is_better[t]) for t in tasks]
    else:
        if isinstance(baseline, Mapping) or isinstance(lower_is_better, Mapping):
            raise ValueError("use mappings for all of method_means, baseline_means and lower_is_better, or none")
        m, b = _values(method, "method_means"), _values(baseline, "baseline_means")
        if b.shape != m.shape:
            raise ValueError(f"{m.size} method values but {b.size} baseline values")
        tasks = tuple(range(m.size))
    lib = np.asarray(lower_is_better, dtype=bool)
    if lib.ndim == 0:
        lib = np.full(m.shape, bool(lib))
    if lib.shape != m.shape:
        raise ValueError(f"lower_is_better must be a bool or one per task ({m.size}), got shape {lib.shape}")
    return tuple(str(t) for t in tasks), m, b, lib


def _delta_m_terms(m: np.ndarray, b: np.ndarray, lib: np.ndarray) -> np.ndarray:
    return np.where(lib, -1.0, 1.0) * (m - b) / np.abs(b) * 100.0


def delta_m(method_means: Sequence[float] | Mapping[str, float], baseline_means: Sequence[float] | Mapping[str, float],
            lower_is_better: Directions) -> DeltaM:
    """Δm% of a method against the single-task baseline (Maninis et al. 2019), positive = better.

    ``Δm% = 100 / T * sum_t (-1)^{l_t} (M_t - B_t) / B_t`` with l_t = 1 if lower is better for task t. Inputs are
    per-task means, as sequences in the same task order or as mappings task -> value; ``lower_is_better`` is one
    bool, one per task, or a mapping. A baseline that is 0, missing or NaN (or a NaN method value) makes that task's
    term and Δm% NaN, with a note naming the task. A negative baseline is divided by its absolute value, so that a
    positive term still means better (with B_t < 0 the printed formula would flip the sign); the note says so.
    """
    tasks, m, b, lib = _aligned(method_means, baseline_means, lower_is_better)
    if m.size == 0:
        return DeltaM(NAN, (), (), "no tasks")
    notes = []
    zero = [t for t, v in zip(tasks, b) if v == 0]
    nan_base = [t for t, v in zip(tasks, b) if not np.isfinite(v)]
    nan_method = [t for t, v in zip(tasks, m) if not np.isfinite(v)]
    negative = [t for t, v in zip(tasks, b) if v < 0]
    if zero:
        notes.append(f"baseline is 0 for task(s) {', '.join(zero)}: relative change undefined")
    if nan_base:
        notes.append(f"baseline missing or non-finite for task(s) {', '.join(nan_base)}")
    if nan_method:
        notes.append(f"method value missing or non-finite for task(s) {', '.join(nan_method)}")
    if negative:
        notes.append(f"negative baseline for task(s) {', '.join(negative)}: divided by |B_t| so positive = better")
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = _delta_m_terms(m, b, lib)
    terms[~np.isfinite(terms)] = NAN
    value = float(terms.mean()) if np.all(np.isfinite(terms)) else NAN
    return DeltaM(value, tuple(map(float, terms)), tasks, _join(*notes))


def bootstrap_delta_m_ci(method_runs: Sequence[Sequence[float]], baseline: Sequence[float] | Sequence[Sequence[float]],
                         lower_is_better: bool | Sequence[bool], method: str = "percentile",
                         confidence: float = 0.95, n_resamples: int = 10000, seed: int = 0) -> BootstrapCI:
    """Bootstrap confidence interval of a method's Δm% (see ``delta_m``), resampling the method's seeds.

    ``method_runs`` is a (seeds x tasks) matrix of the method's per-seed metrics, one column per task.
    ``baseline`` is either the (tasks,) single-task baseline means or a (baseline seeds x tasks) matrix of per-seed
    baseline metrics, averaged per task. ``lower_is_better`` is one bool or one per task.

    Design: whole seeds (rows) are resampled with replacement, so correlations between tasks within a run are kept,
    and Δm% is recomputed from the resampled per-task means. The baseline means are held fixed: Δm% is defined
    relative to that reference, every method on the leaderboard shares it, and resampling it would widen all
    intervals by the same baseline noise. The interval is therefore conditional on the baseline. Because Δm% is
    linear in the per-task means, the percentile interval equals ``bootstrap_ci`` of the per-seed Δm% values with
    the same seed. Seeds with a NaN are dropped; fewer than 2 seeds, identical seeds, or an undefined Δm% (zero or
    missing baseline) leave the interval NaN with a note.
    """
    _check_confidence(confidence)
    kind = _bootstrap_method(method)
    runs = np.asarray(method_runs, dtype=float)
    if runs.ndim == 1:
        runs = runs[:, None]
    if runs.ndim != 2:
        raise ValueError(f"method_runs must be a (seeds x tasks) matrix, got shape {runs.shape}")
    base = np.asarray(baseline, dtype=float)
    if base.ndim == 2:
        if base.shape[1] != runs.shape[1]:
            raise ValueError(f"baseline has {base.shape[1]} tasks, method_runs {runs.shape[1]}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column -> NaN, reported by delta_m
            base = np.nanmean(base, axis=0)
    base = np.atleast_1d(base)
    if base.shape != (runs.shape[1],):
        raise ValueError(f"baseline must have one value per task ({runs.shape[1]}), got shape {base.shape}")
    lib = np.asarray(lower_is_better, dtype=bool)
    lib = np.full(runs.shape[1], bool(lib)) if lib.ndim == 0 else lib
    if lib.shape != (runs.shape[1],):
        raise ValueError(f"lower_is_better must be a bool or one per task ({runs.shape[1]}), got shape {lib.shape}")

    keep = np.all(np.isfinite(runs), axis=1)
    dropped = int(runs.shape[0] - keep.sum())
    note = f"dropped {dropped} seed(s) with a missing or non-finite value" if dropped else ""
    runs = runs[keep]
    n = int(runs.shape[0])

    def degenerate(estimate: float, why: str) -> BootstrapCI:
        return BootstrapCI(estimate, NAN, NAN, NAN, n, confidence, kind, n_resamples, _join(note, why))

    if n == 0:
        return degenerate(NAN, "no complete seeds")
    point = delta_m(runs.mean(axis=0), base, lib)
    if not np.isfinite(point.value):
        return degenerate(NAN, point.note)
    note = _join(note, point.note)
    if n == 1:
        return degenerate(point.value, "n=1 seed: cannot bootstrap a single run")
    if np.all(runs == runs[0]):
        return degenerate(point.value, f"all {n} seeds are identical: the bootstrap distribution is a single point")
    signs = np.where(lib, -1.0, 1.0)
    scale = np.abs(base)

    def statistic(*columns: np.ndarray, axis: int = -1) -> np.ndarray:
        means = np.stack([c.mean(axis=axis) for c in columns], axis=-1)
        return np.mean(signs * (means - base) / scale, axis=-1) * 100.0

    columns = tuple(runs[:, t] for t in range(runs.shape[1]))
    low, high, se, why = _run_bootstrap(columns, statistic, paired=True, method=kind, confidence=confidence,
                                        n_resamples=n_resamples, seed=seed)
    small = (f"only n={n} seeds: bootstrap intervals are too narrow (under-cover) for small samples"
             if n < BOOTSTRAP_SMALL_N else "")
    return BootstrapCI(point.value, low, high, se, n, confidence, kind, n_resamples, _join(note, why, small))


# ----------------------------------------------------------------------------------------------------------------
# Critical difference diagram
# ----------------------------------------------------------------------------------------------------------------

def cd_cliques(avg_ranks: Mapping[str, float], cd: float) -> list[tuple[str, ...]]:
    """Maximal groups of methods, consecutive in rank order, whose average ranks differ by less than ``cd``.

    These are the thick bars of a CD diagram (Demšar 2006, Fig. 1): methods joined by a bar are not significantly
    different. Groups of one method are omitted; a NaN ``cd`` gives no groups.
    """
    items = sorted(avg_ranks.items(), key=lambda kv: (kv[1], kv[0]))
    ranks = [r for _, r in items]
    cliques: list[tuple[str, ...]] = []
    reach = 0
    for i in range(len(items)):
        j = i
        while j + 1 < len(items) and ranks[j + 1] - ranks[i] < cd:
            j += 1
        if j > i and j > reach:
            cliques.append(tuple(name for name, _ in items[i:j + 1]))
            reach = j
    return cliques


# ----------------------------------------------------------------------------------------------------------------
# Against a control method over data sets (Demšar 2006, section 3.2.2)
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ControlRow:
    """One method against the control: average ranks, z, raw and corrected p (two-sided)."""

    method: str
    rank: float
    z: float
    pvalue: float
    p_adjusted: float
    significant: bool


@dataclass(frozen=True)
class ControlComparison:
    """Every method against a control by rank z-tests, corrected by Holm or Bonferroni-Dunn."""

    control: str
    control_rank: float
    rows: tuple[ControlRow, ...]
    n: int
    k: int
    correction: str
    alpha: float
    min_pvalue: float       # the smallest corrected p any outcome could give (ranks k-1 apart)
    note: str = ""


def control_comparison(matrix: Sequence[Sequence[float]], names: Sequence[str], control: str,
                       higher_is_better: bool | Sequence[bool] = True, alpha: float = 0.05,
                       correction: str = "holm") -> ControlComparison:
    """Compare every method with ``control`` over data sets (rows), as Demšar (2006, section 3.2.2) recommends
    when one method is the reference: with average ranks R (1 = best, ties averaged within ``REL_TOL``),

        z_i = (R_i - R_control) / sqrt(k (k + 1) / (6 N)),   p_i = 2 (1 - Phi(|z_i|)),

    and the k - 1 p-values corrected by ``correction``: ``"holm"`` (step-down; more powerful), ``"bh"``
    (Benjamini-Hochberg: false discovery rate instead of family-wise error) or
    ``"bonferroni"`` (Bonferroni-Dunn: p (k - 1), equivalent to Demšar's critical difference
    ``q_alpha sqrt(k (k + 1) / (6 N))`` with ``q_alpha = Phi^-1(1 - alpha / (2 (k - 1)))``). Rows with a NaN are
    dropped. The note says when even ranks k - 1 apart could not reach ``alpha`` after correction.
    """
    _check_confidence(alpha, "alpha")
    if correction not in ("holm", "bonferroni", "bh"):
        raise ValueError(f"correction must be 'holm', 'bonferroni' or 'bh', got {correction!r}")
    x = _matrix(matrix)
    names = [str(s) for s in names]
    if len(names) != x.shape[1] or len(set(names)) != len(names):
        raise ValueError(f"need {x.shape[1]} distinct method names, got {names}")
    if control not in names:
        raise ValueError(f"control {control!r} is not among the methods {names}")
    fr = friedman(x, higher_is_better)
    n, k = fr.n, fr.k
    c = names.index(control)
    if n < 1 or k < 2:
        return ControlComparison(control, NAN, (), n, k, correction, alpha, NAN,
                                 _join(fr.note, f"needs at least 2 methods and 1 data set (k={k}, N={n})"))
    se = math.sqrt(k * (k + 1) / (6.0 * n))
    ranks = np.asarray(fr.avg_ranks)
    others = [i for i in range(k) if i != c]
    z = (ranks[others] - ranks[c]) / se
    p = 2.0 * sps.norm.sf(np.abs(z))
    m = len(others)
    adjusted = (holm(p, alpha).adjusted if correction == "holm" else benjamini_hochberg(p, alpha).adjusted
                if correction == "bh" else tuple(np.minimum(1.0, p * m)))
    # the smallest raw p any outcome gives is at ranks k - 1 apart; Holm and Bonferroni multiply the smallest p by m,
    # BH's smallest adjusted p is at least the smallest raw p
    p_floor = min(1.0, (1 if correction == "bh" else m) * 2.0 * float(sps.norm.sf((k - 1) / se)))
    note = _join(f"with N={n} data sets and k={k} methods no corrected p can fall below {p_floor:.3g}: the "
                 f"comparison against {control} cannot reject at alpha={alpha:g}" if p_floor >= alpha else "")
    rows = tuple(ControlRow(names[i], float(ranks[i]), float(zi), float(pi), float(ai), bool(ai < alpha))
                 for i, zi, pi, ai in zip(others, z, p, adjusted))
    return ControlComparison(control, float(ranks[c]), rows, n, k, correction, alpha, p_floor, note)


# ----------------------------------------------------------------------------------------------------------------
# Bayesian signed-rank test with a region of practical equivalence (Benavoli et al. 2017)
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BayesSignedRank:
    """Posterior probabilities that ``a`` is practically better (``p_a``), equivalent within the rope
    (``p_rope``) or practically worse (``p_b``), and the posterior means of the three masses."""

    p_a: float
    p_rope: float
    p_b: float
    mean_masses: tuple[float, float, float]
    rope: float
    n: int
    n_samples: int
    prior: float
    note: str = ""


def bayesian_signed_rank(a: Sequence[float], b: Sequence[float], rope: float, prior: float = 0.5,
                         n_samples: int = 50000, seed: int = 0) -> BayesSignedRank:
    """Bayesian signed-rank test (Benavoli, Corani, Demšar, Zaffalon 2017, JMLR 18(77), section 5; the Dirichlet
    process of Benavoli et al., ICML 2014) on paired scores, oriented so that higher is better.

    With z_i = a_i - b_i and a pseudo-observation z_0 = 0 of weight ``prior`` (the authors' ``baycomp`` default,
    0.5), each posterior sample draws weights w ~ Dirichlet(prior, 1, ..., 1) over (z_0, ..., z_n) and sets
    ``theta_a = sum_ij w_i w_j H(z_i + z_j - 2 rope)``, ``theta_b`` likewise for ``-(z_i + z_j)``, ``theta_rope``
    the rest (H: step, 1/2 at 0). The reported probabilities are the share of samples in which each mass is the
    largest. Samples come from ``numpy.random.RandomState(seed).dirichlet`` (as baycomp draws them), so a seed
    gives the same numbers. ``rope`` is in the units of the scores (e.g. 0.001 AUC); it must be > 0.
    """
    if not rope > 0:
        raise ValueError(f"rope must be positive, got {rope!r}")
    x, y, note = _complete_pairs(a, b)
    n = int(x.size)
    if n == 0:
        return BayesSignedRank(NAN, NAN, NAN, (NAN, NAN, NAN), rope, 0, n_samples, prior, _join(note, "no pairs"))
    z = np.concatenate(([0.0], x - y))
    sums = z[:, None] + z[None, :]

    def step(v: np.ndarray) -> np.ndarray:
        return (v > 0).astype(float) + 0.5 * (v == 0)

    above, below = step(sums - 2 * rope), step(-sums - 2 * rope)
    w = _dirichlet_samples(n, float(prior), int(n_samples), int(seed))
    t_a = ((w @ above) * w).sum(axis=1)
    t_b = ((w @ below) * w).sum(axis=1)
    masses = np.stack([t_a, 1.0 - t_a - t_b, t_b], axis=1)
    share = np.bincount(np.argmax(masses, axis=1), minlength=3) / n_samples   # ties: the first, as baycomp
    small = f"only n={n} pairs: the prior pseudo-observation at 0 weighs {prior / (n + prior):.0%}" if n < 10 else ""
    return BayesSignedRank(float(share[0]), float(share[1]), float(share[2]),
                           tuple(float(v) for v in masses.mean(axis=0)), float(rope), n, n_samples, prior,
                           _join(note, small))


@lru_cache(maxsize=32)
def _dirichlet_samples(n: int, prior: float, n_samples: int, seed: int) -> np.ndarray:
    """The posterior weight samples depend only on (n, prior, n_samples, seed), not on the scores: drawn once per
    key (a leaderboard tests every method of a table with the same seed count), read-only."""
    weights = np.ones(n + 1)
    weights[0] = prior
    w = np.random.RandomState(seed).dirichlet(weights, n_samples)
    w.setflags(write=False)
    return w


# ----------------------------------------------------------------------------------------------------------------
# Aggregate scores over runs and tasks (Agarwal et al. 2021)
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StratifiedCI:
    """A point estimate over a (runs x tasks) score matrix and its stratified bootstrap percentile interval."""

    estimate: float
    ci_low: float
    ci_high: float
    confidence: float
    n_resamples: int
    note: str = ""


def _scores(x: object, name: str) -> np.ndarray:
    m = np.asarray(x, dtype=float)
    if m.ndim == 1:
        m = m[:, None]
    if m.ndim != 2 or m.shape[0] < 1:
        raise ValueError(f"{name} must be a (runs x tasks) matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{name} holds a missing or non-finite score")
    return m


def iqm(scores: object) -> float:
    """Interquartile mean of every score (runs x tasks, flattened): the mean of the middle 50 %, as rliable's
    ``metrics.aggregate_iqm`` (``scipy.stats.trim_mean(..., 0.25)``)."""
    return float(sps.trim_mean(_scores(scores, "scores").ravel(), 0.25))


def probability_of_improvement(a: object, b: object) -> float:
    """P(a > b) averaged over tasks (Agarwal et al. 2021, rliable's ``probability_of_improvement``): per task the
    Mann-Whitney probability that a random run of ``a`` beats a random run of ``b`` (ties count 1/2), then the
    mean over tasks. Scores are (runs x tasks), higher = better; the run counts may differ."""
    x, y = _scores(a, "a"), _scores(b, "b")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"a has {x.shape[1]} tasks, b {y.shape[1]}")
    return float(np.mean(_pi_per_task(x, y)))


def _pi_per_task(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = x[:, None, :] - y[None, :, :]                       # runs_a x runs_b x tasks
    return ((d > 0).sum(axis=(0, 1)) + 0.5 * (d == 0).sum(axis=(0, 1))) / (x.shape[0] * y.shape[0])


def _stratified_indices(rng: np.random.Generator, n_runs: int, n_tasks: int) -> np.ndarray:
    """One stratified bootstrap draw: for every task (stratum) its own resample of the runs (runs x tasks)."""
    return rng.integers(0, n_runs, size=(n_runs, n_tasks))


def _percentile(stats_: np.ndarray, estimate: float, confidence: float, n_resamples: int, note: str) -> StratifiedCI:
    lo, hi = np.percentile(stats_, [50 * (1 - confidence), 50 * (1 + confidence)])
    return StratifiedCI(estimate, float(lo), float(hi), confidence, n_resamples, note)


def iqm_ci(scores: object, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> StratifiedCI:
    """IQM with a stratified bootstrap percentile interval (Agarwal et al. 2021): each resample draws, for every
    task independently, as many runs as there are with replacement (``numpy.random.default_rng(seed)``,
    one ``integers(0, runs, (runs, tasks))`` draw per resample), and recomputes the IQM."""
    _check_confidence(confidence)
    m = _scores(scores, "scores")
    n, t = m.shape
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n, t))   # = n_resamples successive (runs x tasks) draws
    boot = sps.trim_mean(m[idx, np.arange(t)].reshape(n_resamples, n * t), 0.25, axis=1)
    small = f"only {n} runs per task: bootstrap intervals under-cover for small samples" if n < BOOTSTRAP_SMALL_N else ""
    return _percentile(boot, iqm(m), confidence, n_resamples, small)


def probability_of_improvement_ci(a: object, b: object, confidence: float = 0.95, n_resamples: int = 2000,
                                  seed: int = 0) -> StratifiedCI:
    """P(a > b) with a stratified bootstrap percentile interval: per resample, ``a``'s runs and then ``b``'s are
    resampled within each task (``numpy.random.default_rng(seed)``, a's draw first), as rliable does."""
    _check_confidence(confidence)
    x, y = _scores(a, "a"), _scores(b, "b")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"a has {x.shape[1]} tasks, b {y.shape[1]}")
    rng = np.random.default_rng(seed)
    cols = np.arange(x.shape[1])
    if x.shape == y.shape:   # one call draws the same stream as the alternating a, b draws below
        both = rng.integers(0, x.shape[0], size=(n_resamples, 2, *x.shape))
        ia, ib = both[:, 0], both[:, 1]
    else:                    # the draws in rliable's order (a, then b), one resample at a time
        draws = [(_stratified_indices(rng, *x.shape), _stratified_indices(rng, *y.shape)) for _ in range(n_resamples)]
        ia, ib = np.stack([d[0] for d in draws]), np.stack([d[1] for d in draws])
    xa, yb = x[ia, cols], y[ib, cols]     # resamples x runs x tasks
    d = xa[:, :, None, :] - yb[:, None, :, :]
    per_task = ((d > 0).sum(axis=(1, 2)) + 0.5 * (d == 0).sum(axis=(1, 2))) / (x.shape[0] * y.shape[0])
    boot = per_task.mean(axis=1)
    n = min(x.shape[0], y.shape[0])
    small = f"only {n} runs per task: bootstrap intervals under-cover for small samples" if n < BOOTSTRAP_SMALL_N else ""
    return _percentile(boot, probability_of_improvement(x, y), confidence, n_resamples, small)
