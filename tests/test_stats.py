"""mtlbench.results.stats and the CD diagram of .plots: checked against scipy, hand-computed examples and Demšar."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.stats as sps
from hypothesis import given, settings
from hypothesis import strategies as hst

from mtlbench.results import plots as P
from mtlbench.results import stats as S

# Demšar (2006), Table 6: AUC of C4.5 with/without m and cf tuning on 14 UCI data sets (rows) x 4 variants (columns).
DEMSAR_NAMES = ["C4.5", "C4.5+m", "C4.5+cf", "C4.5+m+cf"]
DEMSAR_TABLE6 = np.array([
    [0.763, 0.768, 0.771, 0.798],  # adult (sample)
    [0.599, 0.591, 0.590, 0.569],  # breast cancer
    [0.954, 0.971, 0.968, 0.967],  # breast cancer wisconsin
    [0.628, 0.661, 0.654, 0.657],  # cmc
    [0.882, 0.888, 0.886, 0.898],  # ionosphere
    [0.936, 0.931, 0.916, 0.931],  # iris
    [0.661, 0.668, 0.609, 0.685],  # liver disorders
    [0.583, 0.583, 0.563, 0.625],  # lung cancer
    [0.775, 0.838, 0.866, 0.875],  # lymphography
    [1.000, 1.000, 1.000, 1.000],  # mushroom
    [0.940, 0.962, 0.965, 0.962],  # primary tumor
    [0.619, 0.666, 0.614, 0.669],  # rheum
    [0.972, 0.981, 0.975, 0.975],  # voting
    [0.957, 0.978, 0.946, 0.970],  # wine
])


def _nan_or(x: float, y: float) -> bool:
    return (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-9, abs=1e-12)


@pytest.fixture(autouse=True)
def _no_warnings():
    """Degenerate inputs must be handled, not leak scipy/numpy RuntimeWarnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ---------------------------------------------------------------------------------------------------------------
# paired t
# ---------------------------------------------------------------------------------------------------------------

def test_paired_t_matches_scipy_ttest_rel():
    rng = np.random.default_rng(1)
    a = rng.normal(0.80, 0.02, 7)
    b = a - rng.normal(0.01, 0.01, 7)
    got = S.paired_t(a, b, confidence=0.9)
    ref = sps.ttest_rel(a, b)
    ci = ref.confidence_interval(confidence_level=0.9)
    assert got.statistic == pytest.approx(ref.statistic)
    assert got.pvalue == pytest.approx(ref.pvalue)
    assert (got.ci_low, got.ci_high) == pytest.approx((ci.low, ci.high))
    assert got.mean_diff == pytest.approx(np.mean(a - b))
    assert (got.n, got.df, got.note) == (7, 6, "")


@pytest.mark.parametrize("a, b, fragment", [
    ([0.9, 0.8, 0.7], [0.8, 0.7, 0.6], "zero variance"),   # same shift on every seed (round-off included)
    ([0.5, 0.6, 0.7], [0.5, 0.6, 0.7], "identical"),
    ([0.5], [0.4], "n=1"),
    ([], [], "no complete pairs"),
    ([np.nan, 0.5], [0.4, np.nan], "no complete pairs"),
])
def test_paired_t_degenerate_inputs_give_nan_and_a_note(a, b, fragment):
    got = S.paired_t(a, b)
    assert math.isnan(got.pvalue) and math.isnan(got.statistic) and math.isnan(got.ci_low)
    assert fragment in got.note


def test_paired_t_drops_nan_pairs_with_a_note():
    a, b = [0.9, np.nan, 0.7, 0.72, 0.8], [0.85, 0.6, np.nan, 0.69, 0.74]
    got = S.paired_t(a, b)
    ref = sps.ttest_rel([0.9, 0.72, 0.8], [0.85, 0.69, 0.74])
    assert got.n == 3 and got.pvalue == pytest.approx(ref.pvalue)
    assert "dropped 2 pair(s)" in got.note


