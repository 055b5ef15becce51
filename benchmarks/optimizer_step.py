"""Cost of one training step per MTL optimizer, as a ratio to equal weighting measured in the same run.

What is timed: one full training step (forward, the task losses, the method's backward/aggregation, the Adam
step, the method's after-step hook) on an MMoE-sized model: 128 dense inputs, 8 experts of 128-256-128 (our
input layer projects the 128 inputs to a 128-wide field, then experts of 256-128), one tower of 64 per task,
batch 1024, T in {2, 4, 8} binary tasks on random labels. For each method the median over the timed steps is
printed with its ratio to ``ew`` at the same T (``ew`` is timed before and after the other methods; the
reference is the mean of both medians, which cancels slow drift of the machine).

In the same run, where torchjd (0.18, a test-only dependency) has the method, its autojac path is timed on the
same model and weights: ``mtl_backward(losses, features=...)`` + ``jac_to_grad(shared, aggregator)``, Adam step.

Run: ``python benchmarks/optimizer_step.py`` (``--quick`` for a smoke run; ``--help`` for options). This is a
measurement script, not a test: numbers depend on the machine and its load, which is printed below the table.
Goals (issue 4): gradient methods at or below torchjd's ratio; loss-level methods within 1.1x of ``ew``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from mtlbench.data import FeatureSchema, TaskSpec
from mtlbench.objectives import task_loss
from mtlbench.optim import StepContext
from mtlbench.registry import build_options, get, names

TORCHJD = {"ew": ("Sum", {}), "pcgrad": ("PCGrad", {}), "mgda": ("MGDA", {}), "cagrad": ("CAGrad", {"c": 0.5}),
           "nash_mtl": ("NashMTL", "n_tasks"), "imtl": ("IMTLG", {}), "upgrad": ("UPGrad", {}),
           "aligned_mtl": ("AlignedMTL", {}), "gradvac": ("GradVac", {})}


def make(T: int, batch: int, seed: int = 0):
    torch.manual_seed(seed)
    schema = FeatureSchema(dense=tuple(f"x{i}" for i in range(128)))
    tasks = tuple(TaskSpec(f"t{i}", "binary", ("auc",)) for i in range(T))
    entry = get("arch", "mmoe")
    opts = build_options(entry.options_class, entry.resolve_options(
        {"n_experts": 8, "expert_units": [256, 128], "tower_units": [64], "dropout": 0.0, "batch_norm": True}))
    model = entry.obj(schema, tasks, 128, opts)
    g = torch.Generator().manual_seed(seed)
    data = {"dense": torch.randn(batch, 128, generator=g), "labels": (torch.rand(batch, T, generator=g) < 0.3).float(),
            "masks": torch.ones(batch, T, dtype=torch.bool)}
    return model, tasks, data


def losses_of(model, tasks, batch):
    out = model(batch)
    return out, [task_loss(t, o, batch["labels"][:, i], batch["masks"][:, i]) for i, (t, o) in
                 enumerate(zip(tasks, out.outputs))]


def time_steps(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def ours(name: str, T: int, batch: int, warmup: int, steps: int) -> float:
    model, tasks, data = make(T, batch)
    entry = get("optimizer", name)
    method = entry.obj(tuple(t.name for t in tasks), build_options(entry.options_class, entry.resolve_options({})))
    opt = torch.optim.Adam(list(model.parameters()) + list(method.parameters()), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    counter = [0]

    def step():
        out, losses = losses_of(model, tasks, data)
        opt.zero_grad(set_to_none=True)
        ctx = StepContext(model, data, out, losses, lambda: losses_of(model, tasks, data), gen, counter[0], 1)
        method.step(ctx)
        opt.step()
        method.after_step(ctx)
        counter[0] += 1

    return time_steps(step, warmup, steps)


def torchjd_step(name: str, T: int, batch: int, warmup: int, steps: int) -> float | None:
    try:
        from torchjd import aggregation
        from torchjd.autojac import jac_to_grad, mtl_backward
    except ImportError:
        return None
    if name not in TORCHJD:
        return None
    cls, kw = TORCHJD[name]
    agg = getattr(aggregation, cls)(**({"n_tasks": T} if kw == "n_tasks" else kw))
    model, tasks, data = make(T, batch)
    shared = model.shared_parameters()
    heads = [model.task_parameters()[t.name] for t in tasks]
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        out, losses = losses_of(model, tasks, data)
        opt.zero_grad(set_to_none=True)
        mtl_backward(losses, features=list(out.features), tasks_params=heads, shared_params=shared)
        jac_to_grad(shared, agg)
        opt.step()

    return time_steps(step, warmup, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="2,4,8", help="numbers of tasks")
    ap.add_argument("--methods", default=None, help="comma-separated (default: every registered optimizer)")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="T=2 only, few steps")
    ap.add_argument("--no-torchjd", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    Ts = [2] if args.quick else [int(t) for t in args.tasks.split(",")]
    steps, warmup = (4, 1) if args.quick else (args.steps, args.warmup)
    methods = args.methods.split(",") if args.methods else [m for m in names("optimizer") if m != "ew"]
    load0 = os.getloadavg()[0]
    res: dict[tuple[str, int], float] = {}
    tjd: dict[tuple[str, int], float | None] = {}
    for T in Ts:
        before = ours("ew", T, args.batch, warmup, steps)
        tjd[("ew", T)] = None if args.no_torchjd else torchjd_step("ew", T, args.batch, warmup, steps)
        for m in methods:
            res[(m, T)] = ours(m, T, args.batch, warmup, steps)
            tjd[(m, T)] = None if args.no_torchjd else torchjd_step(m, T, args.batch, warmup, steps)
        after = ours("ew", T, args.batch, warmup, steps)
        res[("ew", T)] = (before + after) / 2
    head = f"{'method':<12}" + "".join(f"{'T=' + str(T) + ' ours':>20}{'torchjd':>20}" for T in Ts)
    print(head)
    print("-" * len(head))
    for m in ["ew"] + methods:
        row = f"{m:<12}"
        for T in Ts:
            ew = res[("ew", T)]
            o = res[(m, T)]
            row += f"{o:>10.1f} ({o / ew:4.2f}x)"
            t = tjd.get((m, T))
            row += f"{t:>10.1f} ({t / ew:4.2f}x)" if t else f"{'-':>20}"
        print(row)
    print(f"ms per step (median of {steps}), ratio to our ew at the same T; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
