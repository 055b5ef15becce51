"""Typed behaviour histories of the embedded dataset: no leakage, brute-force equality, unchanged 1.0 data."""
from __future__ import annotations

import hashlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlbench.errors import MtlbenchError
from mtlbench.registry import get
from mtlbench.tasks.ecommerce import BEHAVIOURS, behaviour_histories

SEQS = tuple(f"{b}_history" for b in BEHAVIOURS)


def _load(seed=0, **opts):
    e = get("dataset", "ecommerce")
    return e.obj(e.obj.Options(**{"n_rows": 3000, "n_users": 150, "n_items": 120, **opts})).load(seed)


def _log(data, key):
    """A tensor over the whole log (the splits are consecutive slices of it)."""
    return torch.cat([data.splits[s][key] for s in ("train", "val", "test")])


def _brute_force(user, item, flag, L):
    """Python loops (test only): per row, the same user's flagged items at earlier rows, newest first."""
    seen: dict[int, list[int]] = {}
    hist, lens = [], []
    for u, i, f in zip(user.tolist(), item.tolist(), flag.tolist()):
        past = seen.get(u, [])
        recent = past[::-1][:L]
        hist.append([v + 1 for v in recent] + [0] * (L - len(recent)))
        lens.append(len(recent))
        if f:
            seen.setdefault(u, []).append(i)
    return torch.tensor(hist, dtype=torch.long).reshape(len(lens), L), torch.tensor(lens, dtype=torch.long)


def test_schema_and_tensors():
    data = _load(max_seq_len=7)
    assert data.version == "1.1"
    assert [(s.name, s.of_field, s.max_len) for s in data.schema.sequences] == [(n, "item_id", 7) for n in SEQS]
    n_items = {f.name: f.vocab_size for f in data.schema.categorical}["item_id"]
    for split in data.splits.values():
        n = len(split)
        for name in SEQS:
            h, ln = split[name], split[name + "_len"]
            assert h.shape == (n, 7) and h.dtype == torch.int64 and ln.shape == (n,) and ln.dtype == torch.int64
            assert (h >= 0).all() and (h <= n_items).all()  # item_id + 1, 0 = padding
            pos = torch.arange(7)
            assert torch.equal(h > 0, pos < ln.unsqueeze(1)), "valid ids exactly at positions < length"
    assert set(data.describe()["schema"]["sequences"]) == set(SEQS)


def test_histories_equal_brute_force_on_the_log():
    """Recover each row's events from the labels and compare every history with a Python-loop reference."""
    data = _load(max_seq_len=5)
    cat, y = _log(data, "categorical"), _log(data, "labels")
    user, item = cat[:, 0], cat[:, 2]
    click, buy = y[:, 0].bool(), y[:, 2].bool()
    for name, flag in (("click_history", click), ("purchase_history", buy)):
        want_h, want_len = _brute_force(user, item, flag, 5)
        assert torch.equal(_log(data, name), want_h), name
        assert torch.equal(_log(data, name + "_len"), want_len), name


def test_no_leakage_for_random_rows():
    """Every item in a row's history is an event of that user, of the right type, at a strictly earlier row; the
    row's own event never appears in its own history."""
    data = _load(n_rows=4000, max_seq_len=10)
    cat, y = _log(data, "categorical"), _log(data, "labels")
    user, item = cat[:, 0].tolist(), cat[:, 2].tolist()
    click, buy = y[:, 0].bool().tolist(), y[:, 2].bool().tolist()
    hist = {b: _log(data, f"{b}_history").tolist() for b in BEHAVIOURS}
    rows = torch.randperm(len(user), generator=torch.Generator().manual_seed(0))[:300].tolist()
    for i in rows:
        # carts are not observable from the labels, but every cart is a clicked row: check against clicks
        for b, flag in (("click", click), ("cart", click), ("purchase", buy)):
            earlier_items = {item[j] for j in range(i) if user[j] == user[i] and flag[j]}
            for v in hist[b][i]:
                assert v == 0 or v - 1 in earlier_items, (b, i, v)
        # the most recent click before row i comes first; row i itself is not in its own history
        clicks_before = [j for j in range(i) if user[j] == user[i] and click[j]]
        if clicks_before:
            assert hist["click"][i][0] == item[clicks_before[-1]] + 1
        else:
            assert not any(hist["click"][i])


def test_cart_sits_between_click_and_purchase():
    data = _load(n_rows=20_000, n_users=500, n_items=300, max_seq_len=50)
    lens = {b: _log(data, f"{b}_history_len") for b in BEHAVIOURS}
    assert (lens["cart"] <= lens["click"]).all() and (lens["purchase"] <= lens["cart"]).all()
    assert (lens["cart"] > lens["purchase"]).any() and (lens["click"] > lens["cart"]).any()
    cvr = data.info["conversion_rate_given_click"]
    assert data.info["cart_rate_given_click"] == pytest.approx(cvr + (1 - cvr) * 0.3, abs=0.03)
    # a purchase history (uncapped) is a subsequence of the cart history: every purchase was carted
    ph, ch = _log(data, "purchase_history"), _log(data, "cart_history")
    for i in torch.nonzero(lens["cart"] < 50).squeeze(1)[:500].tolist():
        carts = ch[i, :lens["cart"][i]].tolist()
        it = iter(carts)
        assert all(v in it for v in ph[i, :lens["purchase"][i]].tolist()), i


def test_existing_data_unchanged():
    """Sequences add tensors but change nothing that version 1.0 produced (the cart draw comes last)."""
    a, b = _load(3), _load(3, sequences=False)
    assert b.schema.sequences == () and a.schema.categorical == b.schema.categorical
    for s in a.splits:
        assert set(b.splits[s].tensors) == {"categorical", "dense", "labels", "masks"}
        for k, v in b.splits[s].tensors.items():
            assert torch.equal(a.splits[s][k], v), (s, k)
    # fingerprint of version 1.0's integer tensors for seed 0 (computed with the 1.0 generator)
    e = get("dataset", "ecommerce")
    d = e.obj(e.obj.Options(n_rows=20_000)).load(0)
    digest = hashlib.sha256()
    for s in ("train", "val", "test"):
        for k in ("categorical", "labels", "masks"):
            digest.update(d.splits[s][k].contiguous().numpy().tobytes())
    assert digest.hexdigest()[:16] == FINGERPRINT_V10


FINGERPRINT_V10 = "9794986ca10e9046"


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), n_users=st.integers(1, 6), L=st.integers(1, 6), rate=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**31))
def test_vectorised_histories_match_brute_force(n, n_users, L, rate, seed):
    g = torch.Generator().manual_seed(seed)
    user, item = torch.randint(0, n_users, (n,), generator=g), torch.randint(0, 9, (n,), generator=g)
    flag = torch.rand(n, generator=g) < rate
    out = behaviour_histories(user, item, {"e": flag}, L)
    want_h, want_len = _brute_force(user, item, flag, L)
    assert torch.equal(out["e"], want_h) and torch.equal(out["e_len"], want_len)


@pytest.mark.parametrize("key,value", [("max_seq_len", 0), ("cart_rate", 1.5), ("cart_rate", -0.1)])
def test_bad_sequence_options(key, value):
    with pytest.raises(MtlbenchError, match=key) as info:
        get("dataset", "ecommerce").resolve_options({key: value})
    assert "\n" not in str(info.value)