def test_paired_t_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same length"):
        S.paired_t([1, 2, 3], [1, 2])


# ---------------------------------------------------------------------------------------------------------------
# Wilcoxon
# ---------------------------------------------------------------------------------------------------------------

def test_wilcoxon_exact_matches_scipy_without_ties():
    a = np.array([0.81, 0.79, 0.84, 0.80, 0.83, 0.78, 0.86, 0.82])
    b = np.array([0.80, 0.81, 0.80, 0.77, 0.78, 0.795, 0.80, 0.75])  # |a - b| = 1, 2, 4, 3, 5, 1.5, 6, 7 (x 0.01)
    assert np.unique(np.round(np.abs(a - b), 9)).size == 8
    got = S.wilcoxon(a, b)
    ref = sps.wilcoxon(a - b, method="exact", zero_method="wilcox")
    assert (got.statistic, got.pvalue) == pytest.approx((ref.statistic, ref.pvalue))
    assert (got.method, got.zero_method, got.n, got.n_zeros) == ("exact", "wilcox", 8, 0)
    assert got.min_pvalue == pytest.approx(2 / 2 ** 8) and not got.underpowered and got.note == ""


def test_wilcoxon_five_seeds_cannot_reach_significance_and_says_so():
    got = S.wilcoxon([0.91, 0.92, 0.93, 0.94, 0.95], [0.90, 0.90, 0.90, 0.90, 0.90])
    assert got.pvalue == pytest.approx(0.0625) and got.min_pvalue == pytest.approx(0.0625)
    assert got.underpowered
    assert "with n=5 seeds the exact Wilcoxon test cannot reach p < 0.0625" in got.note
    assert not S.wilcoxon(np.arange(1, 7.0), np.zeros(6)).underpowered  # n=6: 2/64 = 0.031 < 0.05


def test_wilcoxon_drops_zero_differences_and_counts_them():
    a = np.array([1.0, 2.0, 3.0, 4.5, 5.0, 6.0, 7.0, 8.0])
    b = np.array([1.0, 2.0, 2.5, 4.1, 5.7, 4.8, 6.1, 8.8])  # two zeros, then 0.5, 0.4, -0.7, 1.2, 0.9, -0.8
    got = S.wilcoxon(a, b)
    d = (a - b)[a != b]
    ref = sps.wilcoxon(d, method="exact")
    assert (got.n, got.n_zeros) == (6, 2)
    assert got.pvalue == pytest.approx(ref.pvalue)
    assert "dropped 2 zero difference(s)" in got.note


def test_wilcoxon_round_off_does_not_create_differences():
    # 0.1 + 0.2 - 0.3 = 5.6e-17 in float64: a zero difference, not a tiny positive one.
    got = S.wilcoxon([0.1 + 0.2, 0.5, 0.7], [0.3, 0.4, 0.5])
    assert got.n_zeros == 1 and got.n == 2


def test_wilcoxon_small_n_with_ties_uses_the_exact_permutation_distribution():
    d = np.array([1.0, 2.0, 2.0, 4.0, 5.0])
    got = S.wilcoxon(d, np.zeros(5))
    assert got.method == "exact-permutation"
    ref = sps.wilcoxon(d, method=sps.PermutationMethod(n_resamples=2 ** 5))
    assert got.pvalue == pytest.approx(ref.pvalue) == pytest.approx(0.0625)
    # a less extreme case with ties and a zero, against scipy's own (slower) permutation method
    a = np.array([0.3, -0.1, 0.2, 0.2, 0.5, -0.3, 0.4, 0.0, 0.6, 0.1])
    got = S.wilcoxon(a, np.zeros(10))
    ref = sps.wilcoxon(a[a != 0], method=sps.PermutationMethod())
    assert got.method == "exact-permutation" and got.n == 9 and got.pvalue == pytest.approx(ref.pvalue)
    # the normal approximation would have claimed p < 0.05 here, below anything attainable
    assert sps.wilcoxon(d, method="asymptotic").pvalue < 0.05 < got.pvalue


