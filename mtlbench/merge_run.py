"""One merge run: recipe + merger -> zoo (cached) -> merged encoder(s) -> the same evaluator -> a run record.

The *recipe* is an ordinary :class:`RunSpec` (dataset, task set, arch, epochs, batch size, lr, ..., seed): it
fixes how every expert is fine-tuned, and it is the protocol of the leaderboard table, so joint multi-task
fine-tuning with the same settings (``mtlbench run --arch minilm --optimizer ew``) lands in the same table at the
same total fine-tuning budget (E epochs over each task's rows = E epochs over all rows). A merge spec is the
recipe's fields plus ``merger`` and its resolved ``merger_options``; its hash is the run id.

Metrics: per-task accuracy on val and test; the record's ``merge`` block adds mean accuracy, normalised accuracy
(merged / same-seed expert, per task and mean, as tall_masks' ``avg_normalized_top1``), the merger's declared data
access and task-id need, what it chose (λ, masks...), and the cost split into zoo cost (the experts' fine-tuning
wall time, amortised over every merger) and merge cost (the merger's own time, validation evaluations,
unlabelled samples).
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import traceback
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from mtlbench import registry
from mtlbench.errors import MtlbenchError, RunFailed
from mtlbench.merging import MergeContext, MergeOutput, TaskVectors
from mtlbench.spec import RunSpec

MERGE_SPEC_VERSION = 1
EVAL_BATCH = 64  # rows per evaluation forward: measured fastest of 64-512 (length-sorted rows: least padding)


def build_merge_spec(recipe: RunSpec, merger: str, merger_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resolved merge spec (a dict: the recipe's fields + merger, its options and declarations)."""
    from mtlbench.merging import merger_declaration

    entry = registry.get("merger", merger)
    arch = registry.get("arch", recipe.arch)
    if not getattr(arch.obj, "mergeable", False):
        mergeable = [e.name for e in registry.entries("arch") if getattr(e.obj, "mergeable", False)]
        raise MtlbenchError(f"arch '{recipe.arch}' has no pretrained encoder to merge (mergeable archs: "
                            f"{', '.join(mergeable) or 'none'})")
    options = entry.resolve_options(merger_options)
    spec = recipe.to_dict()
    spec.update(merger=merger, merger_options=options, merge_spec_version=MERGE_SPEC_VERSION,
                **merger_declaration(merger, options))
    if h := entry.source_hash():
        spec["plugin_sources"] = {**spec["plugin_sources"], f"merger:{merger}": h}
    return spec


def merge_run_id(spec: dict[str, Any]) -> str:
    """The hash of the recipe's canonical form (the run-id conventions of :class:`RunSpec`) plus the merger."""
    names = {f.name for f in fields(RunSpec)}
    canon = json.loads(recipe_of(spec).canonical_json())
    canon.update({k: v for k, v in spec.items() if k not in names})
    return hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:20]


def recipe_of(spec: dict[str, Any]) -> RunSpec:
    names = {f.name for f in fields(RunSpec)}
    return RunSpec.from_dict({k: v for k, v in spec.items() if k in names})


def label(spec: dict[str, Any]) -> str:
    return f"{spec['arch']} × merge:{spec['merger']} on {spec['dataset']} [{', '.join(spec['tasks'])}], seed {spec['seed']}"


# --------------------------------------------------------------------------------------------- the bench

