"""``--vectorize-seeds`` against separate runs: 5 seeds of the default job, wall time and equality of the records.

The job is README command 1's spec (``mtlbench run --arch home --tasks ctr,cvr``: the embedded e-commerce
dataset, its default 200k rows, 5 epochs, batch 1024) with ``--seeds 0-4``, run through the real CLI in a
subprocess twice per repetition, interleaved (separate, grouped, separate, grouped, ...), each into a fresh results
directory:

    separate   ``mtlbench run ... --seeds 0-4``: the sweep's default, one run per core (``--jobs`` = the cores this
               process may use; on one core the runs follow one another in one process)
    grouped    the same with ``--vectorize-seeds``: the 5 seeds trained together in one process, as many at a
               time as there are cores, each handing its core on after every step

It prints each arm's wall time (interpreter start-up included, as a user pays it), the ratio, and checks that the
two arms stored the same run ids with identical metrics and curves (bit for bit; exit code 1 if not). Then the
batched alternative (``--vmap``, on by default): one forward + backward of the 5 seeds' HoME models through
``torch.func.stack_module_state`` + ``vmap`` against the 5 separate passes, timed on one batch, and how many
gradient tensors differ from the separate passes and by how much (why ``--vectorize-seeds`` does not batch the
models on the CPU).

    python benchmarks/seed_group.py                       # the measurement (about 10-25 minutes on one core)
    python benchmarks/seed_group.py --rows 4000 --epochs 1 --reps 1     # a smoke run
    python benchmarks/seed_group.py --device cuda --single   # on a GPU (benchmarks/gpu_check.py runs this)
    taskset -c 0,1 python benchmarks/seed_group.py        # on 2 cores (the issue's goal: faster than 5 runs)

A measurement script, not a test; the load average is printed, and numbers from a busy machine mean little.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOB = ["--arch", "home", "--tasks", "ctr,cvr", "--quiet"]


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def timed_sweep(results: str, seeds: str, rows: int | None, epochs: int | None, grouped: bool,
                device: str) -> float:
    cmd = [sys.executable, "-m", "mtlbench.cli", "run", *JOB, "--seeds", seeds, "--device", device,
           "--results-dir", results]
    if rows:
        cmd += ["-D", f"n_rows={rows}"]
    if epochs:
        cmd += ["--epochs", str(epochs)]
    if grouped:
        cmd.append("--vectorize-seeds")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _metric_diff(x: dict, y: dict) -> float:
    """The largest absolute difference between two records' metrics (every split, task and metric)."""
    worst = 0.0
    for split, tasks in x.items():
        for task, ms in tasks.items():
            for m, v in ms.items():
                w = y[split][task][m]
                if isinstance(v, float) and isinstance(w, float):
                    worst = max(worst, abs(v - w))
    return worst


def compare(a: Path, b: Path) -> tuple[int, list[str]]:
    """Number of records compared and the differences found (run ids, metrics, curves without timings)."""
    ra = {p.name: json.loads(p.read_text()) for p in a.glob("*.json")}
    rb = {p.name: json.loads(p.read_text()) for p in b.glob("*.json")}
    diffs = []
    if sorted(ra) != sorted(rb):
        diffs.append(f"run ids differ: {sorted(ra)} vs {sorted(rb)}")
    for name in sorted(set(ra) & set(rb)):
        x, y = ra[name], rb[name]
        if x["status"] != "ok" or y["status"] != "ok":
            diffs.append(f"{name}: status {x['status']} / {y['status']}")
            continue
        if x["metrics"] != y["metrics"]:
            diffs.append(f"{name}: metrics differ (max abs {_metric_diff(x['metrics'], y['metrics']):.2e})")
        strip = lambda cs: [{k: v for k, v in c.items() if k != "seconds"} for c in cs]  # noqa: E731
        if strip(x["curves"]) != strip(y["curves"]):
            diffs.append(f"{name}: curves differ")
    return len(set(ra) & set(rb)), diffs


