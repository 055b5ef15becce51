"""The search of a controllable slimmable multi-task network: (compute budget, task preference) -> the widths of
the shared encoder and of every task decoder (Aich et al., "Efficient Controllable Multi-Task Architectures",
ICCV 2023, §"search"). Torch-free: it reads a table of analytical FLOPs made once per model
(:meth:`baselines.archs.slimmable.SlimmableMTL.flops_table`), so a request costs milliseconds.

The paper's key rule, as its abstract states it: *a larger computational budget goes to the decoder of the more
preferred task, while the shared encoder's configuration is searched to help every task*. Its exact algorithm could
not be read (no public code; only the abstract was retrievable), so ours is this, stated precisely:

- A configuration is ``(e, d_1..d_T)``, each a multiplier from the width set ``W``. Its cost is exact analytical
  FLOPs per sample: ``F(e, d) = F_enc(e) + sum_t F_dec_t(e, d_t)`` (a decoder's cost depends on its own width and
  on how many encoder channels it reads). ``F`` is the same counter as the record's ``flops``.
- Feasible: ``F(e, d) <= budget``, and *monotone in preference*: ``r_i > r_j  =>  d_i >= d_j`` and
  ``r_i == r_j  =>  d_i == d_j`` (equal preferences get equal decoders). A preferred task never gets a narrower
  decoder than a less preferred one.
- Among feasible configurations, ``rule="log_compute"`` (default) maximises ``sum_t r_t * log(F_enc(e) +
  F_dec_t(e, d_t))``: each task's utility is the log of the compute on its own path (the shared encoder plus its
  decoder), weighted by its preference. The encoder is on every path (weights summing to 1), so it is widened
  when that helps the tasks overall; a decoder only for its own task, in proportion to its preference.
  ``rule="widest_encoder"``: the widest encoder that leaves a feasible decoder allocation, then the allocation
  with the most preference-weighted decoder FLOPs (``sum_t r_t F_dec_t``) — "a stronger encoder for a given
  budget" taken literally. Ties: more total FLOPs, then the wider encoder, then the lexicographically wider
  decoders.
- Enumeration is exact: for every encoder width, every non-increasing assignment of widths to the groups of equal
  preference (``C(G + |W| - 1, |W| - 1)`` of them for ``G`` groups: 20 for 3 tasks and 4 widths, 286 for 10 tasks),
  vectorised with numpy.

Bad requests fail with one line: a preference that is negative, not finite, of the wrong length or not summing to 1
(tolerance 1e-6); a budget below the narrowest configuration's FLOPs (the line names that minimum); a width outside
the model's set.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from mtlbench.errors import MtlbenchError

RULES = ("log_compute", "widest_encoder")
#: The evaluation grid's budgets, as fractions of the full (all widths 1) model's FLOPs.
GRID_BUDGETS = (0.25, 0.5, 0.75, 1.0)
PREFERENCE_TOL = 1e-6


@dataclass(frozen=True)
class Config:
    """One runtime width configuration: the encoder's multiplier and one per task decoder (task order)."""

    encoder: float
    decoders: tuple[float, ...]

    def to_dict(self, tasks: Sequence[str]) -> dict[str, Any]:
        return {"encoder": self.encoder, "decoders": dict(zip(tasks, self.decoders))}

    @classmethod
    def uniform(cls, w: float, n_tasks: int) -> "Config":
        return cls(w, (w,) * n_tasks)


