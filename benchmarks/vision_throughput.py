"""Training images/s on `scenes`: mtlbench's loop against a reference loop written the way LibMTL trains NYUv2.

    pip install --no-deps LibMTL==1.1.5   # benchmark-only; --no-deps: its torchvision requirement would pull
                                          # another torch build, and the modules used here do not need it
    python benchmarks/vision_throughput.py                   # shared_bottom and mtan, default scenes (64x64)
    python benchmarks/vision_throughput.py --walltime        # also: the default scenes shared_bottom run, timed

Same model (mtlbench's SegNet shared_bottom / MTAN, same seed), same data, same batch size, same optimizer
(Adam), equal weighting, in the same process, one after the other:

- **mtlbench**: ``mtlbench.train.train`` for two epochs, timed over the second (steady state, as the reference
  skips its first two batches: oneDNN builds its kernels on the first steps): the split is pre-built tensors
  (uint8 images normalised on the device per batch), batches are slices of one permutation, losses and metrics
  stay on the device, and the model runs NHWC (``channels_last``, set by ``mtlbench.train.build``).
- **reference**: LibMTL's training loop (``LibMTL.trainer.Trainer.train``, body reproduced because that class
  hard-codes ``cuda:0`` and calls ``iterator.next()``, which current torch removed): a ``Dataset`` returning one
  sample per ``__getitem__`` (image + a dict of label maps, as LibMTL's ``examples/nyu`` dataset), a
  ``DataLoader`` with ``num_workers=2``, ``pin_memory`` and ``drop_last`` as that example sets them, LibMTL's own
  ``HPS`` architecture (one forward per task decoder) and ``EW`` weighting classes and its ``_PerformanceMeter``,
  with the example's loss and metric definitions (masked L1 / cosine losses over ``nonzero`` counts, per-batch
  metric updates on the host).

Prints images/s of both and their ratio per arch. Reference machine: 2 CPU cores; say how loaded it was.

Measured 2026-12-05 on one quiet core (the core-1 queue: taskset to one core, 1 thread, nothing else on it; the
reference's 2 workers share that core), default scenes 64x64, 480 training images, batch 32: shared_bottom
179.8 vs 94.2 img/s (1.91x), mtan 43.3 vs 25.5 img/s (1.70x). The 2x goal is not met. Where the time goes (same
core, per step of batch 32): shared_bottom NCHW 344-354 ms (forward 127-131, loss 6, backward 205-219, Adam 2),
NHWC 182-187 ms (forward 64-68, loss 8, backward 108, Adam 2). The reference's loop costs about what the bare NCHW
step costs (94.2 img/s against 90-93 for the bare step): on CPU its per-sample Dataset, workers, per-batch host
metrics and per-head forwards are cheap next to the convolutions, so the ratio is the NHWC/NCHW speed-up of the
convolutions themselves (about 1.9x for SegNet-8, 1.7x for MTAN, whose BatchNorm-heavy attention modules do not
speed up). Tried and dropped (measured by CPU time, no gain or under 4 %): fusing the dense heads' 3x3
convolutions into one (the split 1x1 heads ate the gain), batching MTAN's shared f/f' convolutions across tasks,
scatter-based unpooling, 1x1 heads as matmuls, oneDNN off (2x slower). The default scenes shared_bottom run
(`mtlbench run --dataset scenes --arch shared_bottom`, 64x64, 800 training images, 8 epochs, 5 tasks) took 47.5 s
wall (41.6 s CPU) on that core with one thread; test mIoU 0.358 against 0.093 for the constant majority-class
predictor (pixel accuracy 0.888 against 0.556).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import types

import numpy as np
import torch
import torch.nn.functional as F

from mtlbench import registry
from mtlbench.spec import build_spec
from mtlbench.train import build, train


def _libmtl():
    """Import LibMTL's modules without its package __init__ (which imports a torchvision API removed in 2021)."""
    if "LibMTL" not in sys.modules:
        spec = importlib.util.find_spec("LibMTL")
        if spec is None:
            sys.exit("LibMTL is not installed: pip install --no-deps LibMTL==1.1.5")
        pkg = types.ModuleType("LibMTL")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["LibMTL"] = pkg
    from LibMTL._record import _PerformanceMeter
    from LibMTL.architecture.HPS import HPS
    from LibMTL.loss import AbsLoss
    from LibMTL.metrics import AbsMetric
    from LibMTL.weighting.EW import EW
    return _PerformanceMeter, HPS, AbsLoss, AbsMetric, EW


