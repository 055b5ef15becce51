"""The embedded default dataset: a synthetic e-commerce impression log with a real click -> conversion funnel.

Each row is an impression of an item to a user. Generation (all seeded, vectorised, ~1 s for 200k rows):

- Users and items are drawn with power-law (Zipf) popularity: ``P(rank r) ~ r^-zipf_exponent``.
- Each user has a latent taste ``u`` = its segment's taste + an individual part; each item has a *click appeal*
  vector ``a`` = its category's vector + an individual part, and a *purchase appeal* vector
  ``b = relatedness * a + sqrt(1 - relatedness^2) * a'`` with ``a'`` drawn independently in the same way.
- ``relatedness`` (default 0.5) is therefore the cosine correlation between what makes a user click an item and
  what makes them buy it: 1.0 gives two tasks driven by the same preference, 0.0 unrelated ones.
- click ~ Bernoulli(sigmoid(b_c + s <u, a>/sqrt(k) + position + hour + device effects - 0.3 price + ...));
  conversion happens only after a click: conversion ~ click * Bernoulli(sigmoid(b_v + s <u, b>/sqrt(k)
  - 0.8 price + discount + segment purchase propensity)). The intercepts ``b_c``, ``b_v`` are solved so that
  the mean click rate and post-click conversion rate match ``ctr`` and ``cvr``.

Tasks: ``ctr`` (click, all impressions), ``cvr`` (conversion given click: defined on clicked impressions only,
masked elsewhere), ``ctcvr`` (click and conversion, all impressions). Splits are the first 70 % / next 15 % /
last 15 % of the log (rows are exchangeable, so this is also a random split). Dense features are standardised
with the training split's mean and standard deviation.

Behaviour sequences (version 1.1; ``sequences = True`` by default, ``max_seq_len`` = 20). The log order is time.
Three behaviour types per impression, all happening at that impression's time:

- ``click``: the impression was clicked;
- ``cart``: add-to-cart. A cart happens only after a click and precedes every purchase:
  ``cart = purchase or (click and U < cart_rate)``, ``U ~ Uniform(0, 1)`` drawn per row, so
  ``P(cart | click, no purchase) = cart_rate`` (default 0.3) and every purchase was carted. Carts are a behaviour
  signal only, not a task;
- ``purchase``: the impression was clicked and converted (the ``ctcvr`` label).

For each row and type ``b`` the split holds ``b_history`` (int64 ``[N, max_seq_len]``) and ``b_history_len``
(int64 ``[N]``): the items of that user's type-``b`` events at rows strictly before this row (earlier in the
log, any split: a validation row sees the training rows before it), the most recent first, at most
``max_seq_len`` of them, right-padded. Ids are ``item_id + 1`` so that 0 is the padding id: a value ``v > 0``
is item ``v - 1`` of the ``item_id`` field (``FeatureSchema.sequences`` names it as ``of_field``). A row's own
click, cart or purchase never appears in its own histories. The histories are built with sorts, cumulative
counts and gathers (no per-row Python), see :func:`behaviour_histories`.

Reproducibility: every draw of version 1.0 happens first and in the same order, so for a given seed all
features, labels and splits of 1.0 are bit-for-bit unchanged; the only new draw (the cart's ``U``) comes last.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mtlbench import (CategoricalField, DatasetAdapter, FeatureSchema, MtlbenchError, MultiTaskData,
                      SequenceField, Split, TaskSpec, option_field, register_dataset)

FIELDS = ("user_id", "user_segment", "item_id", "item_category", "item_brand", "device", "hour", "position")
DENSE = ("log_price", "discount", "user_activity", "item_popularity", "user_click_prior")
BEHAVIOURS = ("click", "cart", "purchase")


def _zipf(n: int, exponent: float, size: int, g: torch.Generator) -> torch.Tensor:
    """Ids in [0, n) with P(id of rank r) ~ r^-exponent; ranks are shuffled so ids carry no order."""
    p = torch.arange(1, n + 1, dtype=torch.float64).pow(-exponent)
    ranks = torch.multinomial(p / p.sum(), size, replacement=True, generator=g)
    return torch.randperm(n, generator=g)[ranks]


def behaviour_histories(user: torch.Tensor, item: torch.Tensor, events: dict[str, torch.Tensor],
                        max_len: int) -> dict[str, torch.Tensor]:
    """Per row and event type: the items of the same user's events at strictly earlier rows.

    ``user``, ``item``: int64 ``[N]`` in log (time) order; ``events``: name -> bool ``[N]`` (row i had that event).
    Returns ``name`` -> int64 ``[N, max_len]`` (``item + 1``, most recent first, 0-padded) and ``name + "_len"`` ->
    int64 ``[N]`` (``min(#earlier events, max_len)``). Vectorised: rows are sorted by (user, time) with a stable
    sort; in that order the number of type-b events strictly before a position is ``cumsum - self``, which is also
    the index in the (user, time)-sorted event list of the next type-b event, so the k-th most recent earlier
    event of the same user is event ``before - 1 - k``, valid while ``k`` is below that user's count.
    """
    n = user.numel()
    order = torch.sort(user, stable=True).indices
    u_sorted, i_sorted = user[order], item[order]
    first = torch.ones(n, dtype=torch.bool)
    first[1:] = u_sorted[1:] != u_sorted[:-1]
    group = first.long().cumsum(0) - 1  # user group of each sorted position
    group_start = first.nonzero().squeeze(1)  # sorted position of each group's first row
    steps = torch.arange(max_len)
    out: dict[str, torch.Tensor] = {}
    for name, flag in events.items():
        f = flag[order].long()
        before = f.cumsum(0) - f  # type-b events strictly before each sorted position, all users
        length = (before - before[group_start][group]).clamp(max=max_len)  # ... of this position's user
        row_before, row_length = torch.empty_like(before), torch.empty_like(length)
        row_before[order], row_length[order] = before, length  # back to log order (1-D, cheap)
        ev_item = torch.cat([torch.zeros(1, dtype=torch.long), i_sorted[f.bool()].long() + 1])  # slot 0: padding
        # the k-th most recent earlier event is event before-1-k, i.e. slot before-k; invalid k read slot 0
        slot = torch.where(steps < row_length.unsqueeze(1), row_before.unsqueeze(1) - steps, 0)
        out[name], out[name + "_len"] = ev_item[slot], row_length
    return out


def _solve_intercept(logit: torch.Tensor, target: float, weight: torch.Tensor | None = None) -> float:
    """b such that the (weighted) mean of sigmoid(logit + b) equals ``target`` (bisection, vectorised)."""
    lo, hi = -30.0, 30.0
    w = torch.ones_like(logit) if weight is None else weight
    for _ in range(60):
        mid = (lo + hi) / 2
        mean = float((torch.sigmoid(logit + mid) * w).sum() / w.sum())
        lo, hi = (mid, hi) if mean < target else (lo, mid)
    return (lo + hi) / 2


@register_dataset("ecommerce")
class EcommerceSynthetic(DatasetAdapter):
    """Embedded synthetic e-commerce impressions: ctr, cvr (on clicks), ctcvr; no download needed."""

    version = "1.1"
    tasks = ("ctr", "cvr", "ctcvr")
    default_training = {"epochs": 5, "batch_size": 1024, "lr": 2e-3}

    @classmethod
    def provided_features(cls, options) -> tuple[str, ...]:
        return ("sequences",) if options is None or options.sequences else ()

    @dataclass
    class Options:
        n_rows: int = option_field(200_000, "impressions in the log", minimum=1000)
        n_users: int = option_field(5_000, "users (Zipf popularity)", minimum=1)
        n_items: int = option_field(2_000, "items (Zipf popularity)", minimum=1)
        n_categories: int = option_field(100, "item categories", minimum=1)
        n_brands: int = option_field(400, "item brands", minimum=1)
        n_segments: int = option_field(20, "user segments (shared tastes)", minimum=1)
        latent_dim: int = option_field(8, "width of the latent tastes and appeals", minimum=1)
        zipf_exponent: float = option_field(1.05, "popularity: P(rank r) ~ r^-zipf_exponent", minimum=0)
        relatedness: float = option_field(0.5, "cosine of the click and purchase appeals", minimum=0, maximum=1)
        signal: float = option_field(2.0, "scale of the taste-appeal term in the logits", minimum=0)
        ctr: float = option_field(0.12, "mean click rate", minimum=0, maximum=1, open_minimum=True, open_maximum=True)
        cvr: float = option_field(0.2, "mean conversion rate given a click", minimum=0, maximum=1, open_minimum=True,
                                  open_maximum=True)
        data_seed: int | None = None
        sequences: bool = True
        max_seq_len: int = option_field(20, "length of the behaviour histories", minimum=1)
        cart_rate: float = option_field(0.3, "P(cart | click, no purchase)", minimum=0, maximum=1)

        def __post_init__(self) -> None:
            if self.max_seq_len < 1:
                raise ValueError(f"max_seq_len must be at least 1, got {self.max_seq_len}")
            if not 0.0 <= self.cart_rate <= 1.0:
                raise ValueError(f"cart_rate must be in [0, 1], got {self.cart_rate}")
            if not 0.0 <= self.relatedness <= 1.0:
                raise ValueError(f"relatedness must be in [0, 1], got {self.relatedness}")
            if self.n_rows < 1000:
                raise ValueError(f"n_rows must be at least 1000, got {self.n_rows}")
            for name in ("ctr", "cvr"):
                v = getattr(self, name)
                if not 0.0 < v < 1.0:
                    raise ValueError(f"{name} must be in (0, 1), got {v}")

    def load(self, seed: int) -> MultiTaskData:
        o = self.options or self.Options()
        g = torch.Generator().manual_seed(seed if o.data_seed is None else o.data_seed)
        n, k = o.n_rows, o.latent_dim
        randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731

        # entities
        user_segment = torch.randint(0, o.n_segments, (o.n_users,), generator=g)
        segment_taste = randn(o.n_segments, k)
        user_taste = 0.8 * segment_taste[user_segment] + 0.6 * randn(o.n_users, k)
        segment_buy = 0.5 * randn(o.n_segments)
        user_activity = randn(o.n_users)
        item_category = _zipf(o.n_categories, 0.8, o.n_items, g)
        item_brand = torch.randint(0, o.n_brands, (o.n_items,), generator=g)
        cat_click, cat_buy = randn(o.n_categories, k), randn(o.n_categories, k)
        click_appeal = 0.7 * cat_click[item_category] + 0.7 * randn(o.n_items, k)
        other_appeal = 0.7 * cat_buy[item_category] + 0.7 * randn(o.n_items, k)
        r = o.relatedness
        buy_appeal = r * click_appeal + math.sqrt(1.0 - r * r) * other_appeal
        brand_quality = 0.4 * randn(o.n_brands)
        log_price = 0.6 * randn(o.n_categories)[item_category] + 0.5 * randn(o.n_items)

        # impressions
        user = _zipf(o.n_users, o.zipf_exponent, n, g)
        item = _zipf(o.n_items, o.zipf_exponent, n, g)
        device = torch.multinomial(torch.tensor([0.55, 0.3, 0.1, 0.05]), n, replacement=True, generator=g)
        hour = torch.randint(0, 24, (n,), generator=g)
        position = torch.randint(0, 10, (n,), generator=g)
        discount = torch.rand(n, generator=g, dtype=torch.float64) * (torch.rand(n, generator=g) < 0.3)

        item_pop = torch.bincount(item, minlength=o.n_items).double()
        user_pop = torch.bincount(user, minlength=o.n_users).double()
        s = o.signal / math.sqrt(k)
        pos_effect = -0.12 * position.double()
        hour_effect = 0.3 * torch.sin(hour.double() / 24.0 * 2 * math.pi)
        device_effect = torch.tensor([0.0, 0.2, -0.2, -0.4], dtype=torch.float64)[device]
        click_logit = (s * (user_taste[user] * click_appeal[item]).sum(1) + pos_effect + hour_effect
                       + device_effect - 0.3 * log_price[item] + brand_quality[item_brand[item]]
                       + 0.3 * user_activity[user])
        buy_logit = (s * (user_taste[user] * buy_appeal[item]).sum(1) - 0.8 * log_price[item] + 1.0 * discount
                     + segment_buy[user_segment[user]] + 0.5 * brand_quality[item_brand[item]])
        click_logit = click_logit + _solve_intercept(click_logit, o.ctr)
        p_click = torch.sigmoid(click_logit)
        buy_logit = buy_logit + _solve_intercept(buy_logit, o.cvr, weight=p_click)
        click = torch.rand(n, generator=g, dtype=torch.float64) < p_click
        buy = click & (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(buy_logit))

        categorical = torch.stack([user, user_segment[user], item, item_category[item], item_brand[item], device,
                                   hour, position], dim=1).long()
        # a noisy, leakage-free prior of the user's click propensity (activity seen through noise)
        click_prior = user_activity[user] + 0.5 * randn(n)
        dense = torch.stack([log_price[item], discount, torch.log1p(user_pop[user]), torch.log1p(item_pop[item]),
                             click_prior], dim=1)
        labels = torch.stack([click, buy, buy], dim=1).float()
        masks = torch.stack([torch.ones(n, dtype=torch.bool), click, torch.ones(n, dtype=torch.bool)], dim=1)

        n_train, n_val = int(0.7 * n), int(0.15 * n)
        mean, std = dense[:n_train].mean(0), dense[:n_train].std(0).clamp(min=1e-12)
        dense = ((dense - mean) / std).float()
        cuts = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
        columns = {"categorical": categorical, "dense": dense, "labels": labels, "masks": masks}
        sequences: tuple[SequenceField, ...] = ()
        info = {}
        if o.sequences:  # the only draw added in 1.1, after every draw of 1.0
            cart = buy | (click & (torch.rand(n, generator=g, dtype=torch.float64) < o.cart_rate))
            hist = behaviour_histories(user, item, {f"{b}_history": e for b, e in
                                                    zip(BEHAVIOURS, (click, cart, buy))}, o.max_seq_len)
            columns.update(hist)
            sequences = tuple(SequenceField(f"{b}_history", "item_id", o.max_seq_len) for b in BEHAVIOURS)
            info = {"sequences": "item_id + 1 (0 = padding), most recent first, events strictly before the row",
                    "cart_rate_given_click": float(cart.double().sum() / click.double().sum().clamp(min=1))}
        splits = {name: Split({k: v[a:b] for k, v in columns.items()}) for name, (a, b) in cuts.items()}
        vocab = (o.n_users, o.n_segments, o.n_items, o.n_categories, o.n_brands, 4, 24, 10)
        schema = FeatureSchema(categorical=tuple(CategoricalField(f, v) for f, v in zip(FIELDS, vocab)), dense=DENSE,
                               sequences=sequences)
        tasks = (
            TaskSpec("ctr", "binary", ("auc", "logloss"), group="click", description="click | impression"),
            TaskSpec("cvr", "binary", ("auc", "logloss"), group="conversion",
                     description="conversion | click (masked on unclicked impressions)"),
            TaskSpec("ctcvr", "binary", ("auc", "logloss"), group="conversion",
                     description="click and conversion | impression"),
        )
        if not bool(click.any()):
            raise MtlbenchError("ecommerce: the generated log has no clicks; raise n_rows or ctr")
        return MultiTaskData("ecommerce", self.version, schema, tasks, splits,
                             {"split": "70/15/15 by log order", "click_rate": float(click.double().mean()),
                              "conversion_rate_given_click": float(buy.double().sum() / click.double().sum()),
                              **info})