def test_wilcoxon_large_n_with_ties_uses_the_normal_approximation():
    rng = np.random.default_rng(3)
    d = np.round(rng.normal(0.2, 1.0, 60), 1)
    d[d == 0] = 0.3
    got = S.wilcoxon(d, np.zeros_like(d))
    ref = sps.wilcoxon(d, method="asymptotic", correction=False)
    assert got.method == "asymptotic" and got.pvalue == pytest.approx(ref.pvalue)


@pytest.mark.parametrize("a, b, fragment", [
    ([0.5, 0.6, 0.7], [0.5, 0.6, 0.7], "identical on all 3 pairs"),
    ([], [], "no complete pairs"),
    ([np.nan], [np.nan], "no complete pairs"),
])
def test_wilcoxon_degenerate_inputs_give_nan_and_a_note(a, b, fragment):
    got = S.wilcoxon(a, b)
    assert math.isnan(got.pvalue) and fragment in got.note and got.underpowered


def test_wilcoxon_single_pair_and_nan_pairs():
    one = S.wilcoxon([0.9], [0.8])
    assert one.n == 1 and one.pvalue == pytest.approx(1.0) and "cannot reach p < 1" in one.note
    got = S.wilcoxon([0.9, np.nan, 0.8, 0.7], [0.8, 0.7, np.inf, 0.6])
    assert got.n == 2 and "dropped 2 pair(s)" in got.note


# ---------------------------------------------------------------------------------------------------------------
# Holm
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    ([0.01, 0.04, 0.03, 0.005], [0.03, 0.06, 0.06, 0.02]),
    # 0.01 x3 = 0.03; 0.2 x2 = 0.4; 0.5 x1 = 0.5
    ([0.5, 0.2, 0.01], [0.5, 0.4, 0.03]),
    # 0.02 x3 = 0.06; 0.3 x2 = 0.6; 0.6 x1 = 0.6 (max with 0.6)
    ([0.3, 0.6, 0.02], [0.6, 0.6, 0.06]),
    # capped: 0.6 x2 = 1.2 -> 1; then max(1, 0.7) = 1
    ([0.6, 0.7], [1.0, 1.0]),
    # ties: both 0.01 x3 = 0.03 (running max), 0.04 x1 = 0.04
    ([0.01, 0.04, 0.01], [0.03, 0.04, 0.03]),
    ([0.2], [0.2]),
])
def test_holm_hand_computed_examples(raw, expected):
    got = S.holm(raw)
    assert got.adjusted == pytest.approx(expected)
    assert got.n_tests == len(raw) and got.note == ""


def test_holm_passes_nan_through_and_does_not_count_it():
    got = S.holm([0.01, np.nan, 0.04])
    assert math.isnan(got.adjusted[1])
    assert (got.adjusted[0], got.adjusted[2]) == pytest.approx((0.02, 0.04))
    assert got.reject == (True, False, True) and got.n_tests == 2
    assert "1 NaN p-value(s)" in got.note


def test_holm_empty_and_invalid():
    assert S.holm([]).adjusted == () and "no p-values" in S.holm([]).note
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        S.holm([0.5, 1.2])


def _holm_brute_force(p: list[float]) -> list[float]:
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out = [0.0] * m
    for pos, i in enumerate(order):
        out[i] = max(min(1.0, (m - j) * p[order[j]]) for j in range(pos + 1))
    return out


@settings(max_examples=150, deadline=None)
@given(hst.lists(hst.floats(0.0, 1.0), min_size=1, max_size=25))
def test_holm_properties(p):
    adj = S.holm(p).adjusted
    assert adj == pytest.approx(_holm_brute_force(p))
    for i in range(len(p)):
        assert p[i] <= adj[i] + 1e-12 and adj[i] <= 1.0
        for j in range(len(p)):
            if p[i] <= p[j]:
                assert adj[i] <= adj[j] + 1e-12  # monotone in the raw order


# ---------------------------------------------------------------------------------------------------------------
# Friedman, Iman-Davenport, Nemenyi
# ---------------------------------------------------------------------------------------------------------------

