"""Step cost against the number of tasks T for every gradient method (issue 16: usable at 100+ tasks?).

What is timed: one full training step (forward, the T task losses, the method's step, the Adam step, its
after-step hook) of a Shared-Bottom model (64 dense inputs projected to 64, a bottom of 256-128, one tower of 32
per task, regression with MSE), batch 512, T in {2, 8, 32, 64, 128} (``--tasks``). Every registered optimizer
that needs per-task gradients of the shared parameters or a shared representation is timed, and ``ew`` as the
reference; the table gives the median milliseconds per step, the ratio to ``ew`` at the same T, and whether the
method warned (a solver that did not converge says so once per run: ``!`` in the table, the messages below).

Where the cost goes: per-task gradients need T backward passes through the heads plus one batched VJP through
the shared trunk (``ctx.jacobian()``), so every Jacobian method costs O(T) backward work; on top, the method's
solver works on the T x T Gramian (O(T^2) to O(T^3) host work). F-MTL adds T perturbed forward/backward passes.

Run: ``python benchmarks/step_cost_vs_tasks.py`` (``--quick``: T in {2, 16}, two steps). This is a measurement
script, not a test: numbers depend on the machine and its load (printed below the table).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch

from mtlbench.data import FeatureSchema, TaskSpec
from mtlbench.objectives import task_loss
from mtlbench.optim import StepContext
from mtlbench.registry import build_options, get, names


def gradient_methods() -> list[str]:
    """Registered optimizers that need per-task gradients or the shared representation (by default options)."""
    out = []
    for name in names("optimizer"):
        entry = get("optimizer", name)
        method = entry.obj(("a", "b"), build_options(entry.options_class, entry.resolve_options({})))
        if method.requires:
            out.append(name)
    return out


def make(T: int, batch: int, seed: int = 0):
    torch.manual_seed(seed)
    schema = FeatureSchema(dense=tuple(f"x{i}" for i in range(64)))
    tasks = tuple(TaskSpec(f"t{i}", "regression", ("rmse",)) for i in range(T))
    entry = get("arch", "shared_bottom")
    opts = build_options(entry.options_class, entry.resolve_options({"bottom_units": [256, 128],
                                                                      "tower_units": [32]}))
    model = entry.obj(schema, tasks, 64, opts)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 64, generator=g)
    data = {"dense": x, "labels": x[:, :T % 64 or 1].sum(1, keepdim=True) * torch.randn(1, T, generator=g)
            + torch.randn(batch, T, generator=g), "masks": torch.ones(batch, T, dtype=torch.bool)}
    return model, tasks, data


def losses_of(model, tasks, batch):
    out = model(batch)
    return out, [task_loss(t, o, batch["labels"][:, i], batch["masks"][:, i]) for i, (t, o) in
                 enumerate(zip(tasks, out.outputs))]


def measure(name: str, T: int, batch: int, warmup: int, steps: int) -> tuple[float, list[str]]:
    model, tasks, data = make(T, batch)
    entry = get("optimizer", name)
    method = entry.obj(tuple(t.name for t in tasks), build_options(entry.options_class, entry.resolve_options({})))
    opt = torch.optim.Adam(list(model.parameters()) + list(method.parameters()), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    times = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # collected from method.warnings instead
        for k in range(warmup + steps):
            t0 = time.perf_counter()
            out, losses = losses_of(model, tasks, data)
            opt.zero_grad(set_to_none=True)
            ctx = StepContext(model, data, out, losses, lambda: losses_of(model, tasks, data), gen, k, 1)
            method.step(ctx)
            opt.step()
            method.after_step(ctx)
            if k >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, list(method.warnings)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="2,8,32,64,128", help="comma-separated task counts")
    p.add_argument("--methods", default=None, help="comma-separated optimizers (default: every gradient method)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="T in {2, 16}, two steps")
    a = p.parse_args(argv)
    Ts = [2, 16] if a.quick else [int(t) for t in a.tasks.split(",")]
    steps = 2 if a.quick else a.steps
    methods = a.methods.split(",") if a.methods else gradient_methods()
    rows, notes = [], []
    for name in ["ew", *methods]:
        row = [name]
        for T in Ts:
            ms, warned = measure(name, T, a.batch, a.warmup, steps)
            row.append((ms, bool(warned)))
            notes += [f"{name}, T={T}: {w}" for w in warned]
            print(f"  {name:12s} T={T:4d}  {ms:9.1f} ms{'  (warned)' if warned else ''}", flush=True)
        rows.append(row)
    ew = {T: rows[0][i + 1][0] for i, T in enumerate(Ts)}
    print()
    print("| method | " + " | ".join(f"T={T} ms (x ew)" for T in Ts) + " |")
    print("|---|" + "---|" * len(Ts))
    for row in rows:
        cells = [f"{ms:.0f} ({ms / ew[T]:.1f}x){' !' if warned else ''}" for (ms, warned), T in zip(row[1:], Ts)]
        print(f"| {row[0]} | " + " | ".join(cells) + " |")
    print(f"\nmedian of {steps} steps after {a.warmup} warm-up; batch {a.batch}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for n in notes:
        print(f"! {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
