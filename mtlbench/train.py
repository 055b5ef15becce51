"""One run: data -> architecture -> MTL optimizer -> model selection on validation -> test metrics -> record.

Model selection uses the validation split only: after each epoch the validation metrics are computed, the best
epoch (by ``spec.selection``) is kept, training stops after ``spec.patience`` epochs without improvement, and the
test split is evaluated once, on the selected weights. An arch made of independent per-task networks
(``selection_groups``, e.g. ``single``) is selected and stopped per task instead, as T separate runs would be. The seed fixes data generation, initialisation,
shuffling and any randomness of the MTL optimizer; on CPU the same seed gives the same numbers.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import platform
import subprocess
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

import mtlbench
from mtlbench import registry
from mtlbench.data import MultiTaskData, Split
from mtlbench.errors import MtlbenchError, RunFailed
from mtlbench.loader import BatchLoader
from mtlbench.metrics import evaluate_task, metric
from mtlbench.objectives import predict
from mtlbench.optim import MTLOptimizer, StepContext, check_compatible, present_tasks, upcast_half
from mtlbench.registry import build_options
from mtlbench.spec import RunSpec
from mtlbench.results.record import make_record
from mtlbench.vision.dense import DenseAccumulator

# Rows per evaluation batch. Larger batches gain nothing on CPU (MMoE: 6.6 us/row at 2048 and 8192) and cost
# archs with big per-row intermediates dearly (DTRN's attention over T x S sequences: 97 / 126 / 188 us/row at
# 1024 / 2048 / 8192 rows), so a moderate size serves both.
EVAL_BATCH = 2048
# Training steps between checks of the non-finite flags (each check is one host sync; see FiniteWatch).
CHECK_EVERY = 64
PROGRESS_EVERY_S = 30.0   # without a terminal, a progress line at most this often within an epoch
DIVERGENCE_FACTOR = 100.0  # an epoch's mean training loss this many times the first step's: warned in the record


@dataclass
class Built:
    """The components of a run, built and checked before any training."""

    data: MultiTaskData
    model: torch.nn.Module
    method: MTLOptimizer


def load_data(spec: RunSpec, data_dir: str | None = None) -> MultiTaskData:
    """The spec's data (its seed's draw for generated datasets), as the dataset adapter loads it."""
    ds_entry = registry.get("dataset", spec.dataset)
    adapter = ds_entry.obj(build_options(ds_entry.options_class, spec.dataset_options), data_dir=data_dir)
    return adapter.load(spec.seed)


def build(spec: RunSpec, data_dir: str | None = None, data: MultiTaskData | None = None) -> Built:
    """Load the data (unless ``data``, the spec's data already loaded, is given) and build the model and method;
    every incompatibility is one clear line."""
    ds_entry = registry.get("dataset", spec.dataset)
    if data is None:
        data = load_data(spec, data_dir)
    data = data.validate().select_tasks(spec.tasks)
    torch.manual_seed(spec.seed)
    arch_entry = registry.get("arch", spec.arch, modality=getattr(ds_entry.obj, "modality", "tabular"))
    model = arch_entry.obj(data.schema, data.tasks, spec.embed_dim,
                           build_options(arch_entry.options_class, spec.arch_options))
    model = model.to(spec.device)
    if hasattr(model, "use_channels_last"):  # image archs: NHWC convolutions (same maths, faster kernels)
        model = model.use_channels_last()
    opt_entry = registry.get("optimizer", spec.optimizer)
    method = opt_entry.obj(tuple(model.loss_tasks()),
                           build_options(opt_entry.options_class, spec.optimizer_options))
    check_compatible(method, model, spec.optimizer, spec.arch)
    return Built(data, model, method)


def evaluate(model: torch.nn.Module, data: MultiTaskData, split: Split, device: str) -> dict[str, dict[str, float]]:
    """Every task's metrics on ``split`` (masked rows excluded), at full precision.

    Predictions stay on the model's device while batches run (no sync per batch), then predictions, labels and
    masks are gathered on the CPU once, so the metrics are computed the same way whatever the device."""
    model.eval()
    outs: list[list[torch.Tensor]] = [[] for _ in data.tasks]
    # dense tasks: split-level statistics accumulated on the device (one confusion matrix for mIoU, ...)
    dense = {i: DenseAccumulator(t) for i, t in enumerate(data.tasks) if t.dense}
    with torch.no_grad():
        for batch in BatchLoader(split, eval_batch_size(model), device=device):
            for i, (task, o) in enumerate(zip(data.tasks, model(batch).outputs)):
                o = upcast_half(o)  # a bf16 run's outputs: metrics in float32 (other dtypes as they are)
                if i in dense:
                    dense[i].update(o, batch, i)
                else:
                    outs[i].append(predict(task, o).float())
    labels, masks = split["labels"].cpu(), split["masks"].cpu()
    result = {}
    for i, task in enumerate(data.tasks):
        if i in dense:
            result[task.name] = dense[i].compute()
            continue
        result[task.name] = evaluate_task(task.metrics, labels[:, i], torch.cat(outs[i]).cpu(), masks[:, i],
                                          task.label_scale)
    return result


def precision_context(precision: str, device: str | torch.device) -> contextlib.AbstractContextManager:
    """Where the forward passes run: as they are in fp32; under ``torch.autocast`` to bfloat16 in bf16 (matmuls
    and convolutions in bfloat16, the ops autocast keeps in float32 in float32). Backward passes run outside it,
    as torch recommends; parameters, gradients and the optimizer state stay float32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def float_outputs(out: Any) -> Any:
    """``out`` with float32 task outputs (and auxiliary loss): losses and metrics are computed in float32
    whatever the forward's precision. The same object when they already are (every fp32 run)."""
    outputs = getattr(out, "outputs", None)
    if outputs is None:
        return out
    upcast = [upcast_half(o) for o in outputs]
    if all(u is o for u, o in zip(upcast, outputs)):
        return out
    aux = upcast_half(out.aux) if getattr(out, "aux", None) is not None else None
    return dataclasses.replace(out, outputs=upcast, aux=aux)


def eval_batch_size(model: torch.nn.Module) -> int:
    """Rows per evaluation batch: the arch's ``eval_batch_size`` (image archs: big per-row activations), else
    EVAL_BATCH."""
    return int(getattr(model, "eval_batch_size", EVAL_BATCH))


def accumulator_dtype(device: str | torch.device) -> torch.dtype:
    """float64 for sums kept on the device (losses over an epoch), float32 on Apple's MPS, which has no float64."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def selection_score(spec: RunSpec, data: MultiTaskData, val: dict[str, dict[str, float]],
                    val_loss: float | None) -> float:
    """Higher is better. ``mean_primary``: mean over tasks of each primary metric, negated where lower is
    better; ``val_loss``: minus the summed validation loss."""
    if spec.selection == "val_loss":
        return -val_loss if val_loss is not None else -math.inf
    vals = []
    for t in data.tasks:
        v = val[t.name][t.primary_metric]
        vals.append(v if metric(t.primary_metric).direction == "max" else -v)
    finite = [v for v in vals if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else -math.inf


def task_selection_scores(spec: RunSpec, data: MultiTaskData, val: dict[str, dict[str, float]],
                          val_losses: dict[str, float] | None) -> dict[str, float]:
    """Per task, higher is better: its primary metric (negated where lower is better) under ``mean_primary``,
    minus its validation loss under ``val_loss``. Used by archs that select per task (``selection_groups``)."""
    scores = {}
    for t in data.tasks:
        if spec.selection == "val_loss":
            v = -val_losses[t.name] if val_losses is not None and t.name in val_losses else -math.inf
        else:
            v = val[t.name][t.primary_metric]
            v = v if metric(t.primary_metric).direction == "max" else -v
        scores[t.name] = v if math.isfinite(v) else -math.inf
    return scores


def _val_losses(model, data: MultiTaskData, split: Split, device: str) -> dict[str, float]:
    """Each optimised task's loss (the arch's task losses) on ``split``, averaged over batches by rows."""
    model.eval()
    names = tuple(model.loss_tasks())
    total, rows = torch.zeros(len(names), dtype=accumulator_dtype(device), device=device), 0
    with torch.no_grad():
        for batch in BatchLoader(split, eval_batch_size(model), device=device):
            n = batch["labels"].shape[0]
            losses = model.task_losses(float_outputs(model(batch)).outputs, batch)
            total += torch.stack([l.detach() for l in losses]).to(total.dtype) * n  # no sync per batch
            rows += n
    return {t: float(v) / max(rows, 1) for t, v in zip(names, total.cpu())}


class _PerTaskSelection:
    """Per-task model selection for archs whose tasks are independent networks (``selection_groups``): each
    task keeps the weights of its own best validation epoch; training stops once every task has gone
    ``patience`` epochs without improving."""

    def __init__(self, model: torch.nn.Module, groups: dict[str, str], patience: int) -> None:
        keys = list(model.state_dict())
        owners = {k: [t for t, p in groups.items() if k.startswith(p)] for k in keys}
        bad = [k for k, o in owners.items() if len(o) != 1]
        if bad:
            raise MtlbenchError(f"per-task selection: state key '{bad[0]}' belongs to {len(owners[bad[0]])} task "
                                f"networks (each key must belong to exactly one of {', '.join(groups)})")
        self.groups, self.patience = groups, patience
        self.best = {t: -math.inf for t in groups}
        self.epoch = {t: 0 for t in groups}
        self.since = {t: 0 for t in groups}
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    def update(self, model: torch.nn.Module, epoch: int, scores: dict[str, float]) -> bool:
        """Record this epoch; True when training should stop."""
        full = None
        for t, prefix in self.groups.items():
            if scores[t] > self.best[t]:
                full = model.state_dict() if full is None else full
                self.best[t], self.epoch[t], self.since[t] = scores[t], epoch, 0
                self.state[t] = {k: v.detach().clone() for k, v in full.items() if k.startswith(prefix)}
            else:
                self.since[t] += 1
        return bool(self.patience) and all(s >= self.patience for s in self.since.values())

    def assembled(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The model's state with each task's network taken from its own best epoch (None if a task never had a
        finite score)."""
        if len(self.state) != len(self.groups):
            return None
        state = dict(model.state_dict())
        for part in self.state.values():
            state.update(part)
        return state