def test_friedman_demsar_table6_ranks_with_ties_averaged():
    got = S.friedman(DEMSAR_TABLE6)
    # The printed table ties C4.5+cf and C4.5+m+cf on 'voting' (0.975 each): averaged ranks give 2.929 / 1.929.
    assert got.avg_ranks == pytest.approx((3.143, 2.000, 2.929, 1.929), abs=5e-4)
    assert (got.n, got.k) == (14, 4)


def test_friedman_demsar_table6_statistics():
    # Demšar's text (ranks 3.143, 2.000, 2.893, 1.964) ranks C4.5+cf above C4.5+m+cf on 'voting': the values differ
    # beyond the printed 3 decimals. With that order, his formula without tie correction gives his numbers.
    table = DEMSAR_TABLE6.copy()
    table[12, 2] = 0.9751
    got = S.friedman(table, tie_correction=False)
    assert got.avg_ranks == pytest.approx((3.143, 2.000, 2.893, 1.964), abs=5e-4)
    assert got.chi2 == pytest.approx(9.28, abs=5e-3)
    assert got.f_stat == pytest.approx(3.69, abs=5e-3)
    assert got.f_df == (3, 39)
    assert got.f_pvalue < 0.05 < sps.f.sf(2.85, 3, 39) + 0.05  # F(3, 39) critical value at 0.05 is 2.85
    assert sps.f.ppf(0.95, 3, 39) == pytest.approx(2.85, abs=5e-3)
    assert got.note == ""


def test_friedman_matches_scipy_friedmanchisquare():
    got = S.friedman(DEMSAR_TABLE6)  # tie-corrected by default, as scipy
    ref = sps.friedmanchisquare(*DEMSAR_TABLE6.T)
    assert (got.chi2, got.pvalue) == pytest.approx((ref.statistic, ref.pvalue))
    rng = np.random.default_rng(5)
    for _ in range(5):
        x = rng.integers(0, 4, size=(9, 5)).astype(float)  # many ties
        got, ref = S.friedman(x), sps.friedmanchisquare(*x.T)
        assert _nan_or(got.chi2, ref.statistic) and _nan_or(got.pvalue, ref.pvalue)
        n, k = x.shape
        assert got.f_stat == pytest.approx((n - 1) * got.chi2 / (n * (k - 1) - got.chi2))
        assert got.f_pvalue == pytest.approx(sps.f.sf(got.f_stat, k - 1, (k - 1) * (n - 1)))


def test_friedman_direction_per_row():
    x = np.array([[0.9, 0.8, 0.7], [1.0, 2.0, 3.0], [0.6, 0.5, 0.4]])  # middle row is an error: lower is better
    assert S.friedman(x, higher_is_better=[True, False, True]).avg_ranks == pytest.approx((1.0, 2.0, 3.0))
    assert S.friedman(-x, higher_is_better=False).avg_ranks == S.friedman(x).avg_ranks


def test_friedman_two_methods_only():
    got = S.friedman(DEMSAR_TABLE6[:, :2])
    assert math.isnan(got.chi2) and math.isnan(got.f_pvalue)
    assert "at least 3 methods" in got.note and "Wilcoxon" in got.note
    # C4.5+m wins 10, loses 2 and ties 2 of 14: C4.5's rank sum is 10 * 2 + 2 * 1 + 2 * 1.5 = 25
    assert got.avg_ranks == pytest.approx((25 / 14, 17 / 14))


@pytest.mark.parametrize("matrix, fragment", [
    (np.ones((5, 4)), "all methods tie on every data set"),
    ([[0.1, 0.2, 0.3]], "at least 2 data sets"),
    (np.full((3, 3), np.nan), "at least 2 data sets"),
    (np.ones((4, 1)), "at least 3 methods"),
])
def test_friedman_degenerate_inputs(matrix, fragment):
    got = S.friedman(matrix)
    assert math.isnan(got.pvalue) and math.isnan(got.f_stat) and fragment in got.note


