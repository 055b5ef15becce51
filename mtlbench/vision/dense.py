"""Dense (per-pixel) tasks: kinds, losses and split-level metrics from accumulated statistics.

A dense task's labels live in the split under ``TaskSpec.target`` (the row-level ``labels`` column is unused, its
``masks`` column says whether the row is labelled at all):

- ``segmentation``: int class map ``[N, H, W]`` (uint8 or int64) with ``TaskSpec.ignore_index`` for unlabelled
  pixels; loss: cross-entropy averaged over labelled pixels (``ignore_index``; MTAN / LibMTL NYUv2 use -1).
- ``depth``: float ``[N, 1, H, W]`` with a bool validity map under ``TaskSpec.valid``; loss: L1 averaged over valid
  pixels (MTAN, Liu et al. CVPR 2019, ``model_segnet_*.py``; LibMTL's NYUv2 ``DepthLoss``).
- ``normals``: float ``[N, 3, H, W]`` unit vectors with a validity map; the prediction is L2-normalised and the loss
  is ``1 - cos`` averaged over valid pixels (MTAN's normal loss; LibMTL ``NormalLoss``).
- ``binary_map`` (boundaries, foreground): float/uint8 ``[N, 1, H, W]`` in {0, 1} with an optional validity map;
  loss: binary cross-entropy averaged over valid pixels, class-balanced when ``TaskSpec.pos_weight`` is None as in
  HED (Xie & Tu, ICCV 2015: positives weighted by ``|Y-|/|Y|`` of the batch, negatives by ``|Y+|/|Y|``), or with a
  fixed positive weight ``w`` (negatives ``1 - w``; Vandenhende et al.'s edge loss uses 0.95), scaled by 2 so that
  ``w = 0.5`` is the plain BCE.

Metrics are computed over the whole split from statistics accumulated batch by batch on the device (no host sync
per batch), never as a mean of per-batch values:

- ``miou`` / ``pixel_acc``: one K x K confusion matrix; IoU per class ``TP / (TP + FP + FN)``, averaged over the
  classes that occur in the split's labels or predictions (LibMTL's ``nanmean``); pixel accuracy ``trace / total``.
- ``abs_err`` / ``rel_err`` / ``delta1``: mean ``|d - d*|`` and ``|d - d*| / d*`` over every valid pixel of the split
  (LibMTL averages per-batch values instead), and the share with ``max(d/d*, d*/d) < 1.25`` (a non-positive
  prediction counts as outside).
- ``mean_angle`` / ``median_angle`` / ``within_11_25`` / ``within_22_5`` / ``within_30``: angle in degrees between
  the normalised prediction and the label; the mean and the shares are exact, the median comes from a histogram of
  0.01-degree bins (linear inside the bin, so it is within 0.01 degree of the exact median).
- ``best_f`` / ``iou``: the F-measure at the best threshold for the whole split, from histograms of predicted
  probabilities of positive and negative pixels (1000 bins, thresholds ``k / 1000``), and the foreground IoU at
  threshold 0.5. ``best_f`` is like BSDS's ODS F (one threshold for the dataset) but matches pixels exactly: the
  BSDS protocol (and SEISM for PASCAL/NYUD edges) first thins the prediction by non-maximum suppression and
  matches predicted to true boundary pixels within ``maxDist`` (0.0075 / 0.011 of the diagonal), so values are
  lower here and not comparable with published odsF numbers.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from mtlbench.registry import register_metric

from mtlbench.vision.kinds import DENSE_KINDS, DENSE_METRICS  # noqa: F401  (torch-free definitions)
ANGLE_BINS_PER_DEGREE = 100
PROB_BINS = 1000


def unit(x: torch.Tensor) -> torch.Tensor:
    """``F.normalize(x, dim=1)`` (``x / max(|x|, 1e-12)`` over channels) written out: the same formula, several
    times faster on CPU than ``linalg_vector_norm`` over a 3-wide strided axis; agrees to float rounding."""
    return x / x.pow(2).sum(1, keepdim=True).sqrt().clamp_min(1e-12)


def is_dense(task: Any) -> bool:
    return getattr(task, "kind", None) in DENSE_KINDS


def output_channels(task: Any) -> int:
    return {"segmentation": task.n_classes, "depth": 1, "normals": 3, "binary_map": 1}[task.kind]


def _valid(task: Any, batch: dict[str, torch.Tensor], index: int, like: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, H, W]``: the pixel is labelled and its row's task mask is set."""
    row = batch["masks"][:, index].reshape(-1, 1, 1)
    if task.kind == "segmentation":
        v = batch[task.target] != task.ignore_index
    elif task.valid:
        v = batch[task.valid].reshape(like.shape[0], *like.shape[-2:]).bool()
    else:
        v = torch.ones(like.shape[0], *like.shape[-2:], dtype=torch.bool, device=like.device)
    return v & row