@dataclass(frozen=True)
class FlopsTable:
    """Exact analytical FLOPs per sample of every part at every width: ``enc[i]`` (encoder at ``widths[i]``),
    ``dec[t, i, j]`` (task t's decoder at width ``widths[j]`` reading the encoder at ``widths[i]``)."""

    tasks: tuple[str, ...]
    widths: tuple[float, ...]
    enc: np.ndarray
    dec: np.ndarray

    def index(self, w: float, what: str = "width") -> int:
        for i, x in enumerate(self.widths):
            if abs(x - w) < 1e-9:
                return i
        raise MtlbenchError(f"unknown {what} {w!r}: the model's width multipliers are "
                            f"{', '.join(_fmt(x) for x in self.widths)}")

    def flops(self, config: Config) -> int:
        if len(config.decoders) != len(self.tasks):
            raise MtlbenchError(f"a configuration needs {len(self.tasks)} decoder widths (tasks "
                                f"{', '.join(self.tasks)}), got {len(config.decoders)}")
        e = self.index(config.encoder, "encoder width")
        return int(self.enc[e] + sum(self.dec[t, e, self.index(d, f"decoder width of task '{self.tasks[t]}'")]
                                     for t, d in enumerate(config.decoders)))

    @property
    def full(self) -> int:
        return self.flops(Config.uniform(self.widths[-1], len(self.tasks)))

    @property
    def minimum(self) -> int:
        return self.flops(Config.uniform(self.widths[0], len(self.tasks)))

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "widths": list(self.widths), "encoder": self.enc.tolist(),
                "decoders": self.dec.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FlopsTable":
        return cls(tuple(d["tasks"]), tuple(d["widths"]), np.asarray(d["encoder"], dtype=np.int64),
                   np.asarray(d["decoders"], dtype=np.int64))


def _fmt(x: float) -> str:
    return f"{x:g}"


def check_widths(widths: Sequence[float]) -> tuple[float, ...]:
    """Sorted, distinct multipliers in (0, 1] including 1 (the SuperNet); one line otherwise."""
    ws = tuple(float(w) for w in widths)
    bad = [w for w in ws if not (math.isfinite(w) and 0.0 < w <= 1.0)]
    if bad:
        raise MtlbenchError(f"width multipliers must be in (0, 1], got {_fmt(bad[0])} in "
                            f"{', '.join(_fmt(w) for w in ws)}")
    if len(set(ws)) != len(ws) or list(ws) != sorted(ws):
        raise MtlbenchError(f"width multipliers must be distinct and increasing, got {', '.join(_fmt(w) for w in ws)}")
    if not ws or ws[-1] != 1.0:
        raise MtlbenchError(f"the width multipliers must include 1 (the full model), got "
                            f"{', '.join(_fmt(w) for w in ws) or 'none'}")
    return ws


def check_preference(preference: Sequence[float], tasks: Sequence[str]) -> np.ndarray:
    """The preference as a float vector; one line naming the problem and the valid form otherwise."""
    try:
        r = np.asarray([float(x) for x in preference], dtype=np.float64)
    except (TypeError, ValueError):
        raise MtlbenchError(f"preference must be {len(tasks)} numbers (one per task: {', '.join(tasks)}), "
                            f"got {preference!r}") from None
    shown = ", ".join(_fmt(x) for x in r)
    if r.shape != (len(tasks),):
        raise MtlbenchError(f"preference has {r.size} values ({shown}) but the model has {len(tasks)} tasks "
                            f"({', '.join(tasks)}): give one non-negative weight per task, summing to 1")
    if not np.isfinite(r).all() or (r < 0).any():
        raise MtlbenchError(f"preference ({shown}) must be non-negative and finite: one weight per task "
                            f"({', '.join(tasks)}), summing to 1")
    if abs(r.sum() - 1.0) > PREFERENCE_TOL:
        raise MtlbenchError(f"preference ({shown}) sums to {r.sum():.6g}, not 1: give one non-negative weight per "
                            f"task ({', '.join(tasks)}) summing to 1")
    return r


def check_budget(table: FlopsTable, budget: float) -> None:
    if not (isinstance(budget, (int, float)) and math.isfinite(budget)):
        raise MtlbenchError(f"budget must be a number of FLOPs per sample, got {budget!r}")
    if budget < table.minimum:
        raise MtlbenchError(f"budget {budget:,.0f} FLOPs is below the narrowest configuration (all widths "
                            f"{_fmt(table.widths[0])}: {table.minimum:,} FLOPs, "
                            f"{100 * table.minimum / table.full:.1f}% of the full model's {table.full:,}); "
                            f"give at least {table.minimum:,}")


