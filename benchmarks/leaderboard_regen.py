"""Time `mtlbench leaderboard` regeneration from 1,000 generated run records (issue 5 goal: under 2 s).

The records are synthetic but complete (``mtlbench.testing.fake_record``): 2 datasets x 20 methods x 5 seeds x
5 task-set/protocol variants = 1,000 runs, with curves of 5 epochs. Timed: reading and validating every record,
building every table with its statistics, and writing all formats; figures are timed separately because
matplotlib dominates, once drawn from scratch and once regenerated over the same output directory (figures whose
inputs did not change are not redrawn). Run: ``python benchmarks/leaderboard_regen.py``. A measurement script, not a test.
"""
from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

from mtlbench.results.leaderboard import build_tables, load_store, long_frame
from mtlbench.results.report import write_leaderboard
from mtlbench.testing import fake_record, write_fake_store


def generate(directory: Path) -> int:
    rng = random.Random(0)
    recs = []
    archs = ["single", "shared_bottom", "mmoe", "home", "ple"]
    opts = ["ew", "pcgrad", "mgda", "uw"]
    for dataset in ("ecommerce", "census"):
        for variant in range(5):
            for arch in archs:
                for opt in opts:
                    base = {"ctr": 0.7 + rng.random() * 0.05, "cvr": 0.6 + rng.random() * 0.05}
                    for seed in range(5):
                        recs.append(fake_record(dataset, arch, opt, seed, base, epochs=5, noise=0.01,
                                                rng=random.Random(f"{dataset}{variant}{arch}{opt}{seed}"),
                                                arch_options={"variant": variant}))
    # protocol variants differ by epochs so each variant is its own table
    for i, r in enumerate(recs):
        r["spec"]["epochs"] = 5 + r["spec"]["arch_options"].pop("variant")
    write_fake_store(directory, recs)
    return len(recs)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "runs"
        n = generate(store)
        t0 = time.perf_counter()
        s = load_store(store)
        t1 = time.perf_counter()
        frame = long_frame(s.records)
        tables = build_tables(frame)
        t2 = time.perf_counter()
        write_leaderboard(store, Path(tmp) / "lb", formats=("md", "csv", "tex", "json"), plots=False)
        t3 = time.perf_counter()
        write_leaderboard(store, Path(tmp) / "lb2")
        t4 = time.perf_counter()
        write_leaderboard(store, Path(tmp) / "lb2")  # same records again: figures come from the figure cache
        t5 = time.perf_counter()
    print(f"{n} records, {len(tables)} tables")
    print(f"read + validate records: {t1 - t0:.2f} s; tables + statistics: {t2 - t1:.2f} s")
    print(f"full regeneration without figures (md, csv, tex, json): {t3 - t2:.2f} s  (goal < 2 s)")
    print(f"full regeneration with figures and the HTML page, first time: {t4 - t3:.2f} s")
    print(f"the same again from unchanged records (no figure redrawn): {t5 - t4:.2f} s")


if __name__ == "__main__":
    main()