def dense_loss(task: Any, output: torch.Tensor, batch: dict[str, torch.Tensor], index: int) -> torch.Tensor:
    """The task's loss averaged over its valid pixels (0 with no gradient if there are none)."""
    valid = _valid(task, batch, index, output)
    vf = valid.to(output.dtype)
    n = vf.sum().clamp(min=1.0)
    if task.kind == "segmentation":
        target = torch.where(valid, batch[task.target].long(), torch.zeros((), dtype=torch.long,
                                                                          device=output.device))
        per_px = F.cross_entropy(output, target, reduction="none")
    elif task.kind == "depth":
        per_px = (output[:, 0] - batch[task.target][:, 0].to(output.dtype)).abs()
    elif task.kind == "normals":
        pred = unit(output)
        per_px = 1.0 - (pred * batch[task.target].to(output.dtype)).sum(1)
    else:
        y = batch[task.target][:, 0].to(output.dtype)
        logit = output[:, 0]
        lpos = F.softplus(-logit)  # -log sigmoid
        lneg = F.softplus(logit)   # -log(1 - sigmoid)
        if task.pos_weight is None:  # HED: beta = |Y-| / |Y| over the batch's valid pixels
            pos = (y * vf).sum()
            beta = (1.0 - pos / n).detach()
            per_px = beta * y * lpos + (1.0 - beta) * (1.0 - y) * lneg
        else:
            w = float(task.pos_weight)
            per_px = 2.0 * (w * y * lpos + (1.0 - w) * (1.0 - y) * lneg)
    return (per_px * vf).sum() / n


def prediction(task: Any, output: torch.Tensor) -> torch.Tensor:
    """What a user reads off a dense output: class map, depth, unit normals or probabilities."""
    if task.kind == "segmentation":
        return output.argmax(1)
    if task.kind == "normals":
        return unit(output)
    if task.kind == "binary_map":
        return torch.sigmoid(output)
    return output


class DenseAccumulator:
    """Sufficient statistics of one dense task over a split, updated per batch on the batch's device."""

    def __init__(self, task: Any) -> None:
        self.task = task
        self.stats: torch.Tensor | None = None
        self.extra: torch.Tensor | None = None

    def _add(self, stats: torch.Tensor, extra: torch.Tensor | None = None) -> None:
        self.stats = stats if self.stats is None else self.stats + stats
        if extra is not None:
            self.extra = extra if self.extra is None else self.extra + extra

    @torch.no_grad()
    def update(self, output: torch.Tensor, batch: dict[str, torch.Tensor], index: int) -> None:
        task = self.task
        valid = _valid(task, batch, index, output)
        w = valid.reshape(-1).to(torch.float64)
        if task.kind == "segmentation":
            K = task.n_classes
            gt = batch[task.target].long().reshape(-1).clamp(0, K - 1)
            pred = output.argmax(1).reshape(-1)
            self._add(torch.bincount(gt * K + pred, weights=w, minlength=K * K))
        elif task.kind == "depth":
            p = output[:, 0].reshape(-1).double()
            g = batch[task.target][:, 0].reshape(-1).double()
            err = (p - g).abs()
            safe_g = torch.where(g > 0, g, torch.ones_like(g))
            ratio = torch.maximum(p / safe_g, safe_g / p.clamp(min=1e-12))
            inside = ((ratio < 1.25) & (p > 0)).double()
            self._add(torch.stack([w.sum(), (err * w).sum(), (err / safe_g * w).sum(), (inside * w).sum()]))
        elif task.kind == "normals":
            pred = F.normalize(output.double(), dim=1)
            cos = (pred * batch[task.target].double()).sum(1).clamp(-1.0, 1.0).reshape(-1)
            ang = torch.rad2deg(torch.acos(cos))
            n_bins = 180 * ANGLE_BINS_PER_DEGREE
            idx = (ang * ANGLE_BINS_PER_DEGREE).long().clamp(0, n_bins - 1)
            hist = torch.bincount(idx, weights=w, minlength=n_bins)
            self._add(torch.stack([w.sum(), (ang * w).sum(), ((ang < 11.25).double() * w).sum(),
                                   ((ang < 22.5).double() * w).sum(), ((ang < 30.0).double() * w).sum()]), hist)
        else:
            prob = torch.sigmoid(output[:, 0].double()).reshape(-1)
            y = batch[task.target][:, 0].reshape(-1).double()
            idx = (prob * PROB_BINS).long().clamp(0, PROB_BINS - 1)
            pos = torch.bincount(idx, weights=w * y, minlength=PROB_BINS)
            neg = torch.bincount(idx, weights=w * (1.0 - y), minlength=PROB_BINS)
            hard = (prob >= 0.5).double()
            inter = (hard * y * w).sum()
            union = (((hard + y) > 0).double() * w).sum()
            self._add(torch.stack([pos, neg]), torch.stack([inter, union]))

    def compute(self) -> dict[str, float]:
        """The task's metrics (``TaskSpec.metrics``, in that order) over everything accumulated."""
        vals = self._compute()
        return {m: vals[m] for m in self.task.metrics}

    def _compute(self) -> dict[str, float]:
        task = self.task
        names = DENSE_METRICS[task.kind]
        if self.stats is None:
            return {m: math.nan for m in names}
        s = self.stats.cpu()
        if task.kind == "segmentation":
            K = task.n_classes
            cm = s.reshape(K, K)  # rows: label, columns: prediction
            tp = cm.diagonal()
            union = cm.sum(0) + cm.sum(1) - tp
            total = float(cm.sum())
            present = union > 0
            miou = float((tp[present] / union[present]).mean()) if bool(present.any()) else math.nan
            acc = float(tp.sum()) / total if total > 0 else math.nan
            return {"miou": miou, "pixel_acc": acc}
        if task.kind == "depth":
            n = float(s[0])
            if n == 0:
                return {m: math.nan for m in names}
            return {"abs_err": float(s[1]) / n, "rel_err": float(s[2]) / n, "delta1": float(s[3]) / n}
        if task.kind == "normals":
            n = float(s[0])
            if n == 0:
                return {m: math.nan for m in names}
            return {"mean_angle": float(s[1]) / n, "median_angle": _hist_median(self.extra.cpu(), n),
                    "within_11_25": float(s[2]) / n, "within_22_5": float(s[3]) / n, "within_30": float(s[4]) / n}
        pos, neg = s[0], s[1]
        # predicted positive at threshold k / PROB_BINS: every bin >= k
        tp = pos.flip(0).cumsum(0).flip(0)[1:]
        fp = neg.flip(0).cumsum(0).flip(0)[1:]
        n_pos = float(pos.sum())
        prec = tp / (tp + fp).clamp(min=1e-300)
        rec = tp / max(n_pos, 1e-300)
        f = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec).clamp(min=1e-300), torch.zeros_like(prec))
        inter, union = (float(v) for v in self.extra.cpu())
        return {"best_f": float(f.max()) if n_pos > 0 else math.nan,
                "iou": inter / union if union > 0 else math.nan}


