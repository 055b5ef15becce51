"""Sweeps: a grid of run specs, executed on local processes or on Ray, resumable by rerunning the same command.

A finished run (its record exists with status ok) is never trained again: the grid is expanded into specs, their
ids are the hashes of the resolved specs, and only the missing or failed ones are run. Each run writes its own
record atomically, so killing a sweep loses at most the runs in flight, and rerunning the command resumes it.

Faults, and what each costs:

- a worker process dies (the OOM killer, a kill -9): only the run it held fails, recorded as an infrastructure
  failure (not the run's fault); a fresh worker takes its place and the sweep goes on;
- the sweep's own process dies: its workers die with it (``PR_SET_PDEATHSIG`` on Linux, and a thread watching
  the parent everywhere), so no orphan finishes the queue or sits idle holding memory;
- two sweeps over one results directory: each run is claimed atomically (``.claims/<run id>.claim``, created
  with ``O_EXCL`` under a lock) right before it starts, after checking again whether it has finished meanwhile,
  so no spec is trained twice; the claim of a process that died is taken over;
- Ctrl-C: the runs in flight are stopped (nothing recorded for them) and the summary says what was done,
  skipped, failed and interrupted.
"""
from __future__ import annotations

import itertools
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from mtlbench.errors import MtlbenchError
from mtlbench.settings import SEEDS_HELP, parse_seeds  # noqa: F401  (re-exported: scripts import them here)

CLAIMS = ".claims"
LABEL_TASKS = 4  # per-run lines name at most this many tasks (a 139-task run is "..., 139 tasks")


def expand(axes: dict[str, list[Any]], build: Callable[..., Any]) -> Iterator[Any]:
    """The cartesian product of ``axes`` (name -> values), each point built by ``build``, yielded lazily;
    points whose spec (``build``'s result, or its first element) has a run id already seen are dropped."""
    names = list(axes)
    seen: set[str] = set()
    for values in itertools.product(*(axes[n] for n in names)):
        out = build(**dict(zip(names, values)))
        spec = out[0] if isinstance(out, tuple) else out
        if spec.run_id not in seen:
            seen.add(spec.run_id)
            yield out


@dataclass
class SweepResult:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)      # finished before (or by another sweep meanwhile)
    busy: list[str] = field(default_factory=list)         # being trained by another process right now
    failed: list[tuple[str, str]] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)  # in flight or not started when Ctrl-C came
    incompatible: int = 0
    results_dir: str = ""

    def summary(self) -> str:
        head = (f"sweep: {len(self.done)} done, {len(self.skipped)} skipped (already finished), "
                f"{len(self.failed)} failed")
        if self.busy:
            head += f", {len(self.busy)} left to another process training them"
        if self.incompatible:
            head += f", {self.incompatible} incompatible combination(s) not run"
        if self.interrupted:
            head += f", {len(self.interrupted)} interrupted (not recorded; rerun the command to resume)"
        lines = [head + f"; records in {self.results_dir}"]
        for run_id, reason in self.failed:
            lines.append(f"  failed {run_id}: {reason}")
        return "\n".join(lines)


def _log_path(results_dir: str | Path, run_id: str) -> Path:
    return Path(results_dir) / "logs" / f"{run_id}.log"


# ------------------------------------------------------------------------------------------------- claims

@contextmanager
def _locked(directory: Path):
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): O_EXCL alone still keeps fresh claims unique
        yield
        return
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(results_dir: str | Path, run_id: str) -> str | None:
    """Claim ``run_id`` for this process: None when claimed, else who holds it ("pid N on HOST"). A claim whose
    process is gone (same host, pid not alive) is stale and taken over."""
    d = Path(results_dir) / CLAIMS
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{run_id}.claim"
    host = socket.gethostname()
    with _locked(d):
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid_text, _, holder_host = path.read_text().partition(" ")
                    pid = int(pid_text)
                except (OSError, ValueError):
                    pid, holder_host = -1, host  # unreadable or half-written by a dead process: stale
                holder_host = holder_host.split()[0] if holder_host.split() else host
                if holder_host != host or (pid > 0 and _alive(pid)):
                    return f"pid {pid} on {holder_host}"
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {host} {time.time():.0f}\n")
            return None
    return f"a claim file that could not be taken over: {path}"


def release(results_dir: str | Path, run_id: str) -> None:
    path = Path(results_dir) / CLAIMS / f"{run_id}.claim"
    try:
        if path.read_text().split(" ", 1)[0] == str(os.getpid()):
            path.unlink()
    except (OSError, ValueError):
        pass


# ------------------------------------------------------------------------------------------ running one spec