def test_friedman_drops_nan_rows_and_flags_few_data_sets():
    x = np.array([[0.1, 0.2, 0.3], [0.3, np.nan, 0.1], [0.2, 0.1, 0.3], [0.3, 0.2, 0.1]])
    got = S.friedman(x)
    assert got.n == 3 and "dropped 1 row(s)" in got.note and "only n=3 data sets" in got.note
    assert got.chi2 == pytest.approx(sps.friedmanchisquare(*x[[0, 2, 3]].T).statistic)


def test_friedman_perfect_agreement_gives_infinite_f():
    x = np.tile([0.9, 0.8, 0.7], (6, 1))
    got = S.friedman(x)
    assert got.chi2 == pytest.approx(12.0) and got.f_stat == math.inf and got.f_pvalue == 0.0
    assert "Kendall's W = 1" in got.note


@settings(max_examples=60, deadline=None)
@given(hst.integers(2, 8), hst.integers(3, 6), hst.data())
def test_friedman_average_ranks_sum_to_k_k_plus_1_over_2(n, k, data):
    x = np.array(data.draw(hst.lists(hst.integers(0, 3), min_size=n * k, max_size=n * k)), float).reshape(n, k)
    got = S.friedman(x)
    assert sum(got.avg_ranks) == pytest.approx(k * (k + 1) / 2)
    assert all(1.0 <= r <= k for r in got.avg_ranks)
    assert math.isnan(got.pvalue) or 0.0 <= got.pvalue <= 1.0


# Demšar (2006), Table 5(a): Nemenyi q_0.05 for k = 2..10 (the table's 3rd decimal is not always rounded).
DEMSAR_Q05 = [1.960, 2.343, 2.569, 2.728, 2.850, 2.949, 3.031, 3.102, 3.164]


@pytest.mark.parametrize("k, q", list(zip(range(2, 11), DEMSAR_Q05)))
def test_nemenyi_q_matches_demsar_table5a(k, q):
    got = S.nemenyi_cd(k, 10)
    assert got.q_alpha == pytest.approx(q, abs=1e-3)
    assert got.cd == pytest.approx(got.q_alpha * math.sqrt(k * (k + 1) / 60))


def test_nemenyi_cd_demsar_example_and_degenerate():
    assert S.nemenyi_cd(4, 14).cd == pytest.approx(1.25, abs=5e-3)  # "CD = 2.569 sqrt(4*5/(6*14)) = 1.25"
    assert S.nemenyi_cd(4, 14, alpha=0.10).q_alpha == pytest.approx(2.291, abs=1e-3)  # Table 5(a), q_0.10
    assert math.isnan(S.nemenyi_cd(1, 14).cd) and "at least 2 methods" in S.nemenyi_cd(1, 14).note
    assert math.isnan(S.nemenyi_cd(4, 0).cd) and "at least 1 data set" in S.nemenyi_cd(4, 0).note


# ---------------------------------------------------------------------------------------------------------------
# Pairwise Wilcoxon + Holm
# ---------------------------------------------------------------------------------------------------------------

def test_pairwise_wilcoxon_holm_on_demsar_table6():
    got = S.pairwise_wilcoxon_holm(DEMSAR_TABLE6, DEMSAR_NAMES)
    assert [(r.method_a, r.method_b) for r in got.rows] == [
        ("C4.5", "C4.5+m"), ("C4.5", "C4.5+cf"), ("C4.5", "C4.5+m+cf"),
        ("C4.5+m", "C4.5+cf"), ("C4.5+m", "C4.5+m+cf"), ("C4.5+cf", "C4.5+m+cf")]
    raw = [S.wilcoxon(DEMSAR_TABLE6[:, i], DEMSAR_TABLE6[:, j]).pvalue for i, j in
           [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]]
    assert [r.pvalue for r in got.rows] == pytest.approx(raw)
    assert [r.p_adjusted for r in got.rows] == pytest.approx(S.holm(raw).adjusted)
    assert [r.significant for r in got.rows] == [p < 0.05 for p in S.holm(raw).adjusted]
    first = got.rows[0]  # C4.5 vs C4.5+m: 10 wins for C4.5+m, 2 ties dropped
    assert first.better == "C4.5+m" and first.n == 12 and first.significant
    frame = got.to_frame()
    assert list(frame.columns[:7]) == ["method_a", "method_b", "n", "statistic", "pvalue", "p_adjusted",
                                       "significant"]
    assert len(frame) == 6