def environment(device: str) -> dict[str, Any]:
    """Where the run ran. The device fields (``device``, ``device_name``, ``accelerator_runtime``) are the only
    parts of a record, besides timings and the spec's device, that differ between a CPU and a GPU run."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "mtlbench": mtlbench.__version__,
           "platform": platform.platform(), "device": device, "threads": torch.get_num_threads(),
           "git_sha": _git_sha()}
    kind = torch.device(device).type
    if kind == "cuda":
        env["device_name"] = torch.cuda.get_device_name(torch.device(device))
        env["accelerator_runtime"] = (f"cuda {torch.version.cuda}" if torch.version.cuda
                                      else f"hip {getattr(torch.version, 'hip', None)}")
    elif kind == "mps":
        env["device_name"] = "Apple MPS"
    elif kind == "cpu":
        env["device_name"] = _cpu_name()
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_sha() -> str | None:
    root = Path(mtlbench.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def adam_foreach(device: str | torch.device) -> bool | None:
    """Adam's multi-tensor (``foreach``) implementation on the CPU, where torch defaults to the per-tensor loop:
    the same operations in the same order, so the same numbers bit for bit (tests/test_step_speed.py checks it),
    about half the optimizer's time. Elsewhere torch's default (foreach on CUDA). Adam's ``fused`` kernel is
    faster still but rounds differently (up to 2e-7 apart after 5 steps here), so it is not used."""
    return True if torch.device(device).type == "cpu" else None


_MALLOC_TUNED = False


def keep_freed_memory(enable: bool = True) -> bool:
    """Keep freed host memory in the process instead of handing it back to the kernel (glibc only; a no-op
    elsewhere). Returns whether the setting was applied.

    Why: glibc serves blocks above its mmap threshold (at most 32 MB) with fresh ``mmap`` pages and unmaps them on
    free, so every large activation of every step (MMoE at batch 2048: [2048, 8 x 512] floats, 33.5 MB) is
    page-faulted and zeroed again: 50-60k minor faults per step. With the thresholds raised, freed blocks are
    reused: with multi-tensor Adam, that MMoE step went from 568 to 498 ms on one core (1.14x;
    benchmarks/peer_throughput.py, each arm in its own process). The numbers do not change
    (only where memory comes from); the process keeps its peak memory until it exits. ``enable=False`` restores
    glibc's default thresholds (128 KiB), for before/after measurements. Set ``MTLBENCH_KEEP_FREED_MEMORY=0`` to
    leave the allocator alone."""
    global _MALLOC_TUNED
    import ctypes
    import os
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("MTLBENCH_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if enable and _MALLOC_TUNED:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl...)
    m_trim_threshold, m_mmap_threshold = -1, -3
    if enable:  # older glibc refuses an mmap threshold above 32 MB
        ok = any(bool(mallopt(m_mmap_threshold, v)) for v in (1 << 30, 32 << 20))
        ok = ok and bool(mallopt(m_trim_threshold, 1 << 30))
    else:
        ok = bool(mallopt(m_mmap_threshold, 128 * 1024)) and bool(mallopt(m_trim_threshold, 128 * 1024))
    _MALLOC_TUNED = enable and ok
    return ok


def train(spec: RunSpec, built: Built, progress: bool = False, log: Callable[[str], None] | None = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None, group: Any = None) -> dict[str, Any]:
    """Train and evaluate; returns the record body (metrics, curves, timings). Raises RunFailed on a
    non-finite loss, naming the epoch and the task.

    ``group``: the :class:`mtlbench.seedgroup.SeedGroup` this seed is trained in (``--vectorize-seeds``): the
    run then draws its training randomness from its own thread's generator instead of torch's global one (seeded
    alike: the same numbers), hands its core to a waiting seed after every step, and its times exclude the
    waits."""
    if torch.device(spec.device).type == "cpu":
        keep_freed_memory()
    if group is None:
        torch.manual_seed(spec.seed)
        return _train(spec, built, progress, log, on_epoch, None)
    from mtlbench.layers import seeded_thread

    with seeded_thread(spec.seed):
        return _train(spec, built, progress, log, on_epoch, group)


def _train(spec: RunSpec, built: Built, progress: bool, log: Callable[[str], None] | None,
           on_epoch: Callable[[dict[str, Any]], None] | None, group: Any) -> dict[str, Any]:
    data, model, method = built.data, built.model, built.method
    device = spec.device
    shuffle_gen = torch.Generator().manual_seed(spec.seed)
    method_gen = torch.Generator().manual_seed(spec.seed + 7919)
    method.to(device)
    params = list(model.parameters()) + list(method.parameters())
    optimizer = torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay, foreach=adam_foreach(device))
    train_loader = BatchLoader(data.splits["train"], spec.batch_size, shuffle=True, generator=shuffle_gen,
                               device=device)
    val_split = data.splits["val"].to(device)
    tasks = data.tasks
    curves: list[dict[str, Any]] = []
    best_score, best_epoch, best_state, best_method_state = -math.inf, 0, None, None
    train_seconds, train_rows, step, since_best = 0.0, 0, 0, 0

    loss_names = tuple(model.loss_tasks())
    train_masks = data.splits["train"].tensors.get("masks")
    some_unlabelled = train_masks is not None and not bool(train_masks.all())  # once per run
    groups = model.selection_groups() if hasattr(model, "selection_groups") else None
    per_task = _PerTaskSelection(model, groups, spec.patience) if groups else None
    first_loss: torch.Tensor | None = None
    watch = FiniteWatch(loss_names, spec.optimizer, device)

    amp = lambda: precision_context(spec.precision, device)  # noqa: E731

    def losses_of(batch):
        with amp():
            out = model(batch)
        out = float_outputs(out)
        return out, model.task_losses(out.outputs, batch)

    for epoch in range(1, spec.epochs + 1):
        model.train()
        sums = torch.zeros(len(loss_names), dtype=accumulator_dtype(device), device=device)
        counts = torch.zeros_like(sums)  # steps in which each task had labelled rows
        weight_sums: torch.Tensor | None = None
        n_steps = 0
        t0 = time.perf_counter()
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{spec.epochs}", disable=not progress, leave=False,
                   unit="batch", dynamic_ncols=True)
        next_note = t0 + PROGRESS_EVERY_S
        waited = 0.0  # seconds this seed waited for a core in a seed group (not its training time)
        for batch in bar:
            if group is not None:
                waited += group.pass_turn()
            out, losses = losses_of(batch)
            stacked = torch.stack([l.detach() for l in losses])
            if first_loss is None:
                first_loss = stacked.sum()
            if log and not progress and n_steps % 16 == 0 and time.perf_counter() >= next_note:
                # a redirected log is not silent through a long epoch (a line at most every PROGRESS_EVERY_S)
                next_note = time.perf_counter() + PROGRESS_EVERY_S
                log(f"epoch {epoch}/{spec.epochs}: {n_steps}/{len(train_loader)} batches, "
                    f"{time.perf_counter() - t0:.0f} s")
            watch.losses(stacked)
            optimizer.zero_grad(set_to_none=True)
            ctx = StepContext(model, batch, out, losses, lambda b=batch: losses_of(b), method_gen, step, epoch)
            # a task with no labelled row here is left out of this step (counted on the host copy of the masks:
            # no device sync; skipped when the training split labels every task on every row)
            present = present_tasks(ctx, train_loader.host_label_counts) if some_unlabelled else None
            if present is not None and not present:
                continue  # no task has a label here: nothing to learn from this batch
            view = ctx if present is None else ctx.restrict(present)
            with method.only(present):
                try:
                    method.step(view)
                except Exception:
                    watch.check(epoch)  # a non-finite loss earlier is the cause (e.g. a host solver fed NaN)
                    raise
                view.apply_aux()  # the arch's auxiliary loss (e.g. CIKD), if the method's step did not add it
                watch.grads(params)
                optimizer.step()
                method.after_step(view)
            if present is None:
                sums += stacked.to(sums.dtype)
                counts += 1
            else:
                mask = torch.zeros_like(sums)
                mask[present] = 1.0
                sums += stacked.to(sums.dtype) * mask
                counts += mask
            if method.last_weights is not None:
                w = method.last_weights.detach()  # summed where the method keeps it: no copy
                w = w.to(accumulator_dtype(w.device))
                weight_sums = w if weight_sums is None else weight_sums + w.to(weight_sums.device)
            if (step + 1) % CHECK_EVERY == 0:
                watch.check(epoch)
            n_steps += 1
            step += 1
            train_rows += batch["labels"].shape[0]
            if progress and n_steps % 20 == 0:
                bar.set_postfix(loss=f"{float(stacked.sum()):.4f}")
        bar.close()
        watch.check(epoch)
        epoch_seconds = time.perf_counter() - t0 - waited
        if group is not None:
            group.check_rng()
        train_seconds += epoch_seconds
        # each task's mean over the steps where it had labels (NaN if none: methods treat it as unknown)
        sums_h, counts_h = sums.cpu().tolist(), counts.cpu().tolist()  # one copy per epoch
        train_losses = {t: s / c if c > 0 else math.nan for t, s, c in zip(loss_names, sums_h, counts_h)}
        method.end_epoch(epoch, train_losses)
        with amp():
            val = evaluate(model, data, val_split, device)
            val_losses = _val_losses(model, data, val_split, device) if spec.selection == "val_loss" else None
        val_loss = sum(val_losses.values()) if val_losses is not None else None
        score = selection_score(spec, data, val, val_loss)
        entry = {"epoch": epoch, "train_loss": {t: v if math.isfinite(v) else None for t, v in train_losses.items()},
                 "val": val, "selection_score": score,
                 "seconds": epoch_seconds}
        if per_task is not None:
            entry["task_selection_scores"] = task_selection_scores(spec, data, val, val_losses)
        if weight_sums is not None:
            entry["task_weights"] = {t: float(w) / n_steps for t, w in zip(loss_names, weight_sums)}
        curves.append(entry)
        if on_epoch:
            on_epoch(entry)
        if log:
            summary = "  ".join(f"{t.name} {t.primary_metric} {val[t.name][t.primary_metric]:.4f}" for t in tasks)
            total = sum(v for v in train_losses.values() if math.isfinite(v))
            log(f"epoch {epoch}/{spec.epochs}  train loss {total:.4f}  val {summary}")
        if per_task is not None:
            stop = per_task.update(model, epoch, entry["task_selection_scores"])
            if any(per_task.epoch[t] == epoch for t in per_task.groups):
                best_method_state = copy.deepcopy(method.state_dict())
            if stop:
                break
            continue
        if score > best_score:
            best_score, best_epoch, since_best = score, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
            best_method_state = copy.deepcopy(method.state_dict())
        else:
            since_best += 1
            if spec.patience and since_best >= spec.patience:
                break
    extra: dict[str, Any] = {}
    if per_task is not None:
        best_state = per_task.assembled(model)
        if best_state is not None:
            best_epoch = max(per_task.epoch.values())
            best_score = sum(per_task.best.values()) / len(per_task.best)
            extra["selected_epochs"] = dict(per_task.epoch)
    if best_state is None:
        raise RunFailed("no epoch produced a finite validation score")
    model.load_state_dict(best_state)
    with amp():
        metrics = {name: evaluate(model, data, data.splits[name].to(device), device)
                   for name in ("train", "val", "test")}
        extras = model.record_extras(data.splits["test"], device) if hasattr(model, "record_extras") else {}
        grid = getattr(model, "evaluate_grid", None)
        if callable(grid):  # controllable archs: their preference x budget grid, once, after selection
            extras = {**extras, **grid(data, device, evaluate, spec.batch_size)}
    return {"arch_extras": extras, "metrics": metrics, "selected_epoch": best_epoch, **extra, "epochs_run": len(curves),
            "curves": curves,
            "selection_score": best_score, "train_seconds": train_seconds,
            "train_samples_per_s": train_rows / train_seconds if train_seconds > 0 else None,
            "optimizer_state": _jsonable_state(best_method_state), "optimizer_warnings": list(method.warnings),
            "warnings": divergence_warnings(None if first_loss is None else float(first_loss), curves)}


def divergence_warnings(first_loss: float | None, curves: list[dict[str, Any]]) -> list[str]:
    """A warning when an epoch's mean training loss grew to DIVERGENCE_FACTOR times the first step's or more
    (e.g. ``--lr 1e6``: from 1.4 to 4e12): a run that diverged is stored, but should not pass unremarked."""
    if not first_loss or not math.isfinite(first_loss) or first_loss <= 0:
        return []
    for c in curves:
        total = sum(v for v in c["train_loss"].values() if v is not None)  # None: a task with no labels that epoch
        if math.isfinite(total) and total >= DIVERGENCE_FACTOR * first_loss:
            return [f"training loss grew from {first_loss:.4g} (first step) to {total:.4g} (epoch {c['epoch']} "
                    f"mean), {total / first_loss:.0e} times: the run diverged; is the learning rate too high?"]
    return []


class FiniteWatch:
    """Fails the run on a NaN or infinite loss or gradient without a host sync per step.

    Each step only updates device tensors (the first step at which each task's loss, or any gradient, was not
    finite; a step counter on the device); :meth:`check` reads them (one sync) every CHECK_EVERY steps, at the
    end of each epoch, and when a method's step raises, and names the epoch, the first bad step and the tasks.
    Up to CHECK_EVERY - 1 steps may run after the first bad one: the run is failed all the same, with the same
    reason as an eager check would give. (A sync per step to read the loss costs more than the step itself on a
    GPU at recommendation-model sizes.)"""

    def __init__(self, loss_names: tuple[str, ...], method: str, device: str | torch.device) -> None:
        self.loss_names, self.method = loss_names, method
        self.count = torch.zeros((), dtype=torch.long, device=device)
        self.bad_loss = torch.zeros(len(loss_names), dtype=torch.long, device=device)  # 0: none yet
        self.bad_grad = torch.zeros((), dtype=torch.long, device=device)

    def losses(self, stacked: torch.Tensor) -> None:
        self.count += 1
        new = ~torch.isfinite(stacked) & (self.bad_loss == 0)
        self.bad_loss = torch.where(new, self.count, self.bad_loss)

    def grads(self, params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            ok = torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
            self.bad_grad = torch.where(~ok & (self.bad_grad == 0), self.count, self.bad_grad)

    def check(self, epoch: int) -> None:
        bad_loss, bad_grad = self.bad_loss.tolist(), int(self.bad_grad)  # the one sync
        first_loss = min((s for s in bad_loss if s), default=0)
        if first_loss and (not bad_grad or first_loss <= bad_grad):
            tasks = [t for t, s in zip(self.loss_names, bad_loss) if s == first_loss]
            raise RunFailed(f"non-finite loss in epoch {epoch}, step {first_loss}, task(s) {', '.join(tasks)}")
        if bad_grad:
            raise RunFailed(f"non-finite gradient in epoch {epoch}, step {bad_grad} (optimizer '{self.method}')")


STATE_TENSOR_LIMIT = 4096  # larger state tensors (e.g. per-task gradient EMAs) are summarised, not stored


def _jsonable_state(state: Any) -> Any:
    """The method's state for the record: small tensors in full, large ones as their shape only."""
    if isinstance(state, torch.Tensor):
        if state.numel() > STATE_TENSOR_LIMIT:
            return {"tensor_shape": list(state.shape), "stored": False}
        return state.tolist()
    if isinstance(state, dict):
        return {str(k): _jsonable_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_jsonable_state(v) for v in state]
    return state


