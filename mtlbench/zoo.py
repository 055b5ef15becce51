"""The expert zoo: one fine-tuned expert per task and seed, trained by the suite's own training loop, cached.

An expert is an ordinary run of :func:`mtlbench.train.train` on one task (the merge recipe's dataset, arch,
epochs, batch size, lr, selection on validation; optimizer ``ew``). What is kept is its **task vector**
τ = θt − θ0 over the arch's merged tensors (``merged_keys``), stored with safetensors (``float16`` by default:
half the bytes; ``float32`` keeps it exact) next to the expert's JSON run record. The cache key is the sha256 of
the expert's resolved spec (recipe, task, seed, data version and options), the backbone's weight hash and the
zoo format, so a changed recipe, data or backbone never reuses a stale expert.

Loading is safe and strict: safetensors only (never a pickle); a missing file, a corrupt file, another task, other
tensor names or shapes, or another θ0 (its hash differs from the backbone's) is refused with one line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from mtlbench.errors import MtlbenchError
from mtlbench.spec import RunSpec

ZOO_FORMAT = "mtlbench.task_vector/1"
ZOO_DIR_ENV = "MTLBENCH_ZOO_DIR"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def zoo_dir(given: str | os.PathLike | None = None) -> Path:
    """``given``, else ``$MTLBENCH_ZOO_DIR``, else ``<cache>/zoo`` (``$MTLBENCH_CACHE_DIR``, ~/.cache/mtlbench)."""
    if given:
        return Path(given).expanduser()
    env = os.environ.get(ZOO_DIR_ENV)
    if env:
        return Path(env).expanduser()
    from mtlbench.tasks.helpers import cache_dir

    return cache_dir() / "zoo"


def expert_spec(recipe: RunSpec, task: str) -> RunSpec:
    """The expert run of ``task``: the recipe on that one task, with plain (``ew``) fine-tuning."""
    return dataclasses.replace(recipe, tasks=(task,), optimizer="ew", optimizer_options={})


def expert_key(spec: RunSpec, backbone_sha256: str, dtype: str) -> str:
    blob = json.dumps({"spec": json.loads(spec.canonical_json()), "backbone_sha256": backbone_sha256, "format": ZOO_FORMAT,
                       "dtype": dtype}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass
class Expert:
    task: str
    seed: int
    key: str
    path: Path               # the task vector (.safetensors)
    record: dict[str, Any]   # the expert's run record (metrics, curves, timings)
    cached: bool


def save_task_vector(path: Path, vectors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in vectors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_task_vector(path: Path, *, task: str, backbone_sha256: str,
                     shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A stored task vector, checked against what the merge expects; every refusal is one line."""
    if not path.is_file():
        raise MtlbenchError(f"expert checkpoint for task '{task}' is missing: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except ImportError as exc:
        raise MtlbenchError("reading expert checkpoints needs safetensors: pip install 'mtlbench[text]'") from exc
    except Exception as exc:  # safetensors raises its own error types on a damaged file
        raise MtlbenchError(f"expert checkpoint {path} is corrupt or not a safetensors file "
                            f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from exc
    if meta.get("format") != ZOO_FORMAT:
        raise MtlbenchError(f"expert checkpoint {path} is not an mtlbench task vector (format "
                            f"{meta.get('format')!r}, expected {ZOO_FORMAT!r})")
    if meta.get("task") != task:
        raise MtlbenchError(f"expert checkpoint {path} is for task '{meta.get('task')}', not '{task}'")
    if meta.get("backbone_sha256") != backbone_sha256:
        raise MtlbenchError(f"expert checkpoint {path} was fine-tuned from another pretrained model: its θ0 "
                            f"sha256 {str(meta.get('backbone_sha256'))[:16]}… differs from the backbone's "
                            f"{backbone_sha256[:16]}…; refusing to merge")
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise MtlbenchError(f"expert checkpoint {path} does not match the model: "
                            + (f"missing {', '.join(missing[:3])}" if missing else "")
                            + ("; " if missing and extra else "")
                            + (f"unexpected {', '.join(extra[:3])}" if extra else ""))
    for k, s in shapes.items():
        if tuple(tensors[k].shape) != tuple(s):
            raise MtlbenchError(f"expert checkpoint {path}: tensor '{k}' has shape {tuple(tensors[k].shape)}, "
                                f"the model's is {tuple(s)}")
    return tensors


def train_expert(spec: RunSpec, base: dict[str, torch.Tensor], keys: list[str], data_dir: str | None,
                 log: Callable[[str], None] | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Fine-tune one expert with the suite's training loop; its task vector and its (ok) run record."""
    from mtlbench.metrics import metric
    from mtlbench.results.record import make_record
    from mtlbench.train import build, environment, train

    started = time.time()
    torch.set_num_threads(spec.threads)  # the expert's identity includes its thread count, as every run's
    built = build(spec, data_dir)
    body = train(spec, built, log=log)
    enc = built.model.shared["encoder"].state_dict()
    tv = {k: enc[k].detach().float().cpu() - base[k].float() for k in keys}
    record = make_record(spec.to_dict(), spec.run_id, "ok",  # the one record constructor
                         directions={m: metric(m).direction for t in built.data.tasks for m in t.metrics},
                         dataset=built.data.describe(), parameters=built.model.parameter_counts(),
                         arch_info=built.model.describe(), environment=environment(spec.device),
                         wall_seconds=time.time() - started, **body).to_dict()
    return tv, record


def ensure_experts(recipe: RunSpec, tasks: tuple[str, ...], base: dict[str, torch.Tensor], keys: list[str],
                   backbone_sha256: str, *, data_dir: str | None = None, directory: str | None = None,
                   dtype: str = "float16", train_missing: bool = True,
                   log: Callable[[str], None] | None = None) -> list[Expert]:
    """Every task's expert for ``recipe.seed``, from the cache or trained now (and cached)."""
    from mtlbench.results.store import write_record

    if dtype not in DTYPES:
        raise MtlbenchError(f"unknown task-vector dtype '{dtype}' (valid: {', '.join(DTYPES)})")
    root = zoo_dir(directory)
    out = []
    for task in tasks:
        spec = expert_spec(recipe, task)
        key = expert_key(spec, backbone_sha256, dtype)
        path, rec_path = root / key / "task_vector.safetensors", root / key / "record.json"
        cached = path.is_file() and rec_path.is_file()
        if not cached:
            if not train_missing:
                raise MtlbenchError(f"expert checkpoint for task '{task}' (seed {recipe.seed}) is missing: {path}")
            if log:
                log(f"zoo: training the {task} expert (seed {recipe.seed}) -> {root / key}")
            tv, record = train_expert(spec, base, keys, data_dir, log)
            meta = {"format": ZOO_FORMAT, "task": task, "seed": str(recipe.seed), "key": key, "dtype": dtype,
                    "backbone_sha256": backbone_sha256, "spec_run_id": spec.run_id}
            save_task_vector(path, {k: v.to(DTYPES[dtype]) for k, v in tv.items()}, meta)
            write_record(rec_path, record)
        try:
            record = json.loads(rec_path.read_text())
        except (OSError, ValueError) as exc:
            raise MtlbenchError(f"expert record {rec_path} is unreadable: {exc}") from exc
        out.append(Expert(task, recipe.seed, key, path, record, cached))
    return out