def test_pairwise_respects_direction_and_handles_two_methods():
    errors = np.array([[0.10, 0.20], [0.11, 0.25], [0.09, 0.30], [0.12, 0.22], [0.10, 0.21], [0.13, 0.24]])
    got = S.pairwise_wilcoxon_holm(errors, ["a", "b"], higher_is_better=False)
    assert len(got.rows) == 1 and got.rows[0].better == "a"
    assert got.rows[0].p_adjusted == pytest.approx(got.rows[0].pvalue) == pytest.approx(2 / 2 ** 6)


def test_pairwise_underpowered_and_degenerate():
    x = np.array([[0.9, 0.8, 0.7], [0.8, 0.7, 0.6], [0.85, 0.8, 0.75], [0.7, 0.65, 0.6]])
    got = S.pairwise_wilcoxon_holm(x, ["a", "b", "c"])
    assert not any(r.significant for r in got.rows)
    assert "no pair can be declared significant" in got.note
    assert all("cannot reach p < 0.125" in r.note for r in got.rows)
    one = S.pairwise_wilcoxon_holm(x[:, :1], ["a"])
    assert one.rows == () and "no pairs" in one.note and len(one.to_frame()) == 0
    tied = S.pairwise_wilcoxon_holm(np.ones((5, 3)), ["a", "b", "c"])
    assert all(math.isnan(r.pvalue) and not r.significant and r.better == "" for r in tied.rows)
    assert "no pair has a non-zero difference" in tied.note
    with pytest.raises(ValueError, match="names"):
        S.pairwise_wilcoxon_holm(x, ["a", "b"])


# ---------------------------------------------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------------------------------------------

VALUES = np.array([0.812, 0.797, 0.825, 0.804, 0.818, 0.790, 0.831, 0.808, 0.800, 0.822, 0.815, 0.795])


@pytest.mark.parametrize("method, scipy_method", [("percentile", "percentile"), ("bca", "BCa"),
                                                  ("basic", "basic")])
def test_bootstrap_ci_matches_scipy(method, scipy_method):
    got = S.bootstrap_ci(VALUES, np.median, method=method, confidence=0.9, n_resamples=4000, seed=7)
    ref = sps.bootstrap((VALUES,), np.median, n_resamples=4000, confidence_level=0.9, method=scipy_method,
                        rng=np.random.default_rng(7))
    assert (got.ci_low, got.ci_high) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))
    assert got.standard_error == pytest.approx(ref.standard_error)
    assert got.estimate == pytest.approx(np.median(VALUES)) and got.n == 12 and got.note == ""


def test_bootstrap_ci_is_seeded():
    assert S.bootstrap_ci(VALUES, seed=3) == S.bootstrap_ci(VALUES, seed=3)
    assert S.bootstrap_ci(VALUES, seed=3).ci_low != S.bootstrap_ci(VALUES, seed=4).ci_low


@pytest.mark.parametrize("values, fragment", [
    ([0.8], "n=1"),
    ([0.8, 0.8, 0.8, 0.8], "all 4 values are equal"),
    ([], "no values"),
    ([np.nan, np.nan], "no values"),
])
def test_bootstrap_ci_degenerate(values, fragment):
    got = S.bootstrap_ci(values, method="bca")
    assert math.isnan(got.ci_low) and math.isnan(got.ci_high) and fragment in got.note


