"""Dense tasks: split-level metrics equal brute-force computations, losses honour ignore values and masks."""
from __future__ import annotations

import math
import re

import pytest
import torch

from mtlbench.data import TaskSpec
from mtlbench.metrics import metric
from mtlbench.vision.dense import DENSE_METRICS, DenseAccumulator, dense_loss

SEG = TaskSpec("seg", "segmentation", ("miou", "pixel_acc"), n_classes=4, target="seg", ignore_index=255)
DEPTH = TaskSpec("depth", "depth", ("abs_err", "rel_err", "delta1"), target="depth", valid="valid")
NORMAL = TaskSpec("normal", "normals", DENSE_METRICS["normals"], target="normal", valid="valid")
BOUND = TaskSpec("bnd", "binary_map", ("best_f", "iou"), target="bnd")


def _batches(n_batches=3, B=4, H=6, W=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        seg = torch.randint(0, 4, (B, H, W), generator=g)
        seg[torch.rand(B, H, W, generator=g) < 0.2] = 255
        normal = torch.nn.functional.normalize(torch.randn(B, 3, H, W, generator=g), dim=1)
        out.append({"seg": seg.to(torch.uint8), "depth": torch.rand(B, 1, H, W, generator=g) * 5 + 0.5,
                    "normal": normal, "valid": torch.rand(B, H, W, generator=g) > 0.3,
                    "bnd": (torch.rand(B, 1, H, W, generator=g) > 0.7).to(torch.uint8),
                    "masks": torch.ones(B, 4, dtype=torch.bool), "labels": torch.zeros(B, 4),
                    "o_seg": torch.randn(B, 4, H, W, generator=g), "o_depth": torch.randn(B, 1, H, W, generator=g) + 3,
                    "o_normal": torch.randn(B, 3, H, W, generator=g), "o_bnd": torch.randn(B, 1, H, W, generator=g)})
    if n_batches > 1:
        out[1]["masks"][1] = False  # a row without labels: excluded everywhere
    return out


def _acc(task, key, idx, batches):
    a = DenseAccumulator(task)
    for b in batches:
        a.update(b[key], b, idx)
    return a.compute()


def _rows(b, idx):
    return b["masks"][:, idx]


def test_segmentation_from_one_confusion_matrix():
    bs = _batches()
    got = _acc(SEG, "o_seg", 0, bs)
    gt = torch.cat([b["seg"][_rows(b, 0)].long().reshape(-1) for b in bs])
    pr = torch.cat([b["o_seg"].argmax(1)[_rows(b, 0)].reshape(-1) for b in bs])
    keep = gt != 255
    gt, pr = gt[keep], pr[keep]
    ious = []
    for c in range(4):
        inter = ((gt == c) & (pr == c)).sum().item()
        union = ((gt == c) | (pr == c)).sum().item()
        if union:
            ious.append(inter / union)
    assert got["miou"] == pytest.approx(sum(ious) / len(ious), rel=1e-12)
    assert got["pixel_acc"] == pytest.approx((gt == pr).double().mean().item(), rel=1e-12)
    assert list(got) == ["miou", "pixel_acc"]


def test_depth_and_normals_brute_force():
    bs = _batches(seed=1)
    got = _acc(DEPTH, "o_depth", 1, bs)
    v = torch.cat([(b["valid"] & _rows(b, 1)[:, None, None]).reshape(-1) for b in bs])
    p = torch.cat([b["o_depth"].reshape(-1) for b in bs]).double()[v]
    g = torch.cat([b["depth"].reshape(-1) for b in bs]).double()[v]
    assert got["abs_err"] == pytest.approx((p - g).abs().mean().item(), rel=1e-10)
    assert got["rel_err"] == pytest.approx(((p - g).abs() / g).mean().item(), rel=1e-10)
    inside = (torch.maximum(p / g, g / p) < 1.25) & (p > 0)
    assert got["delta1"] == pytest.approx(inside.double().mean().item(), rel=1e-12)
    got = _acc(NORMAL, "o_normal", 2, bs)
    v = torch.cat([(b["valid"] & _rows(b, 2)[:, None, None]).reshape(-1) for b in bs])
    cos = torch.cat([(torch.nn.functional.normalize(b["o_normal"].double(), dim=1) * b["normal"]).sum(1).reshape(-1)
                     for b in bs])[v].clamp(-1, 1)
    ang = torch.rad2deg(torch.acos(cos))
    assert got["mean_angle"] == pytest.approx(ang.mean().item(), rel=1e-10)
    assert abs(got["median_angle"] - ang.median().item()) <= 0.01  # 0.01-degree histogram
    for name, thr in (("within_11_25", 11.25), ("within_22_5", 22.5), ("within_30", 30.0)):
        assert got[name] == pytest.approx((ang < thr).double().mean().item(), rel=1e-12)


def test_best_threshold_f_measure():
    bs = _batches(seed=2)
    got = _acc(BOUND, "o_bnd", 3, bs)
    rows = [_rows(b, 3)[:, None, None, None].expand_as(b["bnd"]).reshape(-1) for b in bs]
    p = torch.cat([torch.sigmoid(b["o_bnd"].double()).reshape(-1) for b in bs])[torch.cat(rows)]
    y = torch.cat([b["bnd"].reshape(-1) for b in bs])[torch.cat(rows)].bool()
    best = 0.0
    for k in range(1, 1000):  # thresholds k / 1000, as the histogram's bin edges
        pred = (p * 1000).floor() >= k
        tp = (pred & y).sum().item()
        if tp:
            prec, rec = tp / pred.sum().item(), tp / y.sum().item()
            best = max(best, 2 * prec * rec / (prec + rec))
    assert got["best_f"] == pytest.approx(best, rel=1e-12)
    hard = p >= 0.5
    assert got["iou"] == pytest.approx((hard & y).sum().item() / (hard | y).sum().item(), rel=1e-12)


def test_metrics_registered_with_directions():
    assert metric("miou").direction == "max" and metric("abs_err").direction == "min"
    assert metric("median_angle").direction == "min" and metric("within_30").direction == "max"
    assert metric("best_f").direction == "max"


def test_losses_ignore_invalid_pixels_and_rows():
    b = _batches(1, seed=3)[0]
    base = {k: dense_loss(t, b[o], b, i) for k, t, o, i in
            (("seg", SEG, "o_seg", 0), ("depth", DEPTH, "o_depth", 1), ("normal", NORMAL, "o_normal", 2))}
    # changing labels at ignored / invalid pixels changes nothing
    b2 = dict(b)
    seg = b["seg"].clone()
    seg[seg == 255] = 255
    b2["seg"] = seg
    depth = b["depth"].clone()
    depth[~b["valid"][:, None]] = 1e6
    b2["depth"] = depth
    assert dense_loss(DEPTH, b["o_depth"], b2, 1) == pytest.approx(float(base["depth"]), rel=1e-6)
    # the depth loss is the mean L1 over valid pixels
    v = b["valid"][:, None]
    expect = (b["o_depth"] - b["depth"]).abs()[v].mean()
    assert float(base["depth"]) == pytest.approx(float(expect), rel=1e-6)
    # normals: 1 - cos of the normalised prediction, over valid pixels
    cos = (torch.nn.functional.normalize(b["o_normal"], dim=1) * b["normal"]).sum(1)[b["valid"]]
    assert float(base["normal"]) == pytest.approx(float((1 - cos).mean()), rel=1e-6)
    # a row with masks False contributes nothing
    b3 = dict(b)
    b3["masks"] = b["masks"].clone()
    b3["masks"][:, 0] = False
    assert float(dense_loss(SEG, b["o_seg"], b3, 0)) == 0.0
    # segmentation: CE over labelled pixels only
    keep = b["seg"] != 255
    ce = torch.nn.functional.cross_entropy(b["o_seg"].permute(0, 2, 3, 1)[keep], b["seg"][keep].long())
    assert float(base["seg"]) == pytest.approx(float(ce), rel=1e-6)


def test_hed_balanced_bce():
    b = _batches(1, seed=4)[0]
    loss = dense_loss(BOUND, b["o_bnd"], b, 3)
    y = b["bnd"].float()
    beta = 1 - y.mean()
    x = b["o_bnd"]
    manual = (beta * y * torch.nn.functional.softplus(-x) + (1 - beta) * (1 - y) * torch.nn.functional.softplus(x))
    assert float(loss) == pytest.approx(float(manual.mean()), rel=1e-6)
    plain = TaskSpec("fg", "binary_map", ("iou",), target="bnd", pos_weight=0.5)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, y)
    assert float(dense_loss(plain, x, b, 3)) == pytest.approx(float(bce), rel=1e-6)