def run_to_record(spec: RunSpec, data_dir: str | None = None, progress: bool = False,
                  log: Callable[[str], None] | None = None, trackers: Any = None,
                  group: Any = None) -> dict[str, Any]:
    """Build, train and evaluate one run and return its record, status ``ok`` or ``failed`` (with the reason).
    Bad input raises MtlbenchError before any training; Ctrl-C propagates. ``group``: the seed group this run
    trains in (see :func:`train`); the model is then built under the group's lock (initialisation draws from
    torch's global generator) and the record notes the group."""
    started = time.time()
    torch.set_num_threads(spec.threads)  # part of the run's identity: results differ between thread counts
    created = datetime.now(timezone.utc)
    record: dict[str, Any] = {"status": "running", "option_defaults": _option_defaults(spec)}
    if group is not None:
        record["seed_group"] = group.describe()
    try:
        if group is None:
            built = build(spec, data_dir)
        else:
            built = group.build(spec, load_data(spec, data_dir))
        record["directions"] = {m: metric(m).direction for t in built.data.tasks for m in t.metrics}
        record["dataset"] = built.data.describe()
        record["parameters"] = built.model.parameter_counts()
        record["arch_info"] = built.model.describe()
        flops = getattr(built.model, "flops", None)
        if callable(flops):  # analytical FLOPs per sample (image archs), for compute budgets
            record["flops"] = flops()
        record["environment"] = environment(spec.device)
        if log:
            p = record["parameters"]
            log(f"parameters: {p['total']:,} ({p['shared']:,} shared)")
            if "rows_without_labels_dropped" in built.data.info:
                d = built.data.info["rows_without_labels_dropped"]
                log("dropped rows with no label for any selected task: "
                    + ", ".join(f"{s} {n:,}" for s, n in d.items()))
        body = train(spec, built, progress=progress, log=log, on_epoch=trackers.log_epoch if trackers else None,
                     group=group)
    except KeyboardInterrupt:
        raise
    except MtlbenchError as exc:
        if not isinstance(exc, RunFailed):
            raise  # bad input: one line, nothing stored
        record.update(status="failed", error={"reason": str(exc), "type": type(exc).__name__, "traceback": None},
                      wall_seconds=time.time() - started)
        record = _made(spec, created, record)
        if trackers:
            trackers.finish(record)
        return record
    except Exception as exc:  # a failed run is recorded as failed, with its reason
        record.update(status="failed", error={"reason": f"{type(exc).__name__}: {exc}", "type": type(exc).__name__,
                                              "traceback": traceback.format_exc(limit=8)},
                      wall_seconds=time.time() - started)
        record = _made(spec, created, record)
        if trackers:
            trackers.finish(record)
        return record
    record["arch_info"] = {**record.get("arch_info", {}), **body.pop("arch_extras", {})}
    record.update(status="ok", error=None, wall_seconds=time.time() - started, **body)
    record = _made(spec, created, record)
    if trackers:
        trackers.finish(record)
    return record


