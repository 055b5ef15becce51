"""RunSpec: every choice that changes a result, and its stable hash (the run id).

Same spec, same id: a finished run is never trained twice and a sweep can resume. Everything in the spec is
resolved before hashing (options with their defaults, the dataset's training defaults, the device, the thread
count ``auto``, the dataset version), so two commands that mean the same run get the same id, and changing a
default produces a new one. The training fields are declared in :mod:`mtlbench.settings`; one added after spec
version 1 enters the hash only when it differs from the value every version-1 run had, so stored ids hold.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from mtlbench import registry, settings
from mtlbench.data import offered_task_sets, offered_tasks
from mtlbench.errors import MtlbenchError, unknown

SPEC_VERSION = 1
DEFAULT_TRAINING = settings.FALLBACK_TRAINING
SELECTIONS = settings.SELECTIONS


class _SpecMethods:
    """Identity of a run: the canonical JSON of the resolved spec and its hash."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        d["tasks"] = list(d["tasks"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunSpec":
        """A stored spec; a setting added after version 1 that a version-1 record lacks takes its v1 value."""
        d = dict(d)
        d["tasks"] = tuple(d["tasks"])
        for s in settings.spec_settings():
            if s.added_after_v1 and s.name not in d:
                d[s.name] = s.v1_value
        return cls(**d)  # type: ignore[return-value]

    def canonical_json(self) -> str:
        """Sorted, compact JSON of the spec; a setting added after version 1 enters it only when its value
        differs from the one every version-1 run had, so the ids of runs stored before it existed hold."""
        d = self.to_dict()
        for s in settings.spec_settings():
            if s.added_after_v1 and d.get(s.name) == s.v1_value:
                del d[s.name]
        return json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=False)

    @property
    def run_id(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:20]

    def label(self, max_tasks: int | None = None) -> str:
        tasks = self.tasks  # type: ignore[attr-defined]
        shown = (", ".join(tasks) if max_tasks is None or len(tasks) <= max_tasks
                 else f"{', '.join(tasks[:max_tasks])}, ... {len(tasks)} tasks")
        return (f"{self.arch} x {self.optimizer} on {self.dataset} [{shown}], "  # type: ignore[attr-defined]
                f"seed {self.seed}")  # type: ignore[attr-defined]


def _spec_fields() -> list[tuple[str, Any, Any]]:
    """The run spec's fields: the run's identity, every training setting declared ``spec=True`` in
    :mod:`mtlbench.settings` (in its order), the resolved options, the plugins' code hashes, the version."""
    types = {"int": int, "float": float, "str": str, "threads": int}
    fields: list[tuple[str, Any, Any]] = [
        ("dataset", str, None), ("dataset_version", str, None), ("tasks", tuple, None), ("arch", str, None),
        ("optimizer", str, None), ("seed", int, None)]
    fields += [(s.name, types.get(s.kind, Any), None) for s in settings.spec_settings() if not s.added_after_v1]
    fields += [("dataset_options", dict, dataclasses.field(default_factory=dict)),
               ("arch_options", dict, dataclasses.field(default_factory=dict)),
               ("optimizer_options", dict, dataclasses.field(default_factory=dict)),
               ("plugin_sources", dict, dataclasses.field(default_factory=dict)),
               ("spec_version", int, dataclasses.field(default=SPEC_VERSION))]
    fields += [(s.name, types.get(s.kind, Any), dataclasses.field(default=s.v1_value))
               for s in settings.spec_settings() if s.added_after_v1]
    return [(n, t, f) if f is not None else (n, t) for n, t, f in fields]  # type: ignore[misc]