def test_bootstrap_ci_small_n_and_nan_notes():
    got = S.bootstrap_ci([0.8, np.nan, 0.82, 0.81], n_resamples=2000)
    assert got.n == 3 and got.ci_low <= got.estimate <= got.ci_high
    assert "dropped 1" in got.note and "under-cover" in got.note
    with pytest.raises(ValueError, match="unknown bootstrap method"):
        S.bootstrap_ci(VALUES, method="studentized")


# ---------------------------------------------------------------------------------------------------------------
# Δm%
# ---------------------------------------------------------------------------------------------------------------

def test_delta_m_hand_example():
    # task 0: accuracy 0.80 vs 0.75 -> +6.667 %; task 1: RMSE 2.0 vs 2.5 (lower is better) -> +20 %; mean 13.333
    got = S.delta_m([0.80, 2.0], [0.75, 2.5], [False, True])
    assert got.per_task == pytest.approx((100 * 0.05 / 0.75, 20.0))
    assert got.value == pytest.approx((100 * 0.05 / 0.75 + 20.0) / 2) and got.note == ""
    assert S.delta_m([0.75, 2.5], [0.75, 2.5], [False, True]).value == 0.0
    assert S.delta_m([0.70, 3.0], [0.75, 2.5], [False, True]).value < 0  # worse on both: negative


def test_delta_m_mappings_and_scalar_direction():
    got = S.delta_m({"ctr": 0.8, "cvr": 0.6}, {"cvr": 0.5, "ctr": 0.8}, False)
    assert got.tasks == ("ctr", "cvr") and got.value == pytest.approx(10.0)
    got = S.delta_m({"ctr": 0.8, "mse": 1.0}, {"ctr": 0.8, "mse": 2.0}, {"mse": True, "ctr": False})
    assert got.value == pytest.approx(25.0)


@pytest.mark.parametrize("method, baseline, fragment", [
    ([0.8, 2.0], [0.0, 2.5], "baseline is 0 for task(s) 0"),
    ([0.8, 2.0], [0.75, np.nan], "baseline missing or non-finite for task(s) 1"),
    ([0.8, 2.0], [0.75, None], "baseline missing or non-finite for task(s) 1"),
    ([np.nan, 2.0], [0.75, 2.5], "method value missing"),
    ({"a": 0.8, "b": 2.0}, {"a": 0.75}, "baseline missing or non-finite for task(s) b"),
    ([], [], "no tasks"),
])
def test_delta_m_undefined_gives_nan_and_a_note(method, baseline, fragment):
    got = S.delta_m(method, baseline, False)
    assert math.isnan(got.value) and fragment in got.note


def test_delta_m_negative_baseline_keeps_positive_as_better():
    got = S.delta_m([-1.0], [-2.0], [False])  # e.g. a log-likelihood: -1 beats -2
    assert got.value == pytest.approx(50.0) and "negative baseline" in got.note


RUNS = np.array([[0.80, 2.0], [0.82, 2.1], [0.79, 1.9], [0.81, 2.2], [0.78, 2.05], [0.83, 1.95]])
BASE = np.array([0.75, 2.5])
LIB = [False, True]


def test_bootstrap_delta_m_ci_estimate_and_linearity():
    got = S.bootstrap_delta_m_ci(RUNS, BASE, LIB, n_resamples=3000, seed=2)
    assert got.estimate == pytest.approx(S.delta_m(RUNS.mean(axis=0), BASE, LIB).value)
    assert got.ci_low < got.estimate < got.ci_high and got.n == 6
    # Δm% is linear in the per-task means: the same as bootstrapping the per-seed Δm% values with the same seed.
    per_seed = [S.delta_m(row, BASE, LIB).value for row in RUNS]
    ref = S.bootstrap_ci(per_seed, n_resamples=3000, seed=2)
    assert (got.ci_low, got.ci_high) == pytest.approx((ref.ci_low, ref.ci_high))
    # baseline runs are averaged per task
    base_runs = np.array([[0.74, 2.4], [0.76, 2.6]])
    assert S.bootstrap_delta_m_ci(RUNS, base_runs, LIB, n_resamples=3000, seed=2) == got