def execute_one(spec_dict: dict[str, Any], results_dir: str, data_dir: str | None, threads: int | None,
                plugins: list[str], write: bool = True, track: list[str] | None = None,
                group: Any = None) -> dict[str, Any]:
    """Run one spec in this process with output going to its log file; returns {run_id, status, reason,
    record}. Used in-process, by the worker processes and by Ray workers (which return the record for the
    driver to write). ``threads`` is unused (the spec carries its thread count) and kept for callers.
    ``group``: the seed group this run trains in (``--vectorize-seeds``; the plugins are loaded already)."""
    from mtlbench import registry
    from mtlbench.spec import RunSpec
    from mtlbench.results.store import store_run
    from mtlbench.train import run_to_record

    spec = RunSpec.from_dict(spec_dict)
    log = _log_path(results_dir, spec.run_id) if write else None
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
    stream = open(log, "w", buffering=1) if log else None
    try:
        if group is None:
            registry.load_builtins()
            for p in plugins:
                registry.load_plugin(p)
        say = (lambda m: print(m, file=stream)) if stream else None
        if say:
            say(f"run {spec.run_id}: {spec.label()} on {spec.device}, {spec.threads} thread(s)"
                + (f"; trained with seeds {','.join(map(str, group.seeds))} (--vectorize-seeds, {group.workers} "
                   "at a time)" if group is not None else ""))
        trackers = None
        if track:
            from mtlbench.tracking import Trackers

            trackers = Trackers(track, spec.run_id, spec.to_dict(), results_dir)
        record = run_to_record(spec, data_dir=data_dir, log=say, trackers=trackers, group=group)
        if write:
            store_run(results_dir, record)
        status = record["status"]
        reason = (record.get("error") or {}).get("reason")
        if say:
            say(f"status: {status}" + (f" ({reason})" if reason else ""))
        return {"run_id": spec.run_id, "status": status, "reason": reason, "record": None if write else record,
                "warnings": record.get("warnings") or []}
    except MtlbenchError as exc:  # bad input met inside a worker (a plugin that fails there): reported
        if stream:
            traceback.print_exc(file=stream)
        return {"run_id": spec.run_id, "status": "error", "reason": " ".join(str(exc).split()), "record": None}
    except Exception as exc:  # our own code failed around the run: not the run's fault, and recorded as such
        if stream:
            traceback.print_exc(file=stream)
        reason = f"internal error of mtlbench's sweep around this run: {type(exc).__name__}: {exc}"
        rec = crash_record(spec, reason, "InternalError")
        if write:
            try:
                store_run(results_dir, rec)
            except Exception:
                pass
        return {"run_id": spec.run_id, "status": "failed", "reason": reason, "record": None if write else rec}
    finally:
        if stream:
            stream.close()


def crash_record(spec: Any, reason: str, kind: str = "WorkerDied") -> dict[str, Any]:
    """The record of a run lost to the machinery (a dead worker, a broken pool, our own bug), marked as an
    infrastructure failure: rerunning the sweep retries it."""
    from mtlbench.results.record import make_record

    return make_record(spec.to_dict(), spec.run_id, "failed",
                       error={"reason": reason, "type": kind, "traceback": None, "infrastructure": True}).to_dict()


# ----------------------------------------------------------------------------------------------- progress

