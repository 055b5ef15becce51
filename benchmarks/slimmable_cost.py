"""What a controllable slimmable network (``slimmable``, issue 11) costs: training time against one fixed-width
model in the same process, the search's latency per request, and the analytical FLOPs against a hand count.

    python benchmarks/slimmable_cost.py              # the published scenes protocol (32x32, 256 images, batch 32)
    python benchmarks/slimmable_cost.py --steps 16 --repeats 5

1. Training cost: the published controllable model (sandwich rule: widest + narrowest + 2 random configurations
   per step, CIKD) and the same arch trained as one fixed full-width model (``fixed_budget=1``: one forward and
   backward per step), same data, seed, batch, Adam, equal weighting, one after the other, ``--repeats`` times
   alternating; the median seconds per training step of each and their ratio. Also the sandwich without CIKD,
   and one ``evaluate_grid`` call (64 grid points after training, BN recalibration per configuration).
2. Search latency: ``--requests`` random (budget, preference) requests on the model's FLOPs table, 3 tasks (the
   published model) and 5 tasks (scenes' seg, depth, normal, boundary, foreground); median and 95th percentile.
3. FLOPs: one configuration (encoder 0.5, decoders seg 1 / depth 0.25 / normal 0.75) counted by hand, layer by
   layer from the shapes, against the FLOPs table and against ``count_macs`` run at that configuration.

Reference machine: 2 CPU cores shared with other engineers' jobs; run it alone on its core (``/work/q.sh 1``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch


def _data(tasks: tuple[str, ...]):
    from mtlbench import registry
    from mtlbench.registry import build_options

    e = registry.get("dataset", "scenes")
    opts = {"resolution": 32, "train": 256, "val": 96, "test": 192, "classes": 4, "objects": 4, "fov": 70.0,
            "noise": 0.02}
    return e.obj(build_options(e.options_class, e.resolve_options(opts))).load(0).select_tasks(tasks)


def _model(data, **options):
    from mtlbench import registry
    from mtlbench.registry import build_options

    torch.manual_seed(0)
    e = registry.get("arch", "slimmable", modality="image")
    return e.obj(data.schema, data.tasks, 16, build_options(e.options_class, e.resolve_options(
        {"encoder": "segnet", "width": 8, "depth": 3, **options})))


def _step_seconds(model, data, steps: int) -> float:
    from mtlbench.loader import BatchLoader
    from mtlbench.optim import StepContext

    adam = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    loader = BatchLoader(data.splits["train"], 32, shuffle=True, generator=torch.Generator().manual_seed(0))
    model.train()
    batches = []
    while len(batches) < steps + 1:
        batches += list(loader)
    times = []
    for i, batch in enumerate(batches[:steps + 1]):
        t0 = time.perf_counter()
        out = model(batch)
        losses = model.task_losses(out.outputs, batch)
        adam.zero_grad(set_to_none=True)
        ctx = StepContext(model, batch, out, losses, lambda: None, gen, i, 1)
        ctx.backward()
        adam.step()
        if i:  # the first step warms up allocators
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def training_cost(steps: int, repeats: int) -> dict:
    data = _data(("seg", "depth", "normal"))
    models = {"controllable (sandwich n=2, CIKD)": _model(data), "controllable without CIKD": _model(
        data, cikd_weight=0.0), "fixed full width": _model(data, fixed_budget=1.0)}
    per = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            per[k].append(_step_seconds(m, data, steps))
    med = {k: statistics.median(v) for k, v in per.items()}
    from mtlbench.train import evaluate

    m = models["controllable (sandwich n=2, CIKD)"]
    t0 = time.perf_counter()
    grid = m.evaluate_grid(data, "cpu", evaluate, 32)["controllable"]
    grid_s = time.perf_counter() - t0
    ref = med["fixed full width"]
    return {"seconds_per_step": med, "ratio_to_fixed": {k: v / ref for k, v in med.items()},
            "grid_seconds": grid_s, "grid_configs_evaluated": len(grid["configs"]), "grid_points": len(grid["grid"])}


def search_latency(requests: int) -> dict:
    from mtlbench.vision.slim_search import search

    out = {}
    for tasks in (("seg", "depth", "normal"), ("seg", "depth", "normal", "boundary", "foreground")):
        table = _model(_data(tasks)).flops_table()
        rng = np.random.default_rng(0)
        T = len(tasks)
        ms = []
        for _ in range(requests):
            r = rng.dirichlet(np.ones(T))
            b = rng.uniform(table.minimum, table.full)
            t0 = time.perf_counter()
            search(table, b, r)
            ms.append(1000 * (time.perf_counter() - t0))
        out[f"{T} tasks"] = {"median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)),
                             "requests": requests}
    return out


def hand_count() -> dict:
    """Encoder 0.5 (SegNet width 8, depth 3: channels 4, 8, 16), decoders seg 1 (8 ch), depth 0.25 (2 ch),
    normal 0.75 (6 ch), at 32x32; each prediction layer has its task's output channels."""
    from mtlbench.vision.nets import count_macs
    from mtlbench.vision.slim_search import Config

    data = _data(("seg", "depth", "normal"))
    m = _model(data)
    out_dim = {t.name: t.output_dim for t in data.tasks}
    P0, P1, P2 = 32 * 32, 16 * 16, 8 * 8
    a, b, c = 4, 8, 16                       # encoder channels per level at width 0.5
    k = 9
    enc = (P0 * a * 3 * k + P0 * a * a * k                       # level 0: conv 3->a, conv a->a
           + P1 * b * a * k + 2 * P1 * b * b * k                 # level 1: a->b, 2x b->b
           + P2 * c * b * k + 2 * P2 * c * c * k                 # level 2: b->c, 2x c->c
           + P2 * b * c * k + 2 * P2 * b * b * k                 # decoder level 2: c->b, 2x b->b
           + P1 * a * b * k + 2 * P1 * a * a * k                 # decoder level 1: b->a, 2x a->a
           + P0 * a * a * k + P0 * a * a * k)                    # decoder level 0: a->a, a->a
    dec = {}
    for t, h in (("seg", 8), ("depth", 2), ("normal", 6)):      # decoder hidden channels at 1 / 0.25 / 0.75 of 8
        dec[t] = P0 * (h * a * k + h * h * k + out_dim[t] * h)   # 3x3 a->h, 3x3 h->h, 1x1 h->out
    hand = 2 * (enc + sum(dec.values()))
    cfg = Config(0.5, (1.0, 0.25, 0.75))
    table = m.flops_table().flops(cfg)
    with m.use(cfg):
        groups = {"shared": m.shared, **{f"task:{t}": m.heads[t] for t in m.task_names}}
        batch = {"images": torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "masks": torch.ones(1, 3, dtype=torch.bool)}
        counted = 2 * sum(count_macs(m, lambda: m(batch), groups).values())
    return {"config": cfg.to_dict(m.task_names), "hand_flops": hand, "table_flops": table, "count_macs_flops": counted,
            "equal": hand == table == counted}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8, help="training steps timed per repeat (default 8: one epoch)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = {"hand_count": hand_count(), "search_latency": search_latency(args.requests),
           "training_cost": training_cost(args.steps, args.repeats), "threads": args.threads}
    h = res["hand_count"]
    print(f"FLOPs of {h['config']}: hand {h['hand_flops']:,}, table {h['table_flops']:,}, count_macs "
          f"{h['count_macs_flops']:,} -> {'equal' if h['equal'] else 'DIFFERENT'}")
    for k, v in res["search_latency"].items():
        print(f"search, {k}: median {v['median_ms']:.3f} ms, p95 {v['p95_ms']:.3f} ms over {v['requests']} requests")
    tc = res["training_cost"]
    for k, v in tc["seconds_per_step"].items():
        print(f"train step, {k}: {1000 * v:.1f} ms ({tc['ratio_to_fixed'][k]:.2f}x the fixed full-width model)")
    print(f"evaluation grid: {tc['grid_seconds']:.1f} s ({tc['grid_configs_evaluated']} configurations for "
          f"{tc['grid_points']} grid points)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if h["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