def test_bootstrap_delta_m_ci_bca_runs_and_is_seeded():
    a = S.bootstrap_delta_m_ci(RUNS, BASE, LIB, method="bca", n_resamples=2000, seed=0)
    assert a == S.bootstrap_delta_m_ci(RUNS, BASE, LIB, method="bca", n_resamples=2000, seed=0)
    assert a.method == "BCa" and a.ci_low < a.ci_high


@pytest.mark.parametrize("runs, base, fragment", [
    (RUNS[:1], BASE, "n=1 seed"),
    (np.tile(RUNS[0], (4, 1)), BASE, "all 4 seeds are identical"),
    (RUNS, [0.0, 2.5], "baseline is 0"),
    (np.full((3, 2), np.nan), BASE, "no complete seeds"),
])
def test_bootstrap_delta_m_ci_degenerate(runs, base, fragment):
    got = S.bootstrap_delta_m_ci(runs, base, LIB)
    assert math.isnan(got.ci_low) and fragment in got.note


def test_bootstrap_delta_m_ci_drops_nan_seeds():
    runs = np.vstack([RUNS, [[np.nan, 2.0]]])
    got = S.bootstrap_delta_m_ci(runs, BASE, LIB, n_resamples=1000)
    assert got.n == 6 and "dropped 1 seed(s)" in got.note


# ---------------------------------------------------------------------------------------------------------------
# CD diagram
# ---------------------------------------------------------------------------------------------------------------

def test_cd_cliques():
    demsar = {"C4.5": 3.143, "C4.5+m": 2.000, "C4.5+cf": 2.893, "C4.5+m+cf": 1.964}
    # Demšar: with CD = 1.25 the Nemenyi test cannot tell any of the four apart (3.143 - 1.964 < 1.25)
    assert S.cd_cliques(demsar, 1.25) == [("C4.5+m+cf", "C4.5+m", "C4.5+cf", "C4.5")]
    assert S.cd_cliques(demsar, 0.5) == [("C4.5+m+cf", "C4.5+m"), ("C4.5+cf", "C4.5")]
    ranks = {"a": 1.0, "b": 1.5, "c": 2.4, "d": 3.1, "e": 4.2}
    assert S.cd_cliques(ranks, 1.0) == [("a", "b"), ("b", "c"), ("c", "d")]
    # (b, c) lies inside (a, b, c): only maximal groups are kept
    assert S.cd_cliques({"a": 1.0, "b": 1.2, "c": 1.9, "d": 2.5}, 1.0) == [("a", "b", "c"), ("c", "d")]
    assert S.cd_cliques({"a": 2.0, "b": 2.0, "c": 2.0}, 0.1) == [("a", "b", "c")]
    assert S.cd_cliques(ranks, float("nan")) == []


@pytest.mark.parametrize("ranks", [
    {"a": 1.2, "b": 1.8},
    {"a": 1.5, "b": 1.9, "c": 2.6},
    {f"method-{i}": r for i, r in enumerate([1.4, 2.5, 3.1, 3.9, 4.6, 5.5, 7.0])},
    {"x": 2.0, "y": 2.0, "z": 2.0},
])
def test_critical_difference_diagram_writes_png(tmp_path, ranks):
    cd = S.nemenyi_cd(len(ranks), 10).cd
    out = P.critical_difference_diagram(ranks, cd, tmp_path / "cd.png", title="test")
    assert out == tmp_path / "cd.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_critical_difference_diagram_svg_and_bad_input(tmp_path):
    out = P.critical_difference_diagram({"a": 1.3, "b": 1.7}, float("nan"), tmp_path / "sub" / "cd.svg")
    assert b"<svg" in out.read_bytes()
    with pytest.raises(ValueError, match="format"):
        P.critical_difference_diagram({"a": 1.0, "b": 2.0}, 1.0, tmp_path / "cd.jpg")
    with pytest.raises(ValueError, match="finite"):
        P.critical_difference_diagram({"a": 1.0, "b": float("nan")}, 1.0, tmp_path / "cd.png")