def _hist_median(hist: torch.Tensor, n: float) -> float:
    """The median of values binned at 1 / ANGLE_BINS_PER_DEGREE degrees, interpolated inside its bin."""
    cum = hist.cumsum(0)
    half = n / 2.0
    k = int(torch.searchsorted(cum, torch.tensor([half], dtype=cum.dtype))[0])
    before = float(cum[k - 1]) if k > 0 else 0.0
    inside = float(hist[k])
    frac = (half - before) / inside if inside > 0 else 0.0
    return (k + frac) / ANGLE_BINS_PER_DEGREE


def check_targets(dataset: str, tasks: Any, splits: dict[str, Any]) -> None:
    """One line for dense labels a loss or metric would misread: a missing tensor, or a class label outside
    ``0..K-1`` that is not the ignore value (vectorised: one reduction per split and task)."""
    from mtlbench.errors import MtlbenchError

    for t in tasks:
        if not is_dense(t):
            continue
        for name, sp in splits.items():
            for key in (t.target, t.valid):
                if key and key not in sp.tensors:
                    raise MtlbenchError(f"dataset '{dataset}': task '{t.name}' reads '{key}', which the {name} "
                                        f"split does not hold")
            if t.kind == "segmentation":
                y = sp.tensors[t.target]
                bad = (y >= t.n_classes) & (y != t.ignore_index) | (y < 0)
                if bool(bad.any()):
                    v = int(y[bad][0])
                    raise MtlbenchError(f"dataset '{dataset}': task '{t.name}' has class label {v} in the {name} "
                                        f"split, outside 0..{t.n_classes - 1} and not the ignore value "
                                        f"{t.ignore_index}")


def _accumulated_only(y_true: torch.Tensor, y_pred: torch.Tensor) -> float:
    raise TypeError("dense metrics are computed from accumulated split statistics (DenseAccumulator)")


def _register() -> None:
    from mtlbench.metrics import Metric

    spec = [
        ("miou", "max", "segmentation", "mean IoU over classes from one confusion matrix of the split"),
        ("pixel_acc", "max", "segmentation", "share of labelled pixels classified correctly"),
        ("abs_err", "min", "depth", "mean absolute depth error over valid pixels"),
        ("rel_err", "min", "depth", "mean absolute relative depth error |d - d*| / d*"),
        ("delta1", "max", "depth", "share of valid pixels with max(d/d*, d*/d) < 1.25"),
        ("mean_angle", "min", "normals", "mean angle error of normals, degrees"),
        ("median_angle", "min", "normals", "median angle error of normals, degrees (0.01-degree histogram)"),
        ("within_11_25", "max", "normals", "share of pixels with normal angle error < 11.25 degrees"),
        ("within_22_5", "max", "normals", "share of pixels with normal angle error < 22.5 degrees"),
        ("within_30", "max", "normals", "share of pixels with normal angle error < 30 degrees"),
        ("best_f", "max", "binary_map", "F-measure at the split's best threshold, exact pixel matching (not BSDS ODS)"),
        ("iou", "max", "binary_map", "IoU of the positive class at threshold 0.5"),
    ]
    from mtlbench.vision.kinds import DENSE_DIRECTIONS

    for name, direction, kind, desc in spec:
        assert DENSE_DIRECTIONS[name] == direction  # one truth for the torch-free leaderboard
        register_metric(name)(Metric(_accumulated_only, direction, (kind,), desc))


_register()
