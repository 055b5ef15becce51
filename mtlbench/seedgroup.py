"""``--vectorize-seeds``: the seeds of one spec trained together in one process, with the results of separate runs.

What a group is. The specs of a sweep that differ only in their seed form a group. Each seed keeps everything a
separate run has: its own data draw, model (built from its own seed), data order, method state and generators,
its own run id and its own normal record. The group trains them in one process, one thread per seed, and lets
``workers`` of them compute at a time (the sweep's ``--jobs``: a core each, as the separate runs would have):
after every training step a seed hands its core to the seed that has waited longest, so S seeds spread evenly
over the cores instead of running in ceil(S / cores) rounds of whole runs (5 seeds on 2 cores: 2.5 runs' time
instead of 3), and the process starts, imports and plugin loading happen once.

Why not one batched model (``torch.func.stack_module_state`` + ``vmap``, or seeds stacked into grouped
parameters): on the CPU the step of these models is compute-bound (HoME's default job: batched GEMMs), so
batching saves no arithmetic, and it changes the kernels. Measured with the default job's HoME, 5 seeds, one
thread (``benchmarks/seed_group.py`` prints it): forward + backward through ``vmap`` took 1.5x the time of the 5
separate passes, and 322 of 345 gradient tensors differed from the separate runs' (batched GEMMs and BatchNorm
reduce in another order). Here every seed runs exactly the kernels, shapes and thread count of its separate run.

Same numbers as separate runs, bit for bit, on the CPU: the kernels are the same; torch's global generator, which
a separate run seeds at the start of training (dropout draws from it), is replaced per thread by a generator
seeded alike (:func:`mtlbench.layers.seeded_thread`; mtlbench's dropout layers draw from it); model building,
which draws initial weights from the global generator, runs under the group's lock. The global generator is then
left at a sentinel state, and a run whose training moved it (a plugin drawing from ``torch.rand`` without a
generator: its seeds would share one stream) is failed with a line saying so rather than stored with numbers no
separate run gives. Recorded training times exclude the time a seed waited for a core.

What cannot be grouped (one line each, before anything loads): dropout on a GPU or MPS (torch's fused dropout
kernels draw from the device's global generator and take no generator argument, so per-seed streams cannot match
separate runs): those seeds run one by one, as separate runs; ``--merger`` runs and ``--executor ray`` are
refused (a merge is not a training run; Ray places runs on its own workers).
"""
from __future__ import annotations

import collections
import json
import queue
import threading
import time
from typing import Any, Callable

DROPOUT_DEVICE_REASON = ("dropout on {device}: torch's dropout kernels there draw from the device's global "
                         "generator and take no generator, so per-seed streams cannot match separate runs")


def group_key(spec: Any) -> str:
    """Specs with the same key differ only in their seed."""
    d = spec.to_dict()
    d.pop("seed", None)
    return json.dumps(d, sort_keys=True, default=str)


def ungroupable(spec: Any) -> str | None:
    """Why this spec's seeds cannot be trained as a group with the numbers of separate runs (None: they can).
    Known before anything loads."""
    if spec.device != "cpu" and any(k.endswith("dropout") and isinstance(v, (int, float)) and v > 0
                                    for k, v in spec.arch_options.items()):
        return DROPOUT_DEVICE_REASON.format(device=spec.device)
    return None


def partition(specs: list[Any]) -> list[list[Any]]:
    """The specs grouped by :func:`group_key`, in first-seen order; an ungroupable spec is a group of one."""
    groups: dict[str, list[Any]] = {}
    out: list[list[Any]] = []
    for spec in specs:
        if ungroupable(spec) is not None:
            out.append([spec])
            continue
        key = group_key(spec)
        if key not in groups:
            groups[key] = []
            out.append(groups[key])
        groups[key].append(spec)
    return out


class Stopped(BaseException):
    """Raised in a seed's thread at its next step once the group is told to stop (Ctrl-C in the sweep)."""