def test_empty_accumulator_is_nan():
    assert all(math.isnan(v) for v in DenseAccumulator(SEG).compute().values())


def test_leaderboard_dense_delta_m_uses_every_metric():
    """Dense tables: Δm% is the mean over every metric of every task, signed by direction (vision convention)."""
    from mtlbench.results.leaderboard import build_tables, long_frame
    from mtlbench.testing import fake_record

    tasks = ({"name": "seg", "kind": "segmentation", "metrics": ["miou", "pixel_acc"]},
             {"name": "depth", "kind": "depth", "metrics": ["abs_err"]})
    vals = {"single": {"seg": {"miou": 0.40, "pixel_acc": 0.80}, "depth": {"abs_err": 0.50}},
            "shared_bottom": {"seg": {"miou": 0.44, "pixel_acc": 0.80}, "depth": {"abs_err": 0.55}}}
    recs = []
    for arch, v in vals.items():
        for seed in (0, 1):
            r = fake_record("scenes", arch, "ew", seed, {"seg": 0.5, "depth": 0.5}, tasks=tasks)
            for split in ("train", "val", "test"):
                r["metrics"][split] = v
            recs.append(r)
    (table,) = build_tables(long_frame(recs))
    expect = 100 * (0.04 / 0.40 + 0.0 - 0.05 / 0.50) / 3
    assert table.delta_m["shared_bottom × ew"] == pytest.approx(expect)
    assert "every task" in table.delta_m_note and "Vandenhende" in table.delta_m_note