@dataclass
class Bench:
    """Everything one (recipe, seed) shares across mergers: data, the θ0 model, the zoo's task vectors and the
    experts' reference accuracies.

    Evaluation is the hot path of every grid-search merger (one candidate = one pass over the validation rows)
    and of every final evaluation, and it is bound by the encoder's matmuls (measured: ``addmm`` 76 % of a
    forward, the frozen embeddings' lookup and LayerNorm under 1 %). So it does only that work, once:

    - one set of weights for every task (δ ``[D]``): the rows of all tasks go through the encoder together,
      sorted by length (little padding; each row's own task head is applied afterwards), in large batches
      under ``torch.inference_mode``; task-specific weights (δ ``[T, D]``) run each task's rows with its own;
    - a result is kept by the content hash of δ, so the same candidate is never evaluated twice on a bench:
      the chosen λ's validation accuracy in the final evaluation, the experts' evaluation (done once for
      normalisation) in the ``experts`` row, TALL-masks' per-task candidates when Consensus selects the same
      masks. Reuses are counted (``cost.reused_evaluations``).
    """

    recipe: RunSpec
    data: Any
    model: Any
    tv: TaskVectors
    experts: list
    expert_acc: dict[str, dict[str, float]]   # split -> task -> accuracy of each task's own expert
    splits: dict[str, dict[str, Any]]         # split -> task -> tensors of that task's rows, sorted by length
    device: str
    packed: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # split -> all tasks' rows by length
    memo: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    reused: int = 0
    seconds: float = 0.0   # preparing the bench (data, θ0, zoo, the experts' evaluation), shared by its mergers

    # -- weights -----------------------------------------------------------------------------------------
    def set_delta(self, delta: torch.Tensor) -> None:
        with torch.no_grad():
            params = dict(self.model.shared["encoder"].named_parameters())
            for k, v in self.tv.unflatten(self.tv.base + delta).items():
                params[k].copy_(v)

    # -- evaluation --------------------------------------------------------------------------------------
    def _correct(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """Correct predictions per task ``[T]`` of the current weights on ``rows`` (each row through the head of
        its own task ``task_index``)."""
        self.model.eval()
        correct = torch.zeros(self.tv.n_tasks, dtype=torch.long, device=self.device)
        n = rows["task_index"].shape[0]
        with torch.inference_mode():
            for lo in range(0, n, EVAL_BATCH):
                b = {k: v[lo:lo + EVAL_BATCH] for k, v in rows.items()}
                own = b["task_index"]
                logits = self.model.decode(tuple(self.model.encode(b)), b)
                for j in range(self.tv.n_tasks):
                    hit = (logits[j].argmax(1) == b["labels"][:, j].long()) & (own == j)
                    correct[j] += hit.sum()
        return correct

    def _evaluate(self, delta: torch.Tensor, split: str) -> dict[str, float]:
        tasks = self.tv.tasks
        if delta.dim() == 1:
            self.set_delta(delta)
            correct = self._correct(self.packed[split])
        else:
            correct = torch.zeros(len(tasks), dtype=torch.long, device=self.device)
            for j, t in enumerate(tasks):
                self.set_delta(delta[j])
                correct[j] = self._correct(self.splits[split][t])[j]
        counts = [int(self.splits[split][t]["task_index"].shape[0]) for t in tasks]
        return {t: float(c) / max(n, 1) for t, c, n in zip(tasks, correct.tolist(), counts)}

    def accuracy(self, delta: torch.Tensor, split: str) -> dict[str, float]:
        """Per-task accuracy of θ0 + δ (δ ``[D]``) or of θ0 + δt per task (δ ``[T, D]``); a δ already evaluated
        on this split (same content) is not evaluated again."""
        key = (split, _content_hash(delta))
        if key in self.memo:
            self.reused += 1
            return dict(self.memo[key])
        out = self._evaluate(delta, split)
        self.memo[key] = dict(out)
        return out

    def context(self, access: str, merger: str, seed: int, log: Callable[[str], None] | None = None) -> MergeContext:
        """The data a merger declared, from this bench: validation accuracy, unlabelled inputs of the adaptation
        split (or of test, for ``test_inputs``) drawn with a generator seeded by ``seed``, the merged forward."""
        split = "test" if access == "test_inputs" else "adapt"
        return MergeContext(access, self.tv.tasks, expert_val=self.expert_acc["val"],
                            val=lambda d: self.accuracy(d, "val"), val_per_task=lambda d: self.accuracy(d, "val"),
                            batch=self.batch_fn(split), logits=self.logits,
                            generator=torch.Generator().manual_seed(seed), log=log, merger=merger)

    # -- unlabelled inputs and the functional forward (AdaMerging) ------------------------------------------
    def batch_fn(self, split: str) -> Callable[[str, int, torch.Generator], dict[str, torch.Tensor]]:
        def draw(task: str, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
            rows = self.splits[split][task]
            idx = torch.randperm(rows["input_ids"].shape[0], generator=gen)[:n]
            j = self.tv.tasks.index(task)
            return {"input_ids": rows["input_ids"][idx].to(self.device),
                    "attention_mask": rows["attention_mask"][idx].to(self.device),
                    "task_index": torch.full((len(idx),), j, dtype=torch.long, device=self.device)}
        return draw

    def logits(self, delta: torch.Tensor, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The differentiable forward of θ0 + δ for the rows of every task together, each row through its own
        task's head: ``[n_t, C_t]`` logits per task (rows in length order; AdaMerging's loss is a mean per task).

        The rows of all tasks share one set of merged weights (built once per call) and go through the encoder
        sorted by length in slices of ``EVAL_BATCH`` rows, so a slice is padded to its own longest row, not the
        whole batch's (measured: a third of a random batch's tokens were padding)."""
        params = {f"shared.encoder.{k}": v for k, v in self.tv.unflatten(self.tv.base + delta).items()}
        self.model.eval()
        order = torch.argsort(batch["attention_mask"].sum(1), stable=True)
        own = batch["task_index"][order]
        outs = [torch.func.functional_call(self.model, params, ({k: v[idx] for k, v in batch.items()},)).outputs
                for idx in order.split(EVAL_BATCH)]
        return [torch.cat([o[j] for o in outs])[own == j] for j in range(self.tv.n_tasks)]


def _task_rows(data, split: str, device: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Each task's rows (sorted by length) and all tasks' rows together (sorted by length: one forward serves
    every task when they share weights), with ``task_index`` = the row's own task."""
    sp = data.splits[split]
    own = sp["masks"].float().argmax(1)
    lengths = sp["attention_mask"].sum(1)
    tensors = {**{k: v for k, v in sp.tensors.items() if k != "masks"}, "task_index": own}
    per_task = {}
    for j, t in enumerate(data.task_names):
        idx = (own == j).nonzero().flatten()
        idx = idx[torch.argsort(lengths[idx], stable=True)]  # similar lengths per batch: less padding
        per_task[t] = {k: v[idx].to(device) for k, v in tensors.items()}
    idx = torch.argsort(lengths, stable=True)
    return per_task, {k: v[idx].to(device) for k, v in tensors.items()}


def _content_hash(t: torch.Tensor) -> str:
    """sha1 of a tensor's values (and shape): the identity of a candidate δ for the evaluation memo."""
    a = t.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha1(str(tuple(a.shape)).encode())
    h.update(a.numpy().tobytes())
    return h.hexdigest()


def prepare(recipe: RunSpec, data_dir: str | None = None, zoo: str | None = None, dtype: str = "float16",
            log: Callable[[str], None] | None = None, train_missing: bool = True) -> Bench:
    """Load the data and θ0, make sure the zoo has every expert of ``recipe.seed``, stack the task vectors."""
    started = time.perf_counter()
    from mtlbench.registry import build_options
    from mtlbench.zoo import ensure_experts, load_task_vector

    ds = registry.get("dataset", recipe.dataset)
    data = ds.obj(build_options(ds.options_class, recipe.dataset_options), data_dir=data_dir).load(recipe.seed)
    data = data.select_tasks(recipe.tasks)
    ar = registry.get("arch", recipe.arch)
    torch.manual_seed(recipe.seed)
    model = ar.obj(data.schema, data.tasks, recipe.embed_dim, build_options(ar.options_class, recipe.arch_options))
    model = model.to(recipe.device)
    keys = model.merged_keys()
    for p in model.parameters():
        p.requires_grad_(False)
    enc = model.shared["encoder"].state_dict()
    base = {k: enc[k].detach().float().cpu().clone() for k in keys}
    sha = model.backbone_sha256
    t_zoo = time.perf_counter()
    experts = ensure_experts(recipe, data.task_names, base, keys, sha, data_dir=data_dir, directory=zoo,
                             dtype=dtype, train_missing=train_missing, log=log)
    t_zoo = time.perf_counter() - t_zoo  # training missing experts is zoo cost, not the bench's
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    rows = []
    for e in experts:
        vec = load_task_vector(e.path, task=e.task, backbone_sha256=sha, shapes=shapes)
        rows.append(torch.cat([vec[k].float().reshape(-1) for k in keys]))
    tv = TaskVectors(data.task_names, tuple(keys), tuple(shapes[k] for k in keys), torch.stack(rows).to(recipe.device),
                     torch.cat([base[k].reshape(-1) for k in keys]).to(recipe.device))
    rows = {s: _task_rows(data, s, recipe.device) for s in ("val", "test", "adapt")}
    bench = Bench(recipe, data, model, tv, experts, {}, {s: r[0] for s, r in rows.items()}, recipe.device,
                  packed={s: r[1] for s, r in rows.items()})
    bench.expert_acc = {s: bench.accuracy(tv.matrix, s) for s in ("val", "test")}
    bench.set_delta(torch.zeros_like(tv.base))
    bench.seconds = time.perf_counter() - started - t_zoo
    return bench


def run_merge(spec: dict[str, Any], bench: Bench, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Merge with ``spec['merger']`` on a prepared bench and return the record (ok, or failed with the reason)."""
    from mtlbench.results.record import make_record
    from mtlbench.train import environment

    started = time.time()
    name = spec["merger"]
    created = datetime.now(timezone.utc)
    record: dict[str, Any] = {"status": "running", "directions": {"accuracy": "max"},
                              "dataset": bench.data.describe(), "parameters": bench.model.parameter_counts(),
                              "arch_info": bench.model.describe(), "environment": environment(bench.device)}

    def made(body: dict[str, Any]) -> dict[str, Any]:  # the one record constructor (mtlbench.results.record)
        rest = {k: v for k, v in body.items() if k not in ("status", "error")}
        return make_record(spec, merge_run_id(spec), body["status"], created=created, error=body.get("error"),
                           **rest).to_dict()

    entry = registry.get("merger", name)
    merger = entry.obj(registry.build_options(entry.options_class, spec["merger_options"]))
    access = merger.access
    ctx = bench.context(access, name, spec["seed"], log)
    reused0 = bench.reused
    try:
        t0 = time.perf_counter()
        torch.manual_seed(spec["seed"])
        out: MergeOutput = merger.merge(bench.tv, ctx)
        merge_seconds = time.perf_counter() - t0
        delta = out.shared if out.shared is not None else out.per_task
        if not bool(torch.isfinite(delta).all()):
            raise RunFailed(f"merger '{name}' produced non-finite weights")
        t1 = time.perf_counter()
        metrics = {s: {t: {"accuracy": a} for t, a in bench.accuracy(delta, s).items()} for s in ("val", "test")}
        eval_seconds = time.perf_counter() - t1
    except KeyboardInterrupt:
        raise
    except MtlbenchError as exc:
        if not isinstance(exc, RunFailed):
            raise
        record.update(status="failed", error={"reason": str(exc), "type": type(exc).__name__, "traceback": None},
                      wall_seconds=time.time() - started)
        return made(record)
    except Exception as exc:
        record.update(status="failed", error={"reason": f"{type(exc).__name__}: {exc}", "type": type(exc).__name__,
                                              "traceback": traceback.format_exc(limit=8)},
                      wall_seconds=time.time() - started)
        return made(record)
    finally:
        bench.set_delta(torch.zeros_like(bench.tv.base))
    tasks = bench.tv.tasks
    test = {t: metrics["test"][t]["accuracy"] for t in tasks}
    norm = {t: test[t] / bench.expert_acc["test"][t] if bench.expert_acc["test"][t] > 0 else math.nan for t in tasks}
    expert_steps = [len(e.record.get("curves", [])) for e in bench.experts]
    record.update(
        status="ok", error=None, metrics=metrics, selected_epoch=None, epochs_run=None,
        merge={
            "merger": name, "data_access": access, "needs_task_id": bool(merger.needs_task_id),
            "info": _jsonable(out.info),
            "mean_accuracy": sum(test.values()) / len(tasks),
            "normalized_accuracy": {**norm, "mean": sum(norm.values()) / len(tasks)},
            "expert_accuracy": bench.expert_acc,
            "zoo": [{"task": e.task, "key": e.key, "cached": e.cached, "wall_seconds": e.record.get("wall_seconds"),
                     "train_seconds": e.record.get("train_seconds"), "selected_epoch": e.record.get("selected_epoch"),
                     "epochs_run": n} for e, n in zip(bench.experts, expert_steps)],
            "cost": {"zoo_seconds": sum(float(e.record.get("wall_seconds") or 0) for e in bench.experts),
                     "merge_seconds": merge_seconds, "eval_seconds": eval_seconds,
                     "val_evaluations": ctx.evaluations, "reused_evaluations": bench.reused - reused0,
                     "bench_seconds": bench.seconds, "unlabelled_samples": ctx.samples_seen,
                     "threads": torch.get_num_threads()},
        },
        wall_seconds=time.time() - started)
    return made(record)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist() if obj.numel() <= 4096 else {"tensor_shape": list(obj.shape)}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def run_merges(recipes: list[RunSpec], mergers: list[tuple[str, dict[str, Any]]], results_dir: str,
               data_dir: str | None = None, force: bool = False, zoo: str | None = None, dtype: str = "float16",
               log: Callable[[str], None] | None = None) -> tuple[int, int, int]:
    """Every merger on every recipe (one zoo per recipe, shared by its mergers); records stored atomically, a
    failed merge is stored as failed and the sweep goes on. Returns (done, skipped, failed)."""
    from mtlbench.results.store import finished_record, store_run

    specs = [[build_merge_spec(r, m, o) for m, o in mergers] for r in recipes]  # every bad input before any work
    done = skipped = failed = 0
    for recipe, row in zip(recipes, specs):
        todo = [s for s in row if force or finished_record(results_dir, merge_run_id(s)) is None]
        skipped += len(row) - len(todo)
        if not todo:
            continue
        t0 = time.perf_counter()
        bench = prepare(recipe, data_dir, zoo, dtype, log)
        if log:
            log(f"zoo ready for seed {recipe.seed} in {time.perf_counter() - t0:.1f} s "
                f"({sum(e.cached for e in bench.experts)}/{len(bench.experts)} experts cached)")
        for spec in todo:
            if log:
                log(f"merge {merge_run_id(spec)}: {label(spec)}")
            record = run_merge(spec, bench, log)
            store_run(results_dir, record)
            if record["status"] == "ok":
                done += 1
                m = record["merge"]
                if log:
                    log(f"  test mean accuracy {m['mean_accuracy']:.4f}, normalised {m['normalized_accuracy']['mean']:.4f}"
                        f" ({m['cost']['merge_seconds']:.1f} s merge)")
            else:
                failed += 1
                print(f"mtlbench: merge failed: {label(spec)}: {record['error']['reason']} (recorded as failed)",
                      file=sys.stderr)
    return done, skipped, failed
