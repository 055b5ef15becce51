"""Wall time of a sweep of 12 short runs with --jobs 1, --jobs 2 and the Ray executor (issue 5 goal: jobs 2 at
least 1.7x faster than jobs 1 on 2 cores).

Each configuration runs the same 12 specs (shared_bottom and mmoe x ew and pcgrad x seeds 0-2 on a small embedded
dataset) into its own fresh results directory, through the real CLI in a subprocess. ``--jobs 1`` runs them one
after the other with all cores each; ``--jobs 2`` runs two at a time pinned to one thread each; Ray starts a local
cluster (its start-up is included, as a user pays it). Run: ``python benchmarks/sweep_speedup.py``. A measurement
script, not a test: the load average is printed, and numbers from a busy machine are not meaningful.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

GRID = ["--arch", "shared_bottom,mmoe", "--optimizer", "ew,pcgrad", "--seeds", "0-2", "--tasks", "ctr,cvr",
        "-D", "n_rows=30000", "-D", "n_users=2000", "-D", "n_items=1000", "--epochs", "2", "--quiet"]


def timed(extra: list[str], results: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mtlbench.cli", "run", *GRID, *extra, "--results-dir", results],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        one = timed(["--jobs", "1"], f"{tmp}/j1")
        two = timed(["--jobs", "2"], f"{tmp}/j2")
        ray = None
        if not args.no_ray:
            try:
                import ray as _  # noqa: F401

                ray = timed(["--executor", "ray"], f"{tmp}/ray")
            except ImportError:
                pass
    print("12 runs (shared_bottom, mmoe x ew, pcgrad x 3 seeds; 30k rows, 2 epochs)")
    print(f"--jobs 1: {one:6.1f} s")
    print(f"--jobs 2: {two:6.1f} s   speed-up {one / two:.2f}x (goal >= 1.7x)")
    if ray is not None:
        print(f"ray     : {ray:6.1f} s   speed-up {one / ray:.2f}x (includes starting a local cluster)")
    print(f"{os.cpu_count()} CPUs; load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