class ScenesDataset(torch.utils.data.Dataset):
    """One sample per call, as LibMTL's NYUv2 example dataset: the image and a dict of label maps."""

    def __init__(self, split, tasks):
        self.t, self.tasks = split.tensors, tasks

    def __len__(self):
        return self.t["images"].shape[0]

    def __getitem__(self, i):
        labels = {}
        for task in self.tasks:
            y = self.t[task.target][i]
            if task.kind == "segmentation":
                y = y.long()
                y = torch.where(y == task.ignore_index, torch.full_like(y, -1), y)  # LibMTL's NYU ignore value
            elif task.valid:
                y = y.float() * self.t[task.valid][i].reshape(1, *y.shape[-2:])  # invalid = 0, as NYUv2 stores it
            else:
                y = y.float()
            labels[task.name] = y
        return self.t["images"][i], labels


def reference_losses_metrics(AbsLoss, AbsMetric, task):
    """The example's loss and metric for one task (examples/nyu/utils.py of LibMTL, extended to binary maps)."""

    class Loss(AbsLoss):
        def compute_loss(self, pred, gt):
            if task.kind == "segmentation":
                return F.cross_entropy(pred, gt, ignore_index=-1)
            if task.kind == "binary_map":
                return F.binary_cross_entropy_with_logits(pred, gt)
            mask = (torch.sum(gt, dim=1) != 0).float().unsqueeze(1)
            n = torch.nonzero(mask, as_tuple=False).size(0)
            if task.kind == "depth":
                return torch.sum(torch.abs(pred - gt) * mask) / n
            pred = pred / torch.norm(pred, p=2, dim=1, keepdim=True)
            return 1 - torch.sum((pred * gt) * mask) / n

    class Metric(AbsMetric):
        def update_fun(self, pred, gt):
            if task.kind == "segmentation":
                k = (gt >= 0)
                idx = gt[k] * task.n_classes + pred.argmax(1)[k]
                self.record.append(torch.bincount(idx, minlength=task.n_classes ** 2).cpu().numpy())
            elif task.kind == "binary_map":
                p = (torch.sigmoid(pred) >= 0.5).float()
                self.record.append(((p * gt).sum().item(), p.sum().item(), gt.sum().item()))
            else:
                mask = (torch.sum(gt, dim=1) != 0)
                if task.kind == "depth":
                    err = (pred - gt).abs().squeeze(1).masked_select(mask)
                    self.record.append((err.mean().item(), (err / gt.squeeze(1).masked_select(mask)).mean().item()))
                else:
                    pred = pred / torch.norm(pred, p=2, dim=1, keepdim=True)
                    cos = torch.clamp(torch.sum(pred * gt, 1).masked_select(mask), -1, 1)
                    self.record.append(np.degrees(torch.acos(cos).detach().cpu().numpy()))
            self.bs.append(pred.size(0))

        def score_fun(self):
            return [0.0]

    return Loss(), Metric()


