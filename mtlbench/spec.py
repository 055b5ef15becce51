"""RunSpec: every choice that changes a result, and its stable hash (the run id).

Same spec, same id: a finished run is never trained twice and a sweep can resume. Everything in the spec is
resolved before hashing (options with their defaults, the device type, the dataset version), so two commands
that mean the same run get the same id, and changing a default produces a new one.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mtlbench import registry
from mtlbench.data import offered_task_sets, offered_tasks
from mtlbench.errors import MtlbenchError, unknown

SPEC_VERSION = 1
DEFAULT_TRAINING = {"epochs": 10, "batch_size": 1024, "lr": 1e-3, "embed_dim": 16}
SELECTIONS = ("mean_primary", "val_loss")


@dataclass(frozen=True)
class RunSpec:
    dataset: str
    dataset_version: str
    tasks: tuple[str, ...]
    arch: str
    optimizer: str
    seed: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    patience: int
    embed_dim: int
    device: str
    selection: str = "mean_primary"
    dataset_options: dict[str, Any] = field(default_factory=dict)
    arch_options: dict[str, Any] = field(default_factory=dict)
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    plugin_sources: dict[str, str] = field(default_factory=dict)
    spec_version: int = SPEC_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunSpec":
        d = dict(d)
        d["tasks"] = tuple(d["tasks"])
        return cls(**d)

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    @property
    def run_id(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:20]

    def label(self) -> str:
        return f"{self.arch} x {self.optimizer} on {self.dataset} [{', '.join(self.tasks)}], seed {self.seed}"


def resolve_device(name: str) -> str:
    """'auto' -> cuda, else mps, else cpu; an explicit device must be available."""
    avail = {"cpu": True, "cuda": torch.cuda.is_available(),
             "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())}
    if name == "auto":
        return "cuda" if avail["cuda"] else "mps" if avail["mps"] else "cpu"
    kind = name.split(":")[0]
    if kind not in avail:
        raise unknown("device", name, ["auto", "cpu", "cuda", "mps"])
    if not avail[kind]:
        raise MtlbenchError(f"device '{name}' is not available on this machine (available: "
                            f"{', '.join(k for k, v in avail.items() if v)})")
    return name


def _positive(name: str, value: float | int | None, allow_zero: bool = False, integer: bool = False) -> None:
    if value is None:
        return
    if integer and (isinstance(value, bool) or not float(value).is_integer()):
        raise MtlbenchError(f"{name} must be an integer, got {value}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise MtlbenchError(f"{name} must be a finite {'non-negative' if allow_zero else 'positive'} number, "
                            f"got {value}")


def _check_features(dataset: str, ds: registry.Entry, dataset_options: dict[str, Any], arch: str,
                    ar: registry.Entry, arch_options: dict[str, Any]) -> None:
    """An arch that needs optional features (behaviour sequences...) the dataset lacks: one line, up front."""
    need = getattr(ar.obj, "required_features", None)
    need = need(registry.build_options(ar.options_class, arch_options)) if need else ()
    if not need:
        return
    have = getattr(ds.obj, "provided_features", None)
    have = set(have(registry.build_options(ds.options_class, dataset_options)) if have else ())
    missing = [f for f in need if f not in have]
    if missing:
        with_them = [e.name for e in registry.entries("dataset")
                     if set(missing) <= set(getattr(e.obj, "provided_features", lambda o: ())(
                         registry.build_options(e.options_class, e.resolve_options({}))))]
        raise MtlbenchError(f"arch '{arch}' needs {', '.join(missing)}, which dataset '{dataset}' does not provide "
                            f"with these options (datasets that do: {', '.join(with_them) or 'none'})")


def build_spec(*, dataset: str, tasks: list[str] | None, arch: str, optimizer: str, seed: int = 0,
               epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
               weight_decay: float = 1e-6, patience: int = 3, embed_dim: int | None = None, device: str = "auto",
               selection: str = "mean_primary", dataset_options: dict[str, Any] | None = None,
               arch_options: dict[str, Any] | None = None,
               optimizer_options: dict[str, Any] | None = None) -> RunSpec:
    """Validate every choice (one clear line on the first bad one) and return the resolved spec."""
    ds = registry.get("dataset", dataset)
    ar = registry.get("arch", arch)
    op = registry.get("optimizer", optimizer)
    modality = getattr(ds.obj, "modality", "tabular")
    if ar.modality != modality or modality != "tabular":
        ar = registry.get("arch", arch, modality=modality)  # one line if the arch has no variant for this data
    dataset_options = ds.resolve_options(dataset_options)
    ds_opts = registry.build_options(ds.options_class, dataset_options)
    offered = offered_tasks(ds.obj, ds_opts)  # the tasks may depend on the dataset's options
    aliases = offered_task_sets(ds.obj, ds_opts)
    if tasks is not None and len(tasks) == 1 and tasks[0] in aliases:
        tasks = list(aliases[tasks[0]])
    if tasks is not None:
        if not tasks:
            raise MtlbenchError("the task list is empty" + (f" (valid: {', '.join(offered)})" if offered else ""))
        dup = sorted({t for t in tasks if tasks.count(t) > 1})
        if dup:
            raise MtlbenchError(f"task(s) listed twice: {', '.join(dup)}")
        if offered:
            for t in tasks:
                if t not in offered:
                    err = unknown(f"task for dataset '{dataset}'", t, offered)
                    if aliases:  # named task sets are listed apart from the task names
                        err = MtlbenchError(f"{err}; task sets: {', '.join(sorted(aliases))}")
                    raise err
    elif offered:
        default = getattr(ds.obj, "default_tasks", None)  # options-dependent defaults (multimnist's dense variant)
        tasks = list(default(ds_opts) if callable(default) else offered)
    else:
        raise MtlbenchError(f"dataset '{dataset}' does not list its tasks; pass --tasks")
    defaults = {**DEFAULT_TRAINING, **getattr(ds.obj, "default_training", {})}
    epochs = defaults["epochs"] if epochs is None else epochs
    batch_size = defaults["batch_size"] if batch_size is None else batch_size
    lr = defaults["lr"] if lr is None else lr
    embed_dim = defaults["embed_dim"] if embed_dim is None else embed_dim
    _positive("epochs", epochs, integer=True)
    _positive("batch size", batch_size, integer=True)
    _positive("learning rate", lr)
    _positive("weight decay", weight_decay, allow_zero=True)
    _positive("patience", patience, allow_zero=True, integer=True)
    _positive("embedding dim", embed_dim, integer=True)
    _positive("seed", seed, allow_zero=True, integer=True)
    if selection not in SELECTIONS:
        raise unknown("selection criterion", selection, SELECTIONS)
    arch_options = ar.resolve_options(arch_options)
    _check_features(dataset, ds, dataset_options, arch, ar, arch_options)
    check_input = getattr(ar.obj, "check_input", None)
    if modality != "tabular" and check_input is not None:  # resolution, dense decoders: before any data loads
        check_input(arch, dataset, registry.build_options(ar.options_class, arch_options),
                    ds.obj.image_shape(ds_opts), [t for t in ds.obj.dense_tasks(ds_opts) if t in tasks])
    sources = {f"{e.kind}:{e.name}": h for e in (ds, ar, op) if (h := e.source_hash())}
    return RunSpec(
        dataset=dataset, dataset_version=str(getattr(ds.obj, "version", "1")), tasks=tuple(tasks), arch=arch,
        optimizer=optimizer, seed=int(seed), epochs=int(epochs), batch_size=int(batch_size), lr=float(lr),
        weight_decay=float(weight_decay), patience=int(patience), embed_dim=int(embed_dim),
        device=resolve_device(device), selection=selection,
        dataset_options=dataset_options, arch_options=arch_options,
        optimizer_options=op.resolve_options(optimizer_options), plugin_sources=sources)
