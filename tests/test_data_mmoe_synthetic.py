"""The MMoE synthetic dataset: controlled weight cosine, p = 1 differs only by noise, shapes, determinism."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlbench.cli import main
from mtlbench.errors import MtlbenchError
from mtlbench.registry import get, names
from mtlbench.tasks.mmoe_synthetic import label_function, task_weights, unit_vectors


def _load(seed=0, **opts):
    e = get("dataset", "mmoe_synthetic")
    return e.obj(e.obj.Options(**{"n_rows": 1200, **opts})).load(seed)


def _all(data, key):
    return torch.cat([data.splits[s][key] for s in ("train", "val", "test")])


def test_registered_with_regression_tasks():
    assert "mmoe_synthetic" in names("dataset")
    data = _load()
    assert data.task_names == ("y1", "y2")
    for t in data.tasks:
        assert t.kind == "regression" and t.loss == "mse" and t.primary_metric == "rmse"


def test_default_shapes_and_split():
    data = _load(n_rows=12_000)
    assert {s: len(v) for s, v in data.splits.items()} == {"train": 10_000, "val": 1_000, "test": 1_000}
    assert data.schema.n_categorical == 0 and data.schema.n_dense == 100 and data.schema.sequences == ()
    tr = data.splits["train"]
    assert tr["dense"].shape == (10_000, 100) and tr["dense"].dtype == torch.float32
    assert tr["categorical"].shape == (10_000, 0) and tr["categorical"].dtype == torch.int64
    assert tr["labels"].shape == (10_000, 2) and tr["masks"].all()
    x = tr["dense"]
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1.0) < 0.01  # x ~ N(0, I)
    assert len(data.info["alpha"]) == len(data.info["beta"]) == 10


@settings(max_examples=60, deadline=None)
@given(p=st.floats(-1.0, 1.0), d=st.integers(2, 64), c=st.floats(0.01, 10.0), seed=st.integers(0, 2**31))
def test_weight_cosine_is_p(p, d, c, seed):
    u1, u2 = unit_vectors(d, torch.Generator().manual_seed(seed))
    assert abs(float(u1 @ u2)) < 1e-12 and abs(float(u1.norm()) - 1) < 1e-12 and abs(float(u2.norm()) - 1) < 1e-12
    w1, w2 = task_weights(u1, u2, c, p)
    assert float(w1 @ w2 / (w1.norm() * w2.norm())) == pytest.approx(p, abs=1e-9)
    assert float(w1.norm()) == pytest.approx(c, rel=1e-9) and float(w2.norm()) == pytest.approx(c, rel=1e-9)


@pytest.mark.parametrize("p", [-1.0, -0.3, 0.0, 0.5, 0.9, 1.0])
def test_cosine_recovered_from_the_data(p):
    """Without sines and noise the labels are w_i^T x: least squares on the data recovers w1, w2 and their
    empirical cosine is p."""
    data = _load(correlation=p, n_sin=0, noise_std=0.0, input_dim=20, scale=0.7)
    x, y = _all(data, "dense").double(), _all(data, "labels").double()
    w = torch.linalg.lstsq(x, y).solution  # [d, 2]
    cos = float(w[:, 0] @ w[:, 1] / (w[:, 0].norm() * w[:, 1].norm()))
    assert cos == pytest.approx(p, abs=1e-5)
    assert data.info["weight_cosine"] == pytest.approx(p, abs=1e-12)
    assert float(w[:, 0].norm()) == pytest.approx(0.7, rel=1e-5)


def test_p1_labels_differ_only_by_noise():
    exact = _load(correlation=1.0, noise_std=0.0)
    y = _all(exact, "labels")
    assert torch.equal(y[:, 0], y[:, 1])
    noisy = _load(correlation=1.0, noise_std=0.1, n_rows=24_000)
    y = _all(noisy, "labels").double()
    diff = y[:, 0] - y[:, 1]
    assert float(diff.std()) == pytest.approx(0.1 * math.sqrt(2), rel=0.03)  # eps1 - eps2
    assert abs(float(diff.mean())) < 0.005
    x = _all(noisy, "dense").double()
    assert float((x.T @ diff).abs().max() / len(diff)) < 0.01  # the difference carries no signal of x
    # the same x, alpha, beta and noise draws with p < 1: the tasks now differ beyond the noise
    other = _all(_load(correlation=0.5, noise_std=0.1, n_rows=24_000), "labels").double()
    assert float((other[:, 0] - other[:, 1]).std()) > 5 * float(diff.std())


def test_label_function_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    a, b = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    got = label_function(x, w, a, b)
    for i in range(5):
        z = float(x[i] @ w)
        want = z + sum(math.sin(float(a[j]) * z + float(b[j])) for j in range(4))
        assert float(got[i]) == pytest.approx(want, abs=1e-12)


def test_noise_level_and_label_correlation_follow_p():
    """Residual of the noiseless label function is the noise; label correlation rises with p."""
    data = _load(correlation=0.5, n_rows=12_000)
    corr = {p: _load(correlation=p, n_rows=12_000).info["label_pearson_train"] for p in (0.0, 0.5, 1.0)}
    assert corr[0.0] < corr[0.5] < corr[1.0] and corr[1.0] > 0.99 and abs(corr[0.0]) < 0.05
    assert data.info["label_pearson_train"] == corr[0.5]


def test_deterministic_and_data_seed():
    a, b, c = _load(0), _load(0), _load(1)
    for k in ("dense", "labels"):
        assert torch.equal(_all(a, k), _all(b, k))
    assert not torch.equal(_all(a, "labels"), _all(c, "labels"))
    assert a.info["alpha"] == b.info["alpha"] != c.info["alpha"]
    d = _load(5, data_seed=1)
    assert torch.equal(_all(d, "labels"), _all(c, "labels"))


@pytest.mark.parametrize("key,value", [("correlation", 1.5), ("correlation", -1.01), ("n_rows", 10),
                                       ("input_dim", 1), ("n_sin", -1), ("noise_std", -0.1), ("scale", 0.0)])
def test_bad_options(key, value):
    with pytest.raises(MtlbenchError, match=key) as info:
        get("dataset", "mmoe_synthetic").resolve_options({key: value})
    assert "\n" not in str(info.value)


def test_cli_run_mmoe(tmp_path, capsys):
    code = main(["run", "--dataset", "mmoe_synthetic", "--arch", "mmoe", "-D", "n_rows=1200", "-D", "correlation=0.9",
                 "--epochs", "2", "--embed-dim", "32", "--quiet", "--results-dir", str(tmp_path)])
    assert code == 0
    (path,) = tmp_path.glob("*.json")
    rec = json.loads(path.read_text())
    assert rec["status"] == "ok" and rec["spec"]["dataset_options"]["correlation"] == 0.9
    assert rec["dataset"]["weight_cosine"] == pytest.approx(0.9)
    for t in ("y1", "y2"):
        assert math.isfinite(rec["metrics"]["test"][t]["rmse"]) and "mae" in rec["metrics"]["test"][t]