def reference_images_per_s(data, model, spec, workers: int, batches: int) -> float:
    _PerformanceMeter, HPS, AbsLoss, AbsMetric, EW = _libmtl()
    tasks = data.tasks

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, images):
            feats = self.m.encode({"images": images})
            return feats[0] if len(feats) == 1 else list(feats)

    class MTLmodel(HPS, EW):  # what LibMTL's Trainer._prepare_model builds
        def __init__(self):
            super().__init__([t.name for t in tasks], Encoder,
                             torch.nn.ModuleDict({t.name: model.heads[t.name]["decoder"] for t in tasks}),
                             False, False, torch.device(spec.device))
            self.init_param()

    mtl = MTLmodel()
    task_dict = {}
    for t in tasks:
        loss, metric = reference_losses_metrics(AbsLoss, AbsMetric, t)
        task_dict[t.name] = {"metrics": ["m"], "metrics_fn": metric, "loss_fn": loss, "weight": [1]}
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        meter = _PerformanceMeter(task_dict, False)
    opt = torch.optim.Adam(mtl.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    loader = torch.utils.data.DataLoader(ScenesDataset(data.splits["train"], tasks), batch_size=spec.batch_size,
                                         shuffle=True, num_workers=workers, pin_memory=True, drop_last=True,
                                         persistent_workers=workers > 0)
    mtl.train()
    seen, t0, it = 0, None, 0
    while it < batches + 2:
        for x, gts in loader:
            if it == 2:
                t0, seen = time.perf_counter(), 0  # two warm-up batches
            preds = mtl(x)
            losses = torch.zeros(len(tasks))
            for tn, t in enumerate(tasks):
                losses[tn] = meter.losses[t.name]._update_loss(preds[t.name], gts[t.name])
            meter.update(preds, gts)
            opt.zero_grad()
            mtl.backward(losses)
            opt.step()
            seen += x.shape[0]
            it += 1
            if it >= batches + 2:
                break
    return seen / (time.perf_counter() - t0)


def ours_images_per_s(spec) -> tuple[float, object, object]:
    built = build(spec)
    body = train(spec, built)
    last = body["curves"][-1]  # the second epoch: every row once, timed without evaluation
    return len(built.data.splits["train"]) / last["seconds"], built.data, built.model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="shared_bottom,mtan")
    ap.add_argument("--train", type=int, default=480, help="training images (one epoch of mtlbench is timed)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="reference DataLoader workers (LibMTL's NYUv2 example: 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--walltime", action="store_true", help="also time the default scenes shared_bottom run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.workers} reference workers")
    for arch in args.archs.split(","):
        spec = build_spec(dataset="scenes", tasks=None, arch=arch, optimizer="ew", epochs=2, patience=0,
                          batch_size=args.batch_size, device="cpu", threads=args.threads,
                          dataset_options={"train": args.train, "val": 32, "test": 32})
        ours, data, _ = ours_images_per_s(spec)
        torch.manual_seed(spec.seed)
        e = registry.get("arch", arch, modality="image")
        model = e.obj(data.schema, data.tasks, spec.embed_dim, registry.build_options(e.options_class,
                                                                                     spec.arch_options))
        ref = reference_images_per_s(data, model, spec, args.workers, args.train // args.batch_size - 2)
        print(f"{arch:<14} mtlbench {ours:7.1f} img/s   LibMTL-style reference {ref:7.1f} img/s   "
              f"ratio {ours / ref:.2f}x")
    if args.walltime:
        spec = build_spec(dataset="scenes", tasks=None, arch="shared_bottom", optimizer="ew", device="cpu")
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        built = build(spec)
        body = train(spec, built)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        seg = body["metrics"]["test"]["seg"]["miou"]
        test = built.data.splits["test"]
        counts = torch.bincount(test["seg"][test["seg"] != 255].long(), minlength=built.data.tasks[0].n_classes)
        const = float(counts.max() / (counts.sum()))  # IoU of the majority class when every pixel is predicted as it
        print(f"default scenes shared_bottom run: {wall:.1f} s wall, {cpu:.1f} s CPU (data generation included unless "
              f"cached), test mIoU {seg:.4f} vs constant majority-class predictor {const / len(counts):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