def vmap_probe(n_seeds: int, batch: int, device: str) -> dict:
    """One forward + backward of the default job's HoME for ``n_seeds`` seeds: separate passes vs one batched
    pass through torch.func (stacked module state + vmap). Times (median of 5) and gradient differences."""
    import copy

    import torch
    from torch.func import functional_call, stack_module_state, vmap

    from mtlbench.spec import build_spec
    from mtlbench.train import build

    specs = [build_spec(dataset="ecommerce", tasks=["ctr", "cvr"], arch="home", optimizer="ew", seed=s,
                        device=device, dataset_options={"n_rows": 20000}) for s in range(n_seeds)]
    builts = [build(s) for s in specs]
    models = [b.model.train() for b in builts]
    batches = [{k: v[:batch].to(device) for k, v in b.data.splits["train"].tensors.items()} for b in builts]

    def separate():
        out = []
        for m, bt in zip(models, batches):
            loss = torch.stack(m.task_losses(m(bt).outputs, bt)).sum()
            out.append(torch.autograd.grad(loss, list(m.parameters())))
        return out

    base = copy.deepcopy(models[0]).to("meta")
    params, buffers = stack_module_state(models)
    stacked = {k: torch.stack([bt[k] for bt in batches]) for k in batches[0]}

    def one(p, b, bt):
        out = functional_call(base, (p, b), (bt,))
        return torch.stack(base.task_losses(out.outputs, bt))

    def batched():
        losses = vmap(one, randomness="different")(params, buffers, stacked)
        return torch.autograd.grad(losses.sum(), list(params.values()))

    def clock(fn) -> float:
        times = []
        for _ in range(5):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    sep, bat = separate(), batched()  # also the warm-up
    n_diff, worst = 0, 0.0
    for s in range(n_seeds):
        for i, g in enumerate(bat):
            a, b = sep[s][i], g[s]
            if not torch.equal(a, b):
                n_diff += 1
                worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)))
    t_sep, t_bat = clock(separate), clock(batched)
    t_sep, t_bat = min(t_sep, clock(separate)), min(t_bat, clock(batched))
    return {"separate_s": t_sep, "vmap_s": t_bat, "grad_tensors": n_seeds * len(bat), "differing": n_diff,
            "max_rel_diff": worst}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0-4")
    ap.add_argument("--rows", type=int, default=None, help="dataset rows (default: the dataset's, 200k)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs (default: the dataset's, 5)")
    ap.add_argument("--reps", type=int, default=1, help="repetitions of the interleaved pair")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--single", action="store_true", help="also time one seed alone (the GPU goal: 5 seeds "
                    "grouped in under 2x the time of one)")
    ap.add_argument("--no-vmap", dest="vmap", action="store_false", help="skip the torch.func vmap probe")
    ap.add_argument("--vmap-only", action="store_true", help="only the torch.func vmap probe")
    args = ap.parse_args()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"seed groups: default job (home, ctr,cvr{f', {args.rows} rows' if args.rows else ''}"
          f"{f', {args.epochs} epochs' if args.epochs else ''}), seeds {args.seeds}, device {args.device}, "
          f"{cores()} core(s) usable, load average {load[0]:.2f}" if load else "", flush=True)
    ok = True
    if not args.vmap_only:
        sep_t, grp_t = [], []
        for rep in range(args.reps):
            with tempfile.TemporaryDirectory() as tmp:
                a, b = Path(tmp, "separate"), Path(tmp, "grouped")
                sep_t.append(timed_sweep(str(a), args.seeds, args.rows, args.epochs, False, args.device))
                grp_t.append(timed_sweep(str(b), args.seeds, args.rows, args.epochs, True, args.device))
                n, diffs = compare(a, b)
                ok = ok and not diffs
                print(f"  rep {rep + 1}: separate {sep_t[-1]:.1f} s, grouped {grp_t[-1]:.1f} s "
                      f"({sep_t[-1] / grp_t[-1]:.2f}x); {n} records compared: "
                      + ("identical metrics and curves" if not diffs else "; ".join(diffs[:5])), flush=True)
        s, g = statistics.median(sep_t), statistics.median(grp_t)
        print(f"separate runs {s:.1f} s, --vectorize-seeds {g:.1f} s: {s / g:.2f}x "
              f"(median of {args.reps}; load average now {os.getloadavg()[0]:.2f})", flush=True)
        if args.single:
            from mtlbench.settings import parse_seeds

            with tempfile.TemporaryDirectory() as tmp:
                one = timed_sweep(tmp, str(parse_seeds(args.seeds)[0]), args.rows, args.epochs, False, args.device)
            print(f"one seed alone {one:.1f} s: {len(parse_seeds(args.seeds))} seeds with --vectorize-seeds take "
                  f"{g / one:.2f}x its time, separately {s / one:.2f}x", flush=True)
    if args.vmap or args.vmap_only:
        import torch

        torch.set_num_threads(1)
        from mtlbench.settings import parse_seeds

        n = len(parse_seeds(args.seeds))
        r = vmap_probe(n, 1024, args.device)
        print(f"torch.func vmap, one forward+backward of {n} HoME models at batch 1024 (1 thread): separate "
              f"{r['separate_s'] * 1e3:.0f} ms, vmap {r['vmap_s'] * 1e3:.0f} ms ({r['separate_s'] / r['vmap_s']:.2f}x); "
              f"{r['differing']} of {r['grad_tensors']} gradient tensors differ from the separate passes "
              f"(max |diff| / max |grad| {r['max_rel_diff']:.2g})", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
