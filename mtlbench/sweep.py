"""Sweeps: a grid of run specs, executed on local processes or on Ray, resumable by rerunning the same command.

A finished run (its record exists with status ok) is never trained again: the grid is expanded into specs, their
ids are the hashes of the resolved specs, and only the missing or failed ones are run. Each run writes its own
record atomically, so killing a sweep loses at most the runs in flight, and rerunning the command resumes it.
"""
from __future__ import annotations

import itertools
import os
import re
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm.auto import tqdm

from mtlbench.errors import MtlbenchError
from mtlbench.spec import RunSpec
from mtlbench.results.store import finished_record, record_path, store_run

SEEDS_HELP = "seeds: N (the first N seeds, 0..N-1), a range A-B (inclusive) or a list 0,3,7 (combinable: 0-2,7)"


def parse_seeds(text: str) -> list[int]:
    """``"5"`` -> 0..4; ``"0-4"`` -> 0..4; ``"1,3,7"``; ``"0-2,9"``; duplicates removed, order kept."""
    text = str(text).strip()
    if re.fullmatch(r"\d+", text):
        n = int(text)
        if n < 1:
            raise MtlbenchError(f"--seeds {text!r}: need at least one seed ({SEEDS_HELP})")
        return list(range(n))
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if b < a:
                raise MtlbenchError(f"--seeds {text!r}: range {part} runs backwards ({SEEDS_HELP})")
            seeds.extend(range(a, b + 1))
        elif re.fullmatch(r"\d+", part):
            seeds.append(int(part))
        else:
            raise MtlbenchError(f"--seeds {text!r} does not parse ({SEEDS_HELP})")
    return list(dict.fromkeys(seeds))


def expand(axes: dict[str, list[Any]], build: Callable[..., RunSpec]) -> list[RunSpec]:
    """The cartesian product of ``axes`` (name -> values), each point built into a spec; duplicates dropped."""
    names = list(axes)
    specs: dict[str, RunSpec] = {}
    for values in itertools.product(*(axes[n] for n in names)):
        spec = build(**dict(zip(names, values)))
        specs.setdefault(spec.run_id, spec)
    return list(specs.values())


@dataclass
class SweepResult:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    results_dir: str = ""

    def summary(self) -> str:
        lines = [f"sweep: {len(self.done)} done, {len(self.skipped)} skipped (already finished), "
                 f"{len(self.failed)} failed; records in {self.results_dir}"]
        for run_id, reason in self.failed:
            lines.append(f"  failed {run_id}: {reason}")
        return "\n".join(lines)


def _log_path(results_dir: str | Path, run_id: str) -> Path:
    return Path(results_dir) / "logs" / f"{run_id}.log"


def execute_one(spec_dict: dict[str, Any], results_dir: str, data_dir: str | None, threads: int | None,
                plugins: list[str], write: bool = True, track: list[str] | None = None) -> dict[str, Any]:
    """Run one spec in this process with output going to its log file; returns {run_id, status, reason,
    record}. Used by the process pool and by Ray workers (which return the record for the driver to write)."""
    import torch

    from mtlbench import registry
    from mtlbench.errors import RunFailed
    from mtlbench.train import run_to_record

    spec = RunSpec.from_dict(spec_dict)
    if threads:
        torch.set_num_threads(threads)
    log = _log_path(results_dir, spec.run_id) if write else None
    stream = open(log, "w", buffering=1) if log else None
    try:
        registry.load_builtins()
        for p in plugins:
            registry.load_plugin(p)
        say = (lambda m: print(m, file=stream)) if stream else None
        if say:
            say(f"run {spec.run_id}: {spec.label()} on {spec.device}, {torch.get_num_threads()} thread(s)")
        trackers = None
        if track:
            from mtlbench.tracking import Trackers

            trackers = Trackers(track, spec.run_id, spec.to_dict(), results_dir)
        record = run_to_record(spec, data_dir=data_dir, log=say, trackers=trackers)
        if write:
            store_run(results_dir, record)
        status = record["status"]
        reason = (record.get("error") or {}).get("reason")
        if say:
            say(f"status: {status}" + (f" ({reason})" if reason else ""))
        return {"run_id": spec.run_id, "status": status, "reason": reason, "record": None if write else record}
    except Exception as exc:  # bad input inside a worker: reported, the sweep goes on
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if stream:
            traceback.print_exc(file=stream)
        return {"run_id": spec.run_id, "status": "error", "reason": reason, "record": None}
    finally:
        if stream:
            stream.close()