RunSpec = dataclasses.make_dataclass("RunSpec", _spec_fields(), bases=(_SpecMethods,), frozen=True)
RunSpec.__module__ = __name__
RunSpec.__doc__ = ("Every choice that changes a run's result, resolved (defaults filled in, 'auto' made "
                   "concrete); its hash is the run id. Training fields come from mtlbench.settings.")


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_threads(value: int | str, suggested: int | None, jobs: int = 1) -> int:
    """``auto``: the dataset's suggestion (1 where it suggests none: the tabular models here are small, and one
    thread per run is fastest on a shared machine) capped at the cores divided among ``jobs`` parallel runs."""
    if value != "auto":
        return int(value)
    per_job = max(1, available_cores() // max(1, jobs))
    return max(1, min(int(suggested or 1), per_job))


def resolve_device(name: str) -> str:
    """'auto' -> cuda, else mps, else cpu; an explicit device must exist here. ``cuda:0`` is ``cuda`` (the same
    device, so the same run id); ``cuda:N`` names the N-th GPU."""
    import torch

    kind, _, index = name.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise unknown("device", name, ["auto", "cpu", "cuda", "cuda:N", "mps"])
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if kind == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    have = ", ".join(["cpu"] + (["cuda"] if cuda else []) + (["mps"] if mps else []))
    if kind == "cuda" and not cuda:
        raise MtlbenchError(f"device '{name}': no CUDA GPU is visible to torch {torch.__version__} here "
                            f"(available: {have})")
    if kind == "mps" and not mps:
        raise MtlbenchError(f"device '{name}': Apple's MPS backend is not available here (it needs Apple silicon "
                            f"and macOS 12.3+; available: {have})")
    if index:
        n = torch.cuda.device_count()
        if int(index) >= n:
            raise MtlbenchError(f"device '{name}': this machine has {n} CUDA GPU(s) (valid: "
                                f"{', '.join(f'cuda:{i}' for i in range(n))})")
        if int(index) == 0:
            return "cuda"
    return name


def check_precision(precision: str, device: str) -> None:
    """bf16 needs autocast to bfloat16 on the device: every CPU torch has it; a CUDA GPU needs bfloat16 support
    (compute capability 8.0+, or emulation torch refuses to rely on); MPS needs a torch whose autocast covers it."""
    if precision == "fp32":
        return
    import torch

    kind = torch.device(device).type
    if kind == "cuda" and not torch.version.hip and torch.cuda.get_device_capability(device) < (8, 0):
        raise MtlbenchError(f"precision '{precision}': {torch.cuda.get_device_name(device)} has no native "
                            f"bfloat16 (valid here: fp32)")
    if not torch.amp.is_autocast_available(kind):
        raise MtlbenchError(f"precision '{precision}': torch {torch.__version__} has no autocast on '{kind}' "
                            f"(valid here: fp32)")


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
               dataset_options: dict[str, Any] | None = None, arch_options: dict[str, Any] | None = None,
               optimizer_options: dict[str, Any] | None = None, jobs: int = 1, **training: Any) -> RunSpec:
    """Validate every choice (one clear line on the first bad one) and return the resolved spec.
    ``training``: the settings declared ``spec=True`` in :mod:`mtlbench.settings` (None or absent: the default,
    or the dataset's suggestion); ``jobs``: parallel runs, which bounds ``threads='auto'``."""
    spec_settings = {s.name: s for s in settings.spec_settings()}
    for key in training:
        if key not in spec_settings:
            raise TypeError(f"build_spec() got an unexpected setting {key!r}")
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
    suggested = getattr(ds.obj, "default_training", {}) or {}
    values: dict[str, Any] = {}
    for name, s in spec_settings.items():
        v = training.get(name)
        if v is None:
            v = settings.dataset_default(name, suggested) if s.default is settings.DATASET else s.default
        values[name] = s.check(v, s.title)
    values["device"] = resolve_device(values["device"])
    values["threads"] = resolve_threads(values["threads"], suggested.get("threads"), jobs)
    check_precision(values["precision"], values["device"])
    if isinstance(seed, bool) or not float(seed).is_integer() or seed < 0:
        raise MtlbenchError(f"seed must be a non-negative integer, got {seed}")
    arch_options = ar.resolve_options(arch_options)
    _check_features(dataset, ds, dataset_options, arch, ar, arch_options)
    check_input = getattr(ar.obj, "check_input", None)
    if modality != "tabular" and check_input is not None:  # resolution, dense decoders: before any data loads
        check_input(arch, dataset, registry.build_options(ar.options_class, arch_options),
                    ds.obj.image_shape(ds_opts), [t for t in ds.obj.dense_tasks(ds_opts) if t in tasks])
    sources = {f"{e.kind}:{e.name}": h for e in (ds, ar, op) if (h := e.source_hash())}
    return RunSpec(
        dataset=dataset, dataset_version=str(getattr(ds.obj, "version", "1")), tasks=tuple(tasks), arch=arch,
        optimizer=optimizer, seed=int(seed), dataset_options=dataset_options, arch_options=arch_options,
        optimizer_options=op.resolve_options(optimizer_options), plugin_sources=sources, **values)


def incompatibility(spec: RunSpec) -> str | None:
    """Why the spec's optimizer cannot train its arch, known before anything loads (None: compatible). A sweep
    skips such a combination with this line; the same check runs again on the built model."""
    modality = getattr(registry.get("dataset", spec.dataset).obj, "modality", "tabular")
    ar = registry.get("arch", spec.arch, modality=modality)
    if getattr(ar.obj, "shares_parameters", True):
        return None
    op = registry.get("optimizer", spec.optimizer)
    try:
        method = op.obj(tuple(spec.tasks), registry.build_options(op.options_class, spec.optimizer_options))
    except Exception:  # a method that cannot be built from names alone: the check on the built model decides
        return None
    needs = getattr(method, "requires", frozenset())
    if "shared_grads" in needs:
        return (f"optimizer '{spec.optimizer}' needs per-task gradients of shared parameters, but arch "
                f"'{spec.arch}' shares none (use a multi-task arch, or optimizer 'ew')")
    if "features" in needs:
        return (f"optimizer '{spec.optimizer}' needs a shared representation, but arch '{spec.arch}' shares "
                f"nothing (use a multi-task arch, or optimizer 'ew')")
    return None
