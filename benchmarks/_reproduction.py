"""What the reproduction scripts share: one mtlbench call with the common flags, and the driver (where the records
go, sweep unless --summary-only, summarise)."""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Callable


def run_mtlbench(argv: list[str], data_dir: str | None = None, jobs: int | None = None,
                 what: str = "") -> str | None:
    """``mtlbench`` with ``argv`` (+ ``--data-dir``/``--jobs`` when given), echoed first; a failure message or None."""
    from mtlbench import cli

    argv = argv + (["--data-dir", data_dir] if data_dir else []) + (["--jobs", str(jobs)] if jobs else [])
    print(f"== {what + ': ' if what else ''}mtlbench {' '.join(argv)}", flush=True)
    rc = cli.main(argv)
    return None if rc == 0 else f"{what + ': ' if what else ''}mtlbench exited {rc}"


def drive(name: str, default_results_dir: str, results_dir: str | None, quick: bool, summary_only: bool,
          sweep: Callable[[str], list[str]], summarise: Callable[[str], None]) -> int:
    """Run ``sweep(results_dir)`` (it returns failure messages) unless ``summary_only``, then
    ``summarise(results_dir)``. ``--quick`` without a results directory works in a temporary one, removed after.
    Returns the exit code: 0, 1 if the sweep reported failures, 2 if there is nothing to summarise."""
    tmp = None
    if results_dir is None:
        if quick:
            tmp = tempfile.TemporaryDirectory(prefix=f"{name}-quick-")
            results_dir = tmp.name
        else:
            results_dir = default_results_dir
    try:
        failures: list[str] = []
        t0 = time.perf_counter()
        if not summary_only:
            failures = sweep(results_dir)
        elif not Path(results_dir).is_dir():
            print(f"error: results directory '{results_dir}' does not exist", file=sys.stderr)
            return 2
        elapsed = time.perf_counter() - t0
        summarise(results_dir)
        if not summary_only:
            print(f"\nsweep wall time {elapsed:.0f} s (finished runs that were skipped cost nothing)")
        if tmp is not None:
            print(f"(quick mode: records were in the temporary directory {results_dir}, now removed; pass "
                  f"--results-dir to keep them)")
        for f in failures:
            print(f"warning: {f}", file=sys.stderr)
        return 1 if failures else 0
    finally:
        if tmp is not None:
            tmp.cleanup()
