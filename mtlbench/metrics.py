"""Vectorised metrics over whole splits, honouring label masks.

Each metric is ``fn(y_true, y_pred) -> float`` on the rows where the task's label is defined. ``y_pred`` is a
probability for binary tasks, a value for regression, and class probabilities ``[N, C]`` for multiclass.
A metric that is undefined on its input (AUC with one class present, R² of a constant target) returns NaN, stored
as null. A plugin adds a metric with ``register_metric("name")(Metric(fn, "max" | "min", kinds, description))``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from mtlbench.registry import get, register_metric

LOGLOSS_EPS = 1e-15  # clip probabilities as scikit-learn does, so logloss stays finite


@dataclass(frozen=True)
class Metric:
    """A registered metric: the function, whether higher or lower is better, and the task kinds it suits."""

    fn: Callable[[torch.Tensor, torch.Tensor], float]
    direction: Literal["max", "min"]
    kinds: tuple[str, ...]
    description: str = ""

    def __call__(self, y_true: torch.Tensor, y_pred: torch.Tensor) -> float:
        return self.fn(y_true, y_pred)


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``x`` with ties given their average rank (as scipy.stats.rankdata 'average')."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    avg = ends - (counts.to(torch.float64) - 1.0) / 2.0
    return avg[inverse]


def auc(y_true: torch.Tensor, y_score: torch.Tensor) -> float:
    """Exact ROC AUC with ties counted as one half (Mann-Whitney U / (P N)); NaN if only one class is present."""
    y = y_true.reshape(-1).to(torch.float64)
    s = y_score.reshape(-1).to(torch.float64)
    pos = y > 0.5
    n_pos = int(pos.sum())
    n_neg = y.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = average_ranks(s)
    u = float(ranks[pos].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def logloss(y_true: torch.Tensor, y_pred: torch.Tensor) -> float:
    """Mean negative log-likelihood; binary if ``y_pred`` is 1-D, else categorical over the last axis."""
    if y_true.numel() == 0:
        return math.nan
    if y_pred.dim() == 2 and y_pred.shape[1] > 1:
        p = y_pred.to(torch.float64).clamp(LOGLOSS_EPS, 1.0)
        p = p / p.sum(dim=1, keepdim=True)
        return float(-torch.log(p.gather(1, y_true.long().reshape(-1, 1))).mean())
    y = y_true.reshape(-1).to(torch.float64)
    p = y_pred.reshape(-1).to(torch.float64).clamp(LOGLOSS_EPS, 1 - LOGLOSS_EPS)
    return float(-(y * torch.log(p) + (1 - y) * torch.log1p(-p)).mean())


def accuracy(y_true: torch.Tensor, y_pred: torch.Tensor) -> float:
    """Share of correct predictions: argmax for multiclass, threshold 0.5 for binary probabilities."""
    if y_true.numel() == 0:
        return math.nan
    if y_pred.dim() == 2 and y_pred.shape[1] > 1:
        pred = y_pred.argmax(dim=1)
    else:
        pred = (y_pred.reshape(-1) >= 0.5).long()
    return float((pred == y_true.reshape(-1).long()).to(torch.float64).mean())


def rmse(y_true: torch.Tensor, y_pred: torch.Tensor) -> float:
    if y_true.numel() == 0:
        return math.nan
    d = y_pred.reshape(-1).to(torch.float64) - y_true.reshape(-1).to(torch.float64)
    return float(torch.sqrt((d * d).mean()))


def mae(y_true: torch.Tensor, y_pred: torch.Tensor) -> float:
    if y_true.numel() == 0:
        return math.nan
    d = y_pred.reshape(-1).to(torch.float64) - y_true.reshape(-1).to(torch.float64)
    return float(d.abs().mean())


def r2(y_true: torch.Tensor, y_pred: torch.Tensor) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot`` (scikit-learn's ``r2_score``); NaN when the target is
    constant (scikit-learn's ``force_finite`` would return 0 or 1 there)."""
    if y_true.numel() == 0:
        return math.nan
    y = y_true.reshape(-1).to(torch.float64)
    d = y_pred.reshape(-1).to(torch.float64) - y
    c = y - y.mean()
    ss_tot = float((c * c).sum())
    return 1.0 - float((d * d).sum()) / ss_tot if ss_tot > 0 else math.nan


def explained_variance(y_true: torch.Tensor, y_pred: torch.Tensor) -> float:
    """``1 - Var(y - y_hat) / Var(y)`` (scikit-learn's ``explained_variance_score``): R² that ignores a constant
    offset of the predictions; NaN when the target is constant."""
    if y_true.numel() == 0:
        return math.nan
    y = y_true.reshape(-1).to(torch.float64)
    d = y_pred.reshape(-1).to(torch.float64) - y
    var_y = float(((y - y.mean()) ** 2).mean())
    return 1.0 - float(((d - d.mean()) ** 2).mean()) / var_y if var_y > 0 else math.nan


register_metric("auc")(Metric(auc, "max", ("binary",), "ROC AUC, exact and tie-aware"))
register_metric("logloss")(Metric(logloss, "min", ("binary", "multiclass"), "mean negative log-likelihood"))
register_metric("accuracy")(Metric(accuracy, "max", ("binary", "multiclass"), "share of correct predictions"))
register_metric("rmse")(Metric(rmse, "min", ("regression",), "root mean squared error"))
register_metric("mae")(Metric(mae, "min", ("regression",), "mean absolute error"))
register_metric("r2")(Metric(r2, "max", ("regression",), "coefficient of determination R²"))
register_metric("explained_variance")(Metric(explained_variance, "max", ("regression",),
                                             "explained variance 1 - Var(y - y_hat) / Var(y)"))


def metric(name: str) -> Metric:
    return get("metric", name).obj


def evaluate_task(metrics: tuple[str, ...], y_true: torch.Tensor, y_pred: torch.Tensor,
                  mask: torch.Tensor, label_scale: tuple[float, float] | None = None) -> dict[str, float]:
    """All of a task's metrics on the rows where ``mask`` is True. With ``label_scale = (mean, std)`` (a regression
    task trained on standardised labels) labels and predictions are first mapped back to the original units,
    in float64."""
    keep = mask.reshape(-1).bool()
    yt, yp = y_true.reshape(-1)[keep], y_pred[keep]
    if label_scale is not None:
        mean, std = label_scale
        yt, yp = yt.to(torch.float64) * std + mean, yp.to(torch.float64) * std + mean
    return {m: metric(m)(yt, yp) for m in metrics}
