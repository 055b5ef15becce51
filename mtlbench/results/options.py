"""The leaderboard's statistical settings, declared once: their defaults, valid values, help texts and the
`mtlbench leaderboard` flags made from them.

Every test and interval the leaderboard shows reads its settings from one :class:`StatOptions`; the tables' notes
print the values used, so a table says how it was tested. A bad value is refused with one line naming it and the
valid choices before any record is read. Defaults and why:

- ``alpha`` 0.05: the usual significance level (the † mark, the significance tables, the across-dataset tests).
- ``correction`` ``holm``: Holm's step-down (controls the family-wise error rate, Holm 1979); ``bh`` is
  Benjamini-Hochberg (controls the false discovery rate, 1995), more powerful with many comparisons.
- ``rope`` 0.1: the Bayesian signed-rank test's region of practical equivalence, in Δm% points (the mean signed
  relative change over the Δm% metrics, in %): two methods within 0.1 % of each other are practically equivalent
  (about 0.001 AUC at AUC 0.8, the difference CTR papers call significant).
- ``bayes_prior`` 0.5 and ``bayes_samples`` 50000: the prior pseudo-observation's weight and the posterior sample
  count of the authors' ``baycomp`` defaults (Benavoli et al. 2017). ``bayes_min_pairs`` 3: with one seed the
  posterior depends only on the sign of the one difference (every method then reads 0.00 / 0.16 / 0.84), with two
  the prior still weighs 20 %; below 3 shared seeds the test is not shown, and the table says so.
- ``confidence`` 0.95 and ``bootstrap_resamples`` 2000: the stratified percentile bootstrap intervals (Agarwal
  et al. 2021). rliable's ``get_interval_estimates`` draws 50000 by default; 2000 keeps a leaderboard of ~100
  methods to seconds, and with 3-5 runs per task the interval's width is dominated by the runs, not the draws.
- ``stat_seed`` 0: the seed of every resampling and posterior draw, so the same records give the same bytes.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from mtlbench.errors import MtlbenchError, unknown

CORRECTIONS = ("holm", "bh")
CORRECTION_NAMES = {"holm": "Holm", "bh": "Benjamini-Hochberg"}
CORRECTION_SHORT = {"holm": "Holm", "bh": "BH"}   # for column headers


def _opt(default: Any, help: str, *, kind: type = float, choices: tuple[str, ...] = (), low: float | None = None,
         high: float | None = None, open_low: bool = False, open_high: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "kind": kind, "choices": choices, "low": low,
                                            "high": high, "open_low": open_low, "open_high": open_high})


@dataclass(frozen=True)
class StatOptions:
    """The statistical settings of one leaderboard (module docstring: the defaults and why)."""

    alpha: float = _opt(0.05, "significance level of every test and of the † mark", low=0, high=0.5,
                        open_low=True, open_high=True)
    correction: str = _opt("holm", "multiple-comparison correction within a table and across datasets: holm "
                           "(family-wise error) or bh (Benjamini-Hochberg, false discovery rate)", kind=str,
                           choices=CORRECTIONS)
    rope: float = _opt(0.1, "Bayesian signed-rank test: half-width of the region of practical equivalence, in "
                       "Δm%% points", low=0, open_low=True)
    bayes_prior: float = _opt(0.5, "Bayesian signed-rank test: weight of the prior pseudo-observation at 0",
                              low=0, open_low=True)
    bayes_samples: int = _opt(50000, "Bayesian signed-rank test: posterior samples", kind=int, low=1000)
    bayes_min_pairs: int = _opt(3, "Bayesian signed-rank test: fewest shared seeds it is shown for", kind=int,
                                low=1)
    confidence: float = _opt(0.95, "level of the bootstrap intervals (IQM, probability of improvement)", low=0.5,
                             high=1, open_high=True)
    bootstrap_resamples: int = _opt(2000, "stratified bootstrap resamples", kind=int, low=100)
    stat_seed: int = _opt(0, "seed of the bootstrap and posterior draws", kind=int, low=0)

    def __post_init__(self) -> None:
        for f in fields(self):
            check(f.name, getattr(self, f.name))

    @property
    def correction_name(self) -> str:
        return CORRECTION_NAMES[self.correction]

    @property
    def correction_short(self) -> str:
        return CORRECTION_SHORT[self.correction]

    def with_(self, **changes: Any) -> "StatOptions":
        return replace(self, **changes)




def check(name: str, value: Any) -> None:
    """Raise one line if ``value`` is not valid for the setting ``name``."""
    meta = {f.name: f.metadata for f in fields(StatOptions)}.get(name)
    if meta is None:
        raise unknown("statistics setting", name, [f.name for f in fields(StatOptions)])
    if meta["choices"]:
        if value not in meta["choices"]:
            raise unknown(name.replace("_", "-"), value, meta["choices"])
        return
    kind = meta["kind"]
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        kind is float or float(value).is_integer())
    if not ok_type or not math.isfinite(float(value)):
        raise MtlbenchError(f"{name.replace('_', '-')} {value!r} is not {'an integer' if kind is int else 'a number'}")
    low, high = meta["low"], meta["high"]
    bad_low = low is not None and (value <= low if meta["open_low"] else value < low)
    bad_high = high is not None and (value >= high if meta["open_high"] else value > high)
    if bad_low or bad_high:
        lo = "" if low is None else f"{'>' if meta['open_low'] else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if meta['open_high'] else '<='} {high:g}"
        raise MtlbenchError(f"{name.replace('_', '-')} {value!r} is out of range: it must be "
                            + " and ".join(x for x in (lo, hi) if x))


DEFAULTS = StatOptions()
#: The flags of `mtlbench leaderboard` that set these (the rest keep their defaults; set them from Python).
FLAGS = ("alpha", "correction", "rope")
#: Those of `mtlbench compare` (paired tests of two methods: no Bayesian test there).
COMPARE_FLAGS = ("alpha", "correction")


def add_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] = FLAGS) -> None:
    """Statistics flags, from the declarations above (values are checked by :func:`from_args`, so a bad one gets
    the same line as from Python)."""
    for f in fields(StatOptions):
        if f.name not in names:
            continue
        meta = f.metadata
        extra = f"; one of {', '.join(meta['choices'])}" if meta["choices"] else ""
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f"stat_{f.name}", default=None,
                            help=f"{meta['help']} (default {f.default}{extra})")


def from_args(args: argparse.Namespace) -> StatOptions:
    """The settings given on the command line (strings), parsed and checked; the rest at their defaults."""
    given: dict[str, Any] = {}
    for f in fields(StatOptions):
        text = getattr(args, f"stat_{f.name}", None)
        if text is None:
            continue
        kind = f.metadata["kind"]
        if kind is str:
            given[f.name] = text
            continue
        try:
            given[f.name] = kind(text)
        except ValueError:
            raise MtlbenchError(f"{f.name.replace('_', '-')} '{text}' is not "
                                f"{'an integer' if kind is int else 'a number'}") from None
    return StatOptions(**given)
