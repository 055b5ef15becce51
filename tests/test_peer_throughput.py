"""benchmarks/peer_throughput.py runs (a smoke run; the peers of the `bench` extra are used when installed,
each skipped in one line when not). It measures speed and asserts nothing about it; this only keeps it working."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "peer_throughput.py"


def test_quick_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--steps", "1", "--embed-dim", "4", "--quality"],
                       capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "ms / step" not in line]
    assert any(row.startswith("| mtlbench (its train loop) |") for row in rows)
    assert any(row.startswith("| GEMM floor") for row in rows)
    assert "goal:" in r.stdout
    # --quality: each arm's test AUCs, two probabilities-based numbers in (0, 1) per arm
    auc_rows = [row for row in rows if row.count("|") == 4 and "AUC" not in row and "---" not in row]
    assert any(row.startswith("| mtlbench --precision bf16 |") for row in auc_rows), r.stdout
    for row in auc_rows:
        assert all(0.0 < float(v) < 1.0 for v in row.strip("| ").split(" | ")[1:]), row
