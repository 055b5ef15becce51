"""Metrics against brute-force / reference definitions (numpy, scipy), and mask handling in evaluate_task."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from mtlbench import registry
from mtlbench.metrics import (LOGLOSS_EPS, accuracy, auc, average_ranks, evaluate_task, logloss, mae, metric,
                              rmse)

HYP = settings(max_examples=60, deadline=None, derandomize=True)


def brute_auc(y, s) -> float:
    """O(P*N) definition: over all (positive, negative) pairs, 1 if pos > neg, 0.5 if tied, divided by P*N."""
    pos = [si for yi, si in zip(y, s) if yi > 0.5]
    neg = [si for yi, si in zip(y, s) if yi <= 0.5]
    if not pos or not neg:
        return math.nan
    total = 0.0
    for p in pos:
        for n in neg:
            total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (len(pos) * len(neg))


# rows of (label, score), scores on a coarse 0.1 grid so that ties are frequent
tied_rows = st.lists(st.tuples(st.integers(0, 1), st.integers(0, 10).map(lambda k: round(k / 10, 1))),
                     min_size=1, max_size=60)


# ------------------------------------------------------------------------------------------------------ auc

@HYP
@given(tied_rows)
def test_auc_matches_brute_force_with_ties(rows):
    y = [r[0] for r in rows]
    s = [r[1] for r in rows]
    got = auc(torch.tensor(y, dtype=torch.float32), torch.tensor(s, dtype=torch.float32))
    want = brute_auc(y, s)
    if math.isnan(want):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(want, abs=1e-12)


@HYP
@given(tied_rows)
def test_auc_matches_mann_whitney_u(rows):
    y = np.array([r[0] for r in rows])
    s = np.array([r[1] for r in rows], dtype=np.float64)
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return
    u = stats.mannwhitneyu(pos, neg, alternative="two-sided").statistic
    got = auc(torch.from_numpy(y.astype(np.float32)), torch.from_numpy(s))
    assert got == pytest.approx(u / (len(pos) * len(neg)), abs=1e-12)


def test_auc_random_continuous_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(2, 200, (1,), generator=g))
        y = (torch.rand(n, generator=g) < 0.3).float()
        s = torch.rand(n, generator=g)
        assert auc(y, s) == pytest.approx(brute_auc(y.tolist(), s.tolist()), abs=1e-12)


def test_auc_hand_cases():
    y = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert auc(y, torch.tensor([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auc(y, torch.tensor([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert auc(y, torch.full((4,), 0.3)) == 0.5
    # one tie between a positive and a negative: 3 wins + 0.5 out of 4 pairs
    assert auc(y, torch.tensor([0.1, 0.5, 0.5, 0.9])) == pytest.approx(3.5 / 4)
    assert math.isnan(auc(torch.ones(5), torch.rand(5)))
    assert math.isnan(auc(torch.zeros(5), torch.rand(5)))


def test_auc_accepts_column_shaped_inputs():
    y = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    s = torch.tensor([[0.2], [0.7], [0.4], [0.3]])
    assert auc(y, s) == pytest.approx(brute_auc(y.reshape(-1).tolist(), s.reshape(-1).tolist()))


# ----------------------------------------------------------------------------------------------- ranks

@HYP
@given(st.lists(st.integers(-5, 5).map(lambda k: k / 2), min_size=1, max_size=80))
def test_average_ranks_equals_scipy_rankdata(values):
    x = torch.tensor(values, dtype=torch.float64)
    np.testing.assert_allclose(average_ranks(x).numpy(), stats.rankdata(values, method="average"), atol=1e-12)


def test_average_ranks_continuous():
    x = torch.randn(500, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    np.testing.assert_allclose(average_ranks(x).numpy(), stats.rankdata(x.numpy(), method="average"))


# -------------------------------------------------------------------------------------------- logloss etc.

def np_binary_logloss(y, p):
    p = np.clip(np.asarray(p, dtype=np.float64), LOGLOSS_EPS, 1 - LOGLOSS_EPS)
    y = np.asarray(y, dtype=np.float64)
    return float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))


def test_logloss_binary_matches_numpy():
    g = torch.Generator().manual_seed(2)
    y = (torch.rand(300, generator=g) < 0.4).float()
    p = torch.rand(300, generator=g).clamp(0.01, 0.99)
    assert logloss(y, p) == pytest.approx(np_binary_logloss(y.numpy(), p.numpy()), rel=1e-9)
    # a [N, 1] column of probabilities is binary, not multiclass
    assert logloss(y, p.reshape(-1, 1)) == pytest.approx(logloss(y, p), rel=1e-12)


def test_logloss_binary_hand_value():
    y = torch.tensor([1.0, 0.0])
    p = torch.tensor([0.8, 0.4])
    assert logloss(y, p) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2, rel=1e-6)


def test_logloss_finite_at_exact_zero_and_one():
    # confidently wrong: clipped at 1e-15, so each row costs about -log(1e-15) = 34.54 (1 - 1e-15 is not exact
    # in float64, hence the loose tolerance)
    wrong = logloss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert math.isfinite(wrong)
    assert wrong == pytest.approx(-math.log(LOGLOSS_EPS), rel=1e-4)
    assert logloss(torch.tensor([1.0]), torch.tensor([0.0])) == pytest.approx(-math.log(LOGLOSS_EPS), rel=1e-12)
    # confidently right: (almost) zero, not NaN
    right = logloss(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert math.isfinite(right) and 0.0 <= right < 1e-12


def test_logloss_multiclass_matches_numpy():
    g = torch.Generator().manual_seed(3)
    n, c = 200, 5
    p = torch.softmax(torch.randn(n, c, generator=g), dim=1)
    y = torch.randint(0, c, (n,), generator=g).float()  # class index stored as float, as in the data contract
    pn = p.double().numpy()
    want = float(np.mean(-np.log(pn[np.arange(n), y.long().numpy()])))
    assert logloss(y, p) == pytest.approx(want, rel=1e-6)


def test_logloss_multiclass_finite_with_exact_zero():
    y = torch.tensor([0.0, 2.0])
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    out = logloss(y, p)
    assert math.isfinite(out)
    assert out == pytest.approx(-math.log(LOGLOSS_EPS) / 2, rel=1e-6)


def test_accuracy_binary_and_multiclass():
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    p = torch.tensor([0.5, 0.49, 0.2, 0.7, 0.99])  # threshold is >= 0.5
    assert accuracy(y, p) == pytest.approx(3 / 5)
    g = torch.Generator().manual_seed(4)
    probs = torch.rand(100, 4, generator=g)
    labels = torch.randint(0, 4, (100,), generator=g)
    want = float((probs.argmax(1) == labels).double().mean())
    assert accuracy(labels.float(), probs) == pytest.approx(want)


def test_rmse_mae_match_numpy():
    g = torch.Generator().manual_seed(5)
    y = torch.randn(250, generator=g)
    p = torch.randn(250, generator=g)
    d = p.double().numpy() - y.double().numpy()
    assert rmse(y, p) == pytest.approx(float(np.sqrt(np.mean(d * d))), rel=1e-9)
    assert mae(y, p) == pytest.approx(float(np.mean(np.abs(d))), rel=1e-9)
    assert rmse(torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0])) == pytest.approx(math.sqrt(12.5))
    assert mae(torch.tensor([0.0, 0.0]), torch.tensor([3.0, -4.0])) == pytest.approx(3.5)
    # [N, 1] predictions against [N] labels: no broadcasting to [N, N]
    assert rmse(y, p.reshape(-1, 1)) == pytest.approx(rmse(y, p), rel=1e-12)


@pytest.mark.parametrize("fn", [logloss, accuracy, rmse, mae])
def test_empty_input_is_nan(fn):
    assert math.isnan(fn(torch.zeros(0), torch.zeros(0)))


# --------------------------------------------------------------------------------------------- evaluate_task

def test_evaluate_task_ignores_masked_rows_binary():
    g = torch.Generator().manual_seed(6)
    n = 400
    y = (torch.rand(n, generator=g) < 0.3).float()
    p = torch.rand(n, generator=g)
    mask = torch.rand(n, generator=g) < 0.6
    names = ("auc", "logloss", "accuracy")
    want = {m: metric(m)(y[mask], p[mask]) for m in names}
    # garbage where the label is undefined: impossible labels and predictions
    y_bad, p_bad = y.clone(), p.clone()
    y_bad[~mask] = 7.0
    p_bad[~mask] = float("nan")
    got = evaluate_task(names, y_bad.reshape(-1, 1), p_bad, mask.reshape(-1, 1))
    assert got == pytest.approx(want, rel=1e-12)
    assert all(math.isfinite(v) for v in got.values())
    # a different garbage gives the same result
    p_bad[~mask] = 1.0
    y_bad[~mask] = 0.0
    assert evaluate_task(names, y_bad, p_bad, mask) == pytest.approx(want, rel=1e-12)


def test_evaluate_task_ignores_masked_rows_regression_and_multiclass():
    g = torch.Generator().manual_seed(7)
    n = 120
    mask = torch.rand(n, generator=g) < 0.5
    y = torch.randn(n, generator=g)
    p = torch.randn(n, generator=g)
    y_bad, p_bad = y.clone(), p.clone()
    y_bad[~mask], p_bad[~mask] = 1e6, -1e6
    got = evaluate_task(("rmse", "mae"), y_bad, p_bad, mask)
    assert got == pytest.approx({"rmse": rmse(y[mask], p[mask]), "mae": mae(y[mask], p[mask])}, rel=1e-12)

    c = 3
    probs = torch.softmax(torch.randn(n, c, generator=g), 1)
    labels = torch.randint(0, c, (n,), generator=g).float()
    probs_bad, labels_bad = probs.clone(), labels.clone()
    probs_bad[~mask] = 0.0
    labels_bad[~mask] = 99.0  # out of range class index: would crash gather if it were used
    got = evaluate_task(("logloss", "accuracy"), labels_bad, probs_bad, mask)
    want = {"logloss": logloss(labels[mask], probs[mask]), "accuracy": accuracy(labels[mask], probs[mask])}
    assert got == pytest.approx(want, rel=1e-12)


def test_evaluate_task_all_masked_gives_nan():
    out = evaluate_task(("auc", "logloss"), torch.ones(4), torch.rand(4), torch.zeros(4, dtype=torch.bool))
    assert math.isnan(out["auc"]) and math.isnan(out["logloss"])


# ------------------------------------------------------------------------------------------------ registry

@pytest.mark.parametrize("name,direction", [("auc", "max"), ("accuracy", "max"), ("logloss", "min"),
                                            ("rmse", "min"), ("mae", "min")])
def test_metric_directions(name, direction):
    assert registry.get("metric", name).obj.direction == direction
    assert metric(name).direction == direction
