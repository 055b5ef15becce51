"""Wall time of a sweep of 12 short runs with --jobs 1, --jobs 2 and the Ray executor (issue 5 goal: jobs 2 at
least 1.7x faster than jobs 1 on 2 cores).

Each configuration runs the same 12 specs (shared_bottom and mmoe x ew and pcgrad x seeds 0-2 on the embedded
dataset, ``--rows`` rows, ``--epochs`` epochs) into its own fresh results directory, through the real CLI in a
subprocess. Parallel runs pay a fixed cost once per worker (a spawned process imports torch and mtlbench: about
2-3 s here), so the speed-up depends on run length: with runs of about a second it is eaten by start-up; the
defaults (100k rows, 2 epochs: several seconds per run) are short runs of a realistic size. ``--jobs 1`` runs them one
after the other with all cores each; ``--jobs 2`` runs two at a time pinned to one thread each; Ray starts a local
cluster (its start-up is included, as a user pays it). Run: ``python benchmarks/sweep_speedup.py``. A measurement
script, not a test: the load average is printed, and numbers from a busy machine are not meaningful.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRID = ["--arch", "shared_bottom,mmoe", "--optimizer", "ew,pcgrad", "--seeds", "0-2", "--tasks", "ctr,cvr",
        "--quiet"]


def timed(extra: list[str], results: str, rows: int, epochs: int) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mtlbench.cli", "run", *GRID, "-D", f"n_rows={rows}", "--epochs",
                    str(epochs), *extra, "--results-dir", results], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def probe(rows: int, epochs: int, tmp: str) -> tuple[float, float, float]:
    """One mmoe x ew run alone on 1 thread, alone on every core, and two 1-thread runs side by side, each timed by
    its record's ``wall_seconds`` (the run itself, without interpreter start-up). The ceiling of --jobs 2 over
    --jobs 1 is 2 x (all-core time) / (side-by-side time), whatever the sweep machinery does."""
    base = [sys.executable, "-m", "mtlbench.cli", "run", "--arch", "mmoe", "--tasks", "ctr,cvr", "-D",
            f"n_rows={rows}", "--epochs", str(epochs), "--quiet", "--force"]

    def start(threads: int, d: str, seed: int) -> tuple[subprocess.Popen, str]:
        return subprocess.Popen([*base, "--threads", str(threads), "--seed", str(seed), "--results-dir",
                                 f"{tmp}/{d}"], stdout=subprocess.DEVNULL), f"{tmp}/{d}"

    times = []
    for procs in ([(1, "p1")], [(os.cpu_count() or 1, "pn")], [(1, "pa"), (1, "pb")]):
        started = [start(th, d, i) for i, (th, d) in enumerate(procs)]
        walls = []
        for p, d in started:
            p.wait()
            walls += [json.loads(f.read_text())["wall_seconds"] for f in Path(d).glob("*.json")]
        times.append(sum(walls) / len(walls))
    return times[0], times[1], times[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--rows", type=int, default=100_000, help="rows of the embedded dataset (default 100,000)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--no-probe", action="store_true", help="skip the thread-scaling probe")
    ap.add_argument("--probe-only", action="store_true", help="only the thread-scaling probe")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        scaling = None if args.no_probe else probe(args.rows, args.epochs, tmp)
        if args.probe_only:
            one = two = float("nan")
            args.no_ray = True
        if not args.probe_only:
            one = timed(["--jobs", "1"], f"{tmp}/j1", args.rows, args.epochs)
            two = timed(["--jobs", "2"], f"{tmp}/j2", args.rows, args.epochs)
        ray = None
        if not args.no_ray:
            try:
                import ray as _  # noqa: F401

                ray = timed(["--executor", "ray"], f"{tmp}/ray", args.rows, args.epochs)
            except ImportError:
                pass
    if not args.probe_only:
        print(f"12 runs (shared_bottom, mmoe x ew, pcgrad x 3 seeds; {args.rows:,} rows, {args.epochs} epochs; "
              f"{one / 12:.1f} s per run with --jobs 1)")
        print(f"--jobs 1: {one:6.1f} s")
        print(f"--jobs 2: {two:6.1f} s   speed-up {one / two:.2f}x (goal >= 1.7x)")
    if ray is not None and not args.probe_only:
        print(f"ray     : {ray:6.1f} s   speed-up {one / ray:.2f}x (includes starting a local cluster)")
    if scaling is not None:
        alone1, alone_all, pair = scaling
        print(f"probe, one mmoe run: {alone1:.1f} s on 1 thread, {alone_all:.1f} s on {os.cpu_count()} threads "
              f"({alone1 / alone_all:.2f}x from intra-op threads); two 1-thread runs side by side {pair:.1f} s each "
              f"(record wall times, no start-up); ceiling of --jobs 2 over --jobs 1: {2 * alone_all / pair:.2f}x")
    print(f"{os.cpu_count()} CPUs; load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