def _made(spec: RunSpec, created: datetime, body: dict[str, Any]) -> dict[str, Any]:
    """The stored form of the record, made and validated by the one record constructor."""
    fields = {k: v for k, v in body.items() if k not in ("status", "error")}
    return make_record(spec.to_dict(), spec.run_id, body["status"], created=created, error=body.get("error"),
                       **fields).to_dict()


def _option_defaults(spec: RunSpec) -> dict[str, Any]:
    """The arch's and optimizer's default option values, so the leaderboard can tell the full method from an
    ablation variant (None for a side whose options have no defaults)."""
    out: dict[str, Any] = {}
    for kind, name in (("arch", spec.arch), ("optimizer", spec.optimizer)):
        try:
            out[kind] = registry.resolve_options(registry.get(kind, name).options_class, {}, f"{kind} '{name}'")
        except MtlbenchError:
            out[kind] = None
    return out


def run(spec: RunSpec, results_dir: str | Path, data_dir: str | None = None, progress: bool = False,
        log: Callable[[str], None] | None = None, track: list[str] | None = None) -> tuple[Path, dict[str, Any]]:
    """Run one spec and store its record atomically; a failed run is stored, then raised as RunFailed."""
    from mtlbench.results.store import ensure_writable, finished_record, store_run

    ensure_writable(results_dir)
    trackers = None
    if track:
        from mtlbench.tracking import Trackers

        trackers = Trackers(track, spec.run_id, spec.to_dict(), results_dir)
    record = run_to_record(spec, data_dir, progress, log, trackers)
    kept = record["status"] != "ok" and finished_record(results_dir, spec.run_id) is not None
    path = store_run(results_dir, record)
    if record["status"] != "ok":
        raise RunFailed(record["error"]["reason"] + ("; the earlier finished record of this run was kept"
                                                     if kept else ""))
    return path, record