class SeedGroup:
    """What the seeds of a group share: ``workers`` compute slots handed over first come, first served, the
    lock under which models are built, and the check that training left torch's global generator alone."""

    def __init__(self, seeds: list[int], workers: int, device: str = "cpu") -> None:
        self.seeds, self.workers, self.device = list(seeds), max(1, int(workers)), device
        self._cond = threading.Condition()
        self._free = self.workers
        self._queue: collections.deque[object] = collections.deque()
        self._lock = threading.Lock()
        self._sentinel: Any = None
        self.stopping = False

    def describe(self) -> dict[str, Any]:
        return {"seeds": self.seeds, "workers": self.workers,
                "note": "trained together by --vectorize-seeds (same numbers as separate runs); times exclude "
                        "waits for a core"}

    # -- compute slots -----------------------------------------------------------------------------------------
    def enter(self) -> float:
        """Wait for a slot (first come, first served); returns the seconds waited."""
        t0 = time.perf_counter()
        me = object()
        with self._cond:
            self._queue.append(me)
            while self._queue[0] is not me or self._free == 0:
                self._cond.wait()
            self._queue.popleft()
            self._free -= 1
            self._cond.notify_all()
        return time.perf_counter() - t0

    def leave(self) -> None:
        with self._cond:
            self._free += 1
            self._cond.notify_all()

    def pass_turn(self) -> float:
        """Between two steps: give the slot to a waiting seed, if any, and wait for the next free one. Returns
        the seconds waited; raises :class:`Stopped` when the group is stopping."""
        if self.stopping:
            raise Stopped()
        with self._cond:
            waiting = bool(self._queue)
        if not waiting:
            return 0.0
        self.leave()
        return self.enter()

    # -- building and the global generator ------------------------------------------------------------------
    def build(self, spec: Any, data: Any) -> Any:
        """``train.build`` under the group's lock (initialisation draws from torch's global generator), then the
        global generator is left at a sentinel state that :meth:`check_rng` compares against."""
        import torch

        from mtlbench.train import build

        with self._lock:
            try:
                return build(spec, data=data)
            finally:
                torch.manual_seed(0x5EED)
                self._sentinel = self._rng_state()

    def _rng_state(self) -> list[Any]:
        import torch

        states = [torch.get_rng_state()]
        if self.device.startswith("cuda"):
            states.append(torch.cuda.get_rng_state(torch.device(self.device)))
        return states

    def check_rng(self) -> None:
        """Fail the run when training drew from torch's global generator, which the seeds here share."""
        import torch

        from mtlbench.errors import RunFailed

        with self._lock:
            if self._sentinel is None:
                return
            same = all(torch.equal(a, b) for a, b in zip(self._rng_state(), self._sentinel))
        if not same:
            raise RunFailed("training drew from torch's global random generator, which the seeds of a "
                            "--vectorize-seeds group share: their numbers would differ from separate runs; run "
                            "these seeds without --vectorize-seeds (or draw from a torch.Generator)")


def run_group(specs: list[Any], workers: int, execute: Callable[[Any, SeedGroup], dict[str, Any]],
              on_done: Callable[[Any, dict[str, Any]], None]) -> list[Any]:
    """Train ``specs`` (one spec, several seeds) as a group: ``execute(spec, group)`` runs in one thread per
    seed and returns what the sweep collects; ``on_done(spec, out)`` is called from this thread as each seed
    finishes. Returns the specs not finished (Ctrl-C: the seeds stop at their next step)."""
    group = SeedGroup([s.seed for s in specs], min(workers, len(specs)), specs[0].device)
    results: queue.Queue = queue.Queue()

    def main(spec: Any) -> None:
        entered = False
        try:
            group.enter()
            entered = True
            results.put((spec, execute(spec, group)))
        except (Stopped, KeyboardInterrupt):
            results.put((spec, None))
        except BaseException as exc:  # never lose a seed silently
            results.put((spec, {"run_id": spec.run_id, "status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                                "record": None}))
        finally:
            if entered:
                group.leave()

    threads = [threading.Thread(target=main, args=(s,), name=f"seed-{s.seed}", daemon=True) for s in specs]
    for t in threads:
        t.start()
    unfinished, pending = [], len(threads)
    try:
        while pending:
            spec, out = results.get()
            pending -= 1
            if out is None:
                unfinished.append(spec)
            else:
                on_done(spec, out)
    except KeyboardInterrupt:
        group.stopping = True
        for t in threads:
            t.join()
        while not results.empty():
            spec, out = results.get()
            (unfinished.append(spec) if out is None else on_done(spec, out))
        raise GroupInterrupted(unfinished) from None
    for t in threads:
        t.join()
    return unfinished


class GroupInterrupted(KeyboardInterrupt):
    """Ctrl-C while a group trained; ``unfinished``: its seeds that did not finish."""

    def __init__(self, unfinished: list[Any]) -> None:
        super().__init__()
        self.unfinished = unfinished