def run_sweep(specs: list[RunSpec], results_dir: str, *, data_dir: str | None = None, jobs: int = 1,
              executor: str = "local", ray_address: str | None = None, plugins: Iterable[str] = (),
              force: bool = False, progress: bool = True, threads: int | None = None,
              track: list[str] | None = None) -> SweepResult:
    """Run every spec not already finished; failures are recorded and the sweep goes on."""
    result = SweepResult(results_dir=str(results_dir))
    todo = []
    for spec in specs:
        if not force and finished_record(results_dir, spec.run_id) is not None:
            result.skipped.append(spec.run_id)
        else:
            todo.append(spec)
    (Path(results_dir) / "logs").mkdir(parents=True, exist_ok=True)
    plugins = list(plugins)
    bar = tqdm(total=len(todo), desc="runs", unit="run", disable=not progress, dynamic_ncols=True)

    def collect(out: dict[str, Any]) -> None:
        if out["status"] == "ok":
            result.done.append(out["run_id"])
        else:
            result.failed.append((out["run_id"], out["reason"] or "unknown error"))
        bar.update(1)
        bar.set_postfix(done=len(result.done), failed=len(result.failed))

    try:
        if executor == "ray":
            _run_ray(todo, results_dir, data_dir, plugins, ray_address, collect, threads or 1, track)
        elif jobs <= 1:
            for spec in todo:
                collect(execute_one(spec.to_dict(), str(results_dir), data_dir, threads or _threads_per_job(1),
                                    plugins, True, track))
        else:
            _run_pool(todo, results_dir, data_dir, plugins, jobs, collect, threads or _threads_per_job(jobs), track)
    finally:
        bar.close()
    return result


def _threads_per_job(jobs: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // jobs)


def _run_pool(todo: list[RunSpec], results_dir, data_dir, plugins, jobs: int, collect, threads: int,
              track: list[str] | None = None) -> None:
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        pending: dict[Future, RunSpec] = {
            pool.submit(execute_one, s.to_dict(), str(results_dir), data_dir, threads, plugins, True, track): s
            for s in todo}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    spec = pending.pop(fut)
                    try:
                        collect(fut.result())
                    except Exception as exc:  # the worker process died (e.g. out of memory)
                        reason = f"worker crashed: {type(exc).__name__}: {exc}"
                        store_run(results_dir, _crash_record(spec, reason))
                        collect({"run_id": spec.run_id, "status": "failed", "reason": reason})
        except KeyboardInterrupt:
            for fut in pending:
                fut.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _crash_record(spec: RunSpec, reason: str) -> dict[str, Any]:
    from mtlbench.results.store import RECORD_SCHEMA

    return {"schema": RECORD_SCHEMA, "run_id": spec.run_id, "spec": spec.to_dict(), "status": "failed",
            "error": {"reason": reason, "type": "WorkerCrash", "traceback": None}, "created": time.time()}


def _run_ray(todo: list[RunSpec], results_dir, data_dir, plugins, address: str | None, collect,
             threads: int, track: list[str] | None = None) -> None:
    try:
        import ray
    except ImportError as exc:
        raise MtlbenchError("--executor ray needs Ray: pip install 'mtlbench[ray]'") from exc
    if address and address != "auto":
        _probe(address)
    try:
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR", ignore_reinit_error=True)
    except Exception as exc:
        raise MtlbenchError(f"cannot reach Ray at {address or 'a new local cluster'}: "
                            f"{' '.join(str(exc).split())}") from exc
    remote = ray.remote(num_cpus=threads)(execute_one)
    # Workers return the record; the driver writes it atomically into its own results directory, so the
    # workers need no shared filesystem. The per-run log stays on the worker's machine (local: the same dir).
    refs = {remote.remote(s.to_dict(), str(results_dir), data_dir, threads, plugins, False, track): s
            for s in todo}
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                spec = refs.pop(ref)
                try:
                    out = ray.get(ref)
                except Exception as exc:
                    reason = f"ray task failed: {' '.join(str(exc).split())[:300]}"
                    store_run(results_dir, _crash_record(spec, reason))
                    collect({"run_id": spec.run_id, "status": "failed", "reason": reason})
                    continue
                if out.get("record") is not None:
                    store_run(results_dir, out["record"])
                collect(out)
    except KeyboardInterrupt:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise


def _probe(address: str, timeout: float = 3.0) -> None:
    """Fail fast, in one line, when a Ray address does not answer (ray.init would retry for minutes)."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise MtlbenchError(f"--ray-address {address!r} is not HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise MtlbenchError(f"Ray at {address} does not answer ({exc.strerror or exc})") from exc