@pytest.mark.parametrize("dataset, opts, needle", [
    ("scenes", {"resolution": 4}, "option 'resolution' must be >= 8, got 4"),
    ("scenes", {"classes": 251}, "option 'classes' must be >= 1 and <= 250, got 251"),
    ("scenes", {"fov": 5.0}, "option 'fov' must be >= 10 and <= 150, got 5.0"),
    ("scenes", {"noise": 1.5}, "option 'noise' must be >= 0 and <= 1, got 1.5"),
    ("scenes", {"data_seed": -2}, "option 'data_seed' must be >= 0, got -2"),
    ("multimnist", {"size": 20}, "option 'size' must be >= 32, got 20"),
    ("multimnist", {"threshold": 0}, "option 'threshold' must be >= 1 and <= 255, got 0"),
    ("multimnist", {"train": 0}, "option 'train' must be >= 1, got 0"),
    ("nyuv2", {"val_images": 795}, "option 'val_images' must be >= 1 and <= 794, got 795"),
    ("celeba", {"resolution": 2}, "option 'resolution' must be >= 8, got 2"),
    ("celeba", {"max_images": 0}, "option 'max_images' must be >= 1, got 0"),
])
def test_image_dataset_options_declare_ranges(dataset, opts, needle):
    """Each numeric option of the image datasets declares its range: a bad value is one line naming it."""
    from mtlbench import registry
    from mtlbench.errors import MtlbenchError

    e = registry.get("dataset", dataset)
    with pytest.raises(MtlbenchError, match=re.escape(needle)) as info:
        e.resolve_options(opts)
    assert "\n" not in str(info.value)
