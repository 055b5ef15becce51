"""The embedded dataset: a real funnel, seeded generation, documented relatedness."""
from __future__ import annotations

import math

import pytest
import torch

from mtlbench.errors import MtlbenchError
from mtlbench.registry import get


def _load(seed=0, **opts):
    e = get("dataset", "ecommerce")
    return e.obj(e.obj.Options(**{"n_rows": 20_000, **opts})).load(seed)


def test_funnel_masks_and_labels():
    data = _load()
    assert data.task_names == ("ctr", "cvr", "ctcvr")
    for split in data.splits.values():
        y, m = split["labels"], split["masks"]
        click, conv, ctcvr = y[:, 0], y[:, 1], y[:, 2]
        assert m[:, 0].all() and m[:, 2].all()
        assert torch.equal(m[:, 1], click.bool()), "cvr is defined exactly on clicked impressions"
        assert not (conv.bool() & ~click.bool()).any(), "no conversion without a click"
        assert torch.equal(ctcvr, click * conv)


def test_rates_match_targets():
    data = _load(n_rows=100_000)
    assert data.info["click_rate"] == pytest.approx(0.12, abs=0.01)
    assert data.info["conversion_rate_given_click"] == pytest.approx(0.2, abs=0.02)


def test_seeded_and_sizes():
    a, b, c = _load(0), _load(0), _load(1)
    for k in ("categorical", "dense", "labels"):
        assert torch.equal(a.splits["train"][k], b.splits["train"][k])
    assert not torch.equal(a.splits["train"]["labels"], c.splits["train"]["labels"])
    assert {s: len(v) for s, v in a.splits.items()} == {"train": 14_000, "val": 3_000, "test": 3_000}
    d = _load(0, data_seed=1)
    assert torch.equal(d.splits["train"]["labels"], c.splits["train"]["labels"])


def test_ids_within_vocab_and_dense_standardised():
    data = _load()
    cat = torch.cat([s["categorical"] for s in data.splits.values()])
    vocab = torch.tensor([f.vocab_size for f in data.schema.categorical])
    assert (cat >= 0).all() and (cat < vocab).all()
    dense = data.splits["train"]["dense"]
    torch.testing.assert_close(dense.mean(0), torch.zeros(dense.shape[1]), atol=1e-4, rtol=0)
    assert torch.isfinite(dense).all()


def test_popularity_is_power_law():
    data = _load(n_rows=50_000)
    items = data.splits["train"]["categorical"][:, 2]
    counts = torch.bincount(items).sort(descending=True).values.double()
    # the most popular item is seen far more often than the median one
    assert counts[0] > 20 * counts[len(counts) // 2]


def _corr_of_tasks(relatedness):
    """Correlation between click and post-click conversion propensity at the item level."""
    data = _load(n_rows=100_000, relatedness=relatedness, signal=3.0)
    tr = data.splits["train"]
    item = tr["categorical"][:, 2]
    n = int(item.max()) + 1
    imp = torch.bincount(item, minlength=n).double()
    clicks = torch.bincount(item, weights=tr["labels"][:, 0].double(), minlength=n)
    convs = torch.bincount(item, weights=tr["labels"][:, 1].double(), minlength=n)
    keep = clicks >= 20
    ctr, cvr = clicks[keep] / imp[keep], convs[keep] / clicks[keep]
    return float(torch.corrcoef(torch.stack([ctr, cvr]))[0, 1])


def test_relatedness_controls_task_correlation():
    assert _corr_of_tasks(1.0) > _corr_of_tasks(0.0) + 0.1


def test_bad_options():
    e = get("dataset", "ecommerce")
    for key, value in (("relatedness", 1.5), ("ctr", 0.0), ("n_rows", 10), ("max_seq_len", 0), ("cart_rate", 2.0)):
        with pytest.raises(MtlbenchError, match=key):
            e.resolve_options({key: value})