def _groups(r: np.ndarray) -> list[list[int]]:
    """Tasks grouped by equal preference, most preferred group first (ties within PREFERENCE_TOL)."""
    order = sorted(range(len(r)), key=lambda t: (-r[t], t))
    groups: list[list[int]] = []
    for t in order:
        if groups and abs(r[groups[-1][0]] - r[t]) <= PREFERENCE_TOL:
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


def _monotone_assignments(n_groups: int, n_widths: int) -> np.ndarray:
    """Every non-increasing sequence of width indices over the groups: ``[S, G]``."""
    combos = itertools.combinations_with_replacement(range(n_widths - 1, -1, -1), n_groups)
    return np.asarray(list(combos), dtype=np.int64).reshape(-1, n_groups)


def search(table: FlopsTable, budget: float, preference: Sequence[float], rule: str = "log_compute") -> Config:
    """The configuration for ``budget`` (FLOPs per sample) and ``preference`` (one weight per task, summing to 1);
    see the module docstring for the rule. Never exceeds the budget."""
    if rule not in RULES:
        raise MtlbenchError(f"unknown search rule {rule!r}; choose one of {', '.join(RULES)}")
    r = check_preference(preference, table.tasks)
    check_budget(table, budget)
    groups = _groups(r)
    seqs = _monotone_assignments(len(groups), len(table.widths))          # [S, G]
    member = np.zeros((len(groups), len(table.tasks)), dtype=np.int64)
    for g, ts in enumerate(groups):
        member[g, ts] = 1
    d_idx = seqs @ member                                                 # [S, T]: width index per task
    E, T = len(table.widths), len(table.tasks)
    best, best_key = None, None
    for e in range(E):
        dec = table.dec[np.arange(T)[None, :], e, d_idx].astype(np.float64)   # [S, T]
        total = table.enc[e] + dec.sum(1)
        ok = total <= budget
        if not ok.any():
            continue
        if rule == "log_compute":
            score = (np.log(table.enc[e] + dec) * r).sum(1)
            primary = np.zeros_like(score)
        else:
            primary = np.full(len(seqs), float(e))
            score = (dec * r).sum(1)
        for s in np.flatnonzero(ok):
            key = (primary[s], round(float(score[s]), 12), float(total[s]), e, tuple(d_idx[s]))
            if best_key is None or key > best_key:
                best_key, best = key, (e, d_idx[s])
    assert best is not None  # the all-narrowest configuration is feasible (check_budget)
    e, d = best
    return Config(table.widths[e], tuple(table.widths[i] for i in d))


def preference_grid(n_tasks: int, step: float = 0.25, dominant: float = 0.7) -> list[tuple[float, ...]]:
    """The evaluation grid of preferences: for T <= 3 the simplex lattice of step ``step`` (15 vectors for T = 3
    and step 1/4); for T > 3 the T one-hot-dominant vectors (``dominant`` on one task, the rest shared equally)
    plus the uniform vector."""
    if n_tasks <= 3:
        k = round(1 / step)
        if abs(k * step - 1) > 1e-9:
            raise MtlbenchError(f"preference grid step must divide 1 (e.g. 0.25), got {step!r}")
        out = [tuple(c / k for c in combo) for combo in itertools.product(range(k + 1), repeat=n_tasks)
               if sum(combo) == k]
        return sorted(out, reverse=True)
    rest = (1 - dominant) / (n_tasks - 1)
    out = [tuple(dominant if i == t else rest for i in range(n_tasks)) for t in range(n_tasks)]
    return out + [tuple(1 / n_tasks for _ in range(n_tasks))]