def _short(spec: Any) -> str:
    return spec.label(max_tasks=LABEL_TASKS)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class _Progress:
    """A bar over runs with an estimate of the time left on a terminal, and one short line per finished run
    (also what a redirected log shows, with the same estimate)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.n, self.t0 = total, enabled, 0, time.time()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="runs", unit="run", dynamic_ncols=True, file=sys.stderr)

    def finished(self, spec: Any, status: str, seconds: float | None, note: str = "") -> None:
        self.n += 1
        if not self.enabled:
            return
        elapsed = time.time() - self.t0
        eta = elapsed / self.n * (self.total - self.n) if self.n < self.total else 0.0
        line = (f"[{self.n}/{self.total}] {status:<6} {_short(spec)}"
                + (f"  {seconds:.1f} s" if seconds is not None else "") + (f"  {note}" if note else "")
                + (f"  (eta {_duration(eta)})" if self.n < self.total else ""))
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
            self.bar.update(1)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -------------------------------------------------------------------------------------------------- sweep

def run_sweep(specs: list[Any], results_dir: str, *, data_dir: str | None = None, jobs: int = 1,
              executor: str = "local", ray_address: str | None = None, plugins: Iterable[str] = (),
              force: bool = False, progress: bool = True, threads: int | None = None,
              track: list[str] | None = None, vectorize_seeds: bool = False) -> SweepResult:
    """Run every spec not already finished; failures are recorded and the sweep goes on. Ctrl-C stops it and
    returns what happened (``interrupted`` lists the runs not finished). ``vectorize_seeds``: the specs that
    differ only in their seed train together in this process, ``jobs`` at a time (:mod:`mtlbench.seedgroup`)."""
    from mtlbench.results.store import finished_record

    result = SweepResult(results_dir=str(results_dir))
    todo = []
    for spec in specs:
        if not force and finished_record(results_dir, spec.run_id) is not None:
            result.skipped.append(spec.run_id)
        else:
            todo.append(spec)
    (Path(results_dir) / "logs").mkdir(parents=True, exist_ok=True)
    plugins = list(plugins)
    bar = _Progress(len(todo), progress)
    started: dict[str, float] = {}

    def admit(spec: Any) -> bool:
        """Right before a run starts: finished meanwhile (another sweep)? claimed by a live process?"""
        if not force and finished_record(results_dir, spec.run_id) is not None:
            result.skipped.append(spec.run_id)
            bar.finished(spec, "skip", None, "finished meanwhile by another process")
            return False
        holder = claim(results_dir, spec.run_id)
        if holder is not None:
            result.busy.append(spec.run_id)
            bar.finished(spec, "busy", None, f"being trained by {holder}")
            return False
        started[spec.run_id] = time.time()
        return True

    def collect(spec: Any, out: dict[str, Any]) -> None:
        release(results_dir, spec.run_id)
        seconds = time.time() - started.pop(spec.run_id, time.time())
        if out["status"] == "ok":
            result.done.append(out["run_id"])
            warn = out.get("warnings") or []
            bar.finished(spec, "ok", seconds, f"warning: {warn[0]}" if warn else "")
        else:
            reason = out["reason"] or "unknown error"
            result.failed.append((out["run_id"], reason))
            bar.finished(spec, "FAILED", seconds, reason if len(reason) < 160 else reason[:157] + "...")

    queue = deque(todo)
    try:
        if executor == "ray":
            _run_ray(queue, results_dir, data_dir, plugins, ray_address, admit, collect, track)
        elif vectorize_seeds:
            _run_groups(queue, results_dir, data_dir, plugins, jobs, admit, collect, track)
        elif jobs <= 1:
            while queue:
                spec = queue.popleft()
                if admit(spec):
                    try:
                        out = execute_one(spec.to_dict(), str(results_dir), data_dir, None, plugins, True, track)
                    except KeyboardInterrupt:
                        release(results_dir, spec.run_id)
                        queue.appendleft(spec)
                        raise
                    collect(spec, out)
        else:
            _run_pool(queue, results_dir, data_dir, plugins, jobs, admit, collect, track)
    except KeyboardInterrupt:
        result.interrupted = [s.run_id for s in queue]
    finally:
        bar.close()
    return result


def _run_groups(queue: deque, results_dir, data_dir, plugins, jobs: int, admit, collect,
                track: list[str] | None = None) -> None:
    """``--vectorize-seeds``: each group of specs that differ only in their seed trains in this process, ``jobs``
    seeds at a time (:func:`mtlbench.seedgroup.run_group`); groups run one after another."""
    from mtlbench import registry, seedgroup

    registry.load_builtins()
    for p in plugins:
        registry.load_plugin(p)
    groups = seedgroup.partition(list(queue))
    for group in groups:
        admitted = [s for s in group if admit(s)]
        for s in group:
            queue.remove(s)
        if not admitted:
            continue

        def execute(spec: Any, g: Any) -> dict[str, Any]:
            return execute_one(spec.to_dict(), str(results_dir), data_dir, None, plugins, True, track, group=g)

        try:
            unfinished = seedgroup.run_group(admitted, jobs, execute, collect)
        except seedgroup.GroupInterrupted as exc:
            for s in reversed(exc.unfinished):
                release(results_dir, s.run_id)
                queue.appendleft(s)
            raise KeyboardInterrupt from None
        for s in reversed(unfinished):
            release(results_dir, s.run_id)
            queue.appendleft(s)


# ----------------------------------------------------------------------------------- the local worker pool

def _die_with_parent(parent_pid: int) -> None:
    """Make this worker die when the sweep's process does: the kernel's parent-death signal on Linux, and a
    thread that watches the parent everywhere (also covers a parent that died before prctl ran)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except Exception:
            pass
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()


