"""Reviewer statistics, each checked to 1e-6 against an independent implementation: the authors' baycomp, scipy,
or a plain re-derivation written here from the papers' formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats as sps

from mtlbench.results import stats as S

RNG = np.random.default_rng(7)


def _holm(p):  # written from Holm (1979), independently of the module
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def _bh(p):  # written from Benjamini & Hochberg (1995)
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out = [0.0] * m
    best = 1.0
    for rank in range(m - 1, -1, -1):
        i = order[rank]
        best = min(best, p[i] * m / (rank + 1))
        out[i] = best
    return out


@pytest.mark.parametrize("p", [[0.01, 0.04, 0.03, 0.2, 0.5], [0.001, 0.001, 0.9], list(RNG.uniform(0, 0.2, 12))])
def test_benjamini_hochberg_matches_its_definition(p):
    got = S.benjamini_hochberg(p)
    assert np.allclose(got.adjusted, _bh(p), atol=1e-12, rtol=0)
    assert got.reject == tuple(v < 0.05 for v in _bh(p))
    assert all(b <= h + 1e-15 for b, h in zip(got.adjusted, _holm(p)))  # BH never stricter than Holm


def test_control_comparison_demsar():
    x = RNG.normal(size=(14, 4)) + np.array([0.0, 0.3, 0.6, 0.9])
    res = S.control_comparison(x, ["a", "b", "c", "d"], "a")
    ranks = np.mean([sps.rankdata(-row) for row in x], axis=0)     # 1 = best
    se = math.sqrt(4 * 5 / (6 * 14))
    z = (ranks[1:] - ranks[0]) / se
    p = [2 * (1 - sps.norm.cdf(abs(v))) for v in z]
    assert np.allclose([r.z for r in res.rows], z, atol=1e-9)
    assert np.allclose([r.pvalue for r in res.rows], p, atol=1e-9)
    assert np.allclose([r.p_adjusted for r in res.rows], _holm(p), atol=1e-9)
    bd = S.control_comparison(x, ["a", "b", "c", "d"], "a", correction="bonferroni")
    # Bonferroni-Dunn = Demšar's CD with q = Phi^-1(1 - alpha / (2 (k - 1))): 2.394 for k = 4 (his Table 5b)
    q = sps.norm.ppf(1 - 0.05 / 6)
    assert q == pytest.approx(2.394, abs=5e-4)
    for r in bd.rows:
        assert r.significant == (abs(r.rank - bd.control_rank) > q * se)
    assert not res.note


def test_control_comparison_says_when_it_cannot_reject():
    res = S.control_comparison([[1, 2, 3], [2, 1, 3]], ["a", "b", "c"], "c")
    assert res.min_pvalue > 0.05 and "cannot reject at alpha=0.05" in res.note
    assert not any(r.significant for r in res.rows)


@pytest.mark.parametrize("rope", [0.01, 0.05])
def test_bayesian_signed_rank_matches_baycomp(rope):
    baycomp = pytest.importorskip("baycomp")
    a = RNG.normal(0.80, 0.02, 12)
    b = a - RNG.normal(0.015, 0.02, 12)
    got = S.bayesian_signed_rank(a, b, rope, n_samples=4000, seed=3)
    ref = baycomp.SignedRankTest.probs(a, b, rope, nsamples=4000, random_state=3)
    assert np.allclose((got.p_a, got.p_rope, got.p_b), ref, atol=1e-6)
    sample = baycomp.SignedRankTest.sample(a, b, rope, nsamples=4000, random_state=3)
    assert np.allclose(got.mean_masses, sample.mean(axis=0), atol=1e-6)


def test_bayesian_signed_rank_bad_rope():
    with pytest.raises(ValueError, match="rope"):
        S.bayesian_signed_rank([1.0, 2.0], [1.0, 2.0], 0.0)


def test_iqm_and_probability_of_improvement_point_estimates():
    a = RNG.normal(1.0, 1.0, size=(7, 5))
    b = RNG.normal(0.7, 1.0, size=(6, 5))
    assert S.iqm(a) == pytest.approx(sps.trim_mean(a.ravel(), 0.25), abs=1e-12)
    srt = np.sort(a.ravel())   # 35 values: trim_mean cuts int(0.25 * 35) = 8 from each end
    assert S.iqm(a) == pytest.approx(srt[8:-8].mean(), abs=1e-12)
    per_task = [sps.mannwhitneyu(a[:, t], b[:, t]).statistic / (7 * 6) for t in range(5)]
    assert S.probability_of_improvement(a, b) == pytest.approx(np.mean(per_task), abs=1e-12)
    tied = np.array([[1.0], [2.0]])
    assert S.probability_of_improvement(tied, tied) == pytest.approx(0.5)


def test_stratified_bootstrap_intervals_match_a_plain_loop():
    a = RNG.normal(1.0, 1.0, size=(6, 4))
    b = RNG.normal(0.5, 1.0, size=(5, 4))
    got = S.iqm_ci(a, n_resamples=300, seed=11)
    rng = np.random.default_rng(11)
    boot = []
    for _ in range(300):
        idx = rng.integers(0, 6, size=(6, 4))
        resampled = np.empty_like(a)
        for t in range(4):                       # each task (stratum) resampled on its own
            resampled[:, t] = a[idx[:, t], t]
        boot.append(sps.trim_mean(resampled.ravel(), 0.25))
    assert (got.ci_low, got.ci_high) == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])), abs=1e-6)
    assert got.ci_low <= got.estimate <= got.ci_high
    got = S.probability_of_improvement_ci(a, b, n_resamples=200, seed=5)
    rng = np.random.default_rng(5)
    boot = []
    for _ in range(200):
        ia, ib = rng.integers(0, 6, size=(6, 4)), rng.integers(0, 5, size=(5, 4))
        pis = []
        for t in range(4):
            x, y = a[ia[:, t], t], b[ib[:, t], t]
            pis.append(np.mean([(xi > yi) + 0.5 * (xi == yi) for xi in x for yi in y]))
        boot.append(np.mean(pis))
    assert (got.ci_low, got.ci_high) == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])), abs=1e-6)


def test_holm_wilcoxon_floor():
    f = S.holm_wilcoxon_floor([6, 6, 6, 6])
    assert f.floor == pytest.approx(4 * 2 / 2 ** 6) and "cannot reject" in f.note   # 0.125 >= 0.05
    assert not S.holm_wilcoxon_floor([10, 10]).note                                   # 2 * 2/1024 < 0.05


def test_one_tolerance_for_ties():
    x = [0.7, 0.1 + 0.2 + 0.4, 0.5]
    assert list(S.tie_ranks(x)) == [1.5, 1.5, 3.0]
    fr = S.friedman([[0.7, 0.1 + 0.2 + 0.4, 0.5], [0.3, 0.3, 0.2]])
    assert fr.avg_ranks == (1.5, 1.5, 3.0)
    w = S.wilcoxon([0.3, 0.1 + 0.2, 0.5], [0.3, 0.3, 0.4])   # two round-off zeros, one real difference
    assert w.n == 1 and w.n_zeros == 2


def test_delta_m_keeps_a_task_the_method_lacks():
    res = S.delta_m({"ctr": 0.75}, {"ctr": 0.70, "cvr": 0.60}, {"ctr": False, "cvr": False})
    assert math.isnan(res.value) and res.tasks == ("ctr", "cvr") and "cvr" in res.note
