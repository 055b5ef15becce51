"""benchmarks/gpu_check.py runs without a GPU (skipping the GPU parts in one line), so CI exercises it."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs its full GPU parts")
def test_quick_run_without_a_gpu(tmp_path):
    env = dict(os.environ, MTLBENCH_CACHE_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    skip = [line for line in r.stdout.splitlines() if "skipping the GPU parts" in line]
    assert len(skip) == 1
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "| ok |" in line]
    assert len(rows) == 3 and "0 failed" in r.stdout


def test_the_device_comparison_finds_no_difference_between_two_cpu_runs(capsys, tmp_path, monkeypatch):
    """Part 2's comparison, run on cpu vs cpu: same seed, same record apart from timings and run-time fields."""
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(tmp_path))
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.default_job_gpu_vs_cpu(quick=True, devices=("cpu", "cpu")) == 0
    out = capsys.readouterr().out
    assert "other non-float fields that differ: none" in out
    diffs = [line.split("|")[6].strip() for line in out.splitlines() if line.startswith("| val") or
             line.startswith("| test")]
    assert diffs and all(float(d) == 0.0 for d in diffs)


def test_the_bf16_part_runs_every_arch_without_optimizer_rows(capsys, tmp_path, monkeypatch):
    """Part 1b, run on the CPU (the same autocast path as CUDA's): arch rows only, all ok."""
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(tmp_path))
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.every_method("cpu", quick=True, precision="bf16") == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "| ok |" in line]
    assert "1b. every arch (with ew) in --precision bf16" in out and len(rows) == 3