def _worker_main(conn: Any, parent_pid: int) -> None:
    """A worker: runs specs sent over ``conn`` one at a time until told to stop (None) or the pipe closes.
    Ctrl-C is the parent's to handle: it stops the workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        conn.send(execute_one(*msg))


class _Worker:
    def __init__(self, ctx: Any) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, os.getpid()), daemon=True, name="mtlbench-worker")
        # started with Ctrl-C ignored (kept across exec), so a Ctrl-C while it boots cannot print a traceback
        main_thread = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
        try:
            self.proc.start()
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, old)
        child.close()
        self.spec: Any = None

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        hint = ", e.g. by the out-of-memory killer" if -code == signal.SIGKILL else ""
        return f"killed by signal {-code} ({name}{hint})"
    return f"exited with code {code}"


def _run_pool(queue: deque, results_dir, data_dir, plugins, jobs: int, admit, collect,
              track: list[str] | None = None) -> None:
    """``jobs`` worker processes, each given one run at a time. A worker that dies fails only its own run (as
    an infrastructure failure) and is replaced."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    from mtlbench.results.store import store_run

    ctx = mp.get_context("spawn")
    workers = [_Worker(ctx) for _ in range(min(jobs, len(queue)))]
    try:
        while True:
            for w in workers:
                while w.spec is None and queue:
                    spec = queue.popleft()
                    if admit(spec):
                        w.spec = spec
                        w.conn.send((spec.to_dict(), str(results_dir), data_dir, None, plugins, True, track))
            busy = [w for w in workers if w.spec is not None]
            if not busy:
                return
            ready = wait([w.conn for w in busy] + [w.proc.sentinel for w in busy])
            for i, w in enumerate(workers):
                if w.spec is None or (w.conn not in ready and w.proc.sentinel not in ready):
                    continue
                spec, out = w.spec, None
                try:
                    if w.conn.poll():
                        out = w.conn.recv()
                except (EOFError, OSError):
                    out = None
                if out is not None:
                    w.spec = None
                    collect(spec, out)
                    continue
                w.proc.join(timeout=5)
                reason = (f"the worker process running this spec was {_describe_exit(w.proc.exitcode)}: an "
                          f"infrastructure failure, not the run's own; rerun the sweep to retry it")
                store_run(results_dir, crash_record(spec, reason))
                w.spec = None
                collect(spec, {"run_id": spec.run_id, "status": "failed", "reason": reason})
                w.stop()
                workers[i] = _Worker(ctx)
    except KeyboardInterrupt:
        for w in workers:
            if w.spec is not None:
                queue.appendleft(w.spec)
        raise
    finally:
        for w in workers:
            if w.spec is not None:  # interrupted in flight: nothing recorded, the claim given back
                release(results_dir, w.spec.run_id)
            else:
                try:
                    w.conn.send(None)
                    w.proc.join(timeout=5)
                except OSError:
                    pass
            w.stop()


# -------------------------------------------------------------------------------------------------------- Ray

def _run_ray(queue: deque, results_dir, data_dir, plugins, address: str | None, admit, collect,
             track: list[str] | None = None) -> None:
    try:
        import ray
    except ImportError as exc:
        raise MtlbenchError("--executor ray needs Ray: pip install 'mtlbench[ray]'") from exc
    from mtlbench.results.store import store_run

    if address and address != "auto":
        _probe(address)
    try:
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR", ignore_reinit_error=True)
    except Exception as exc:
        raise MtlbenchError(f"cannot reach Ray at {address or 'a new local cluster'}: "
                            f"{' '.join(str(exc).split())}") from exc
    # Workers return the record; the driver writes it atomically into its own results directory, so the
    # workers need no shared filesystem. The per-run log stays on the worker's machine (local: the same dir).
    refs = {}
    while queue:
        spec = queue.popleft()
        if admit(spec):
            remote = ray.remote(num_cpus=spec.threads)(execute_one)
            refs[remote.remote(spec.to_dict(), str(results_dir), data_dir, None, plugins, False, track)] = spec
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                spec = refs.pop(ref)
                try:
                    out = ray.get(ref)
                except Exception as exc:
                    reason = (f"the Ray task running this spec failed: {' '.join(str(exc).split())[:300]}; an "
                              f"infrastructure failure, not the run's own")
                    store_run(results_dir, crash_record(spec, reason, "RayTaskFailed"))
                    collect(spec, {"run_id": spec.run_id, "status": "failed", "reason": reason})
                    continue
                if out.get("record") is not None:
                    store_run(results_dir, out["record"])
                collect(spec, out)
    except KeyboardInterrupt:
        for ref, spec in refs.items():
            ray.cancel(ref, force=True)
            release(results_dir, spec.run_id)
            queue.appendleft(spec)
        raise


def _probe(address: str, timeout: float = 3.0) -> None:
    """Fail fast, in one line, when a Ray address does not answer (ray.init would retry for minutes)."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise MtlbenchError(f"--ray-address {address!r} is not HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise MtlbenchError(f"Ray at {address} does not answer ({exc.strerror or exc})") from exc
