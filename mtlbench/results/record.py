"""The typed run record: one dataclass, one constructor, one validating loader.

Every record, whoever writes it (the trainer, a sweep recording a crashed worker, the test helpers), is made by
:func:`make_record`, so ``created`` is always an ISO 8601 UTC string, failed runs always carry an ``error`` with a
traceback whose paths are relative to the project or the installed package, and every metric comes with its
direction (``max`` / ``min``), so that nothing downstream has to guess it.

:meth:`RunRecord.from_dict` validates a stored record against the schema below and raises :class:`RecordError`
with one line naming the first bad field. Records of schema 1 (no stored directions; ``created`` a string or a
float) are upgraded on load: the directions of the metrics built in at that time are filled in; a metric not
among them stays without a direction and the leaderboard refuses to rank it. A record of a schema newer than
this code raises :class:`NewerSchema`: it is never guessed at, and never overwritten by a rerun.

Schema ``mtlbench.run/2`` (JSON object):

- ``schema`` str, ``run_id`` str, ``spec`` object (the run spec: at least dataset, tasks, arch, optimizer, seed,
  arch_options, optimizer_options), ``status`` one of ok / failed / running, ``created`` ISO 8601 string;
- ``metrics`` object split -> task -> metric -> number or null (required when status is ok);
- ``directions`` object metric -> "max" | "min" (every metric in ``metrics``);
- ``error`` null or object {reason str, type str, traceback str or null} (required when status is failed);
- optional: ``dataset`` object, ``curves`` list, ``environment`` / ``parameters`` / ``arch_info`` objects,
  ``selected_epoch`` / ``epochs_run`` int, ``selected_epochs`` object task -> int (a run that selects each task's
  epoch on its own, e.g. ``single``; ``selected_epoch`` is then the latest of them), ``wall_seconds`` / ``train_seconds`` / ``train_samples_per_s`` /
  ``selection_score`` number, ``optimizer_warnings`` list, ``optimizer_state`` any, ``option_defaults`` object
  {arch: {...}, optimizer: {...}} (the methods' default option values, to tell an ablation variant from the
  full method); other keys are kept as they
  are (``extra``), so a newer writer's additions survive a round trip.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from mtlbench.vision.kinds import DENSE_DIRECTIONS   # torch-free: names and directions of the dense metrics

if TYPE_CHECKING:
    from mtlbench.results.methods import MethodId

SCHEMA_NAME = "mtlbench.run"
SCHEMA_VERSION = 2
RECORD_SCHEMA = f"{SCHEMA_NAME}/{SCHEMA_VERSION}"
STATUSES = ("ok", "failed", "running")
DIRECTIONS = ("max", "min")
#: The directions of the metrics built in when records did not store them (schema 1). Later records carry theirs.
SCHEMA1_DIRECTIONS = {"auc": "max", "logloss": "min", "accuracy": "max", "rmse": "min", "mae": "min",
                      **DENSE_DIRECTIONS}
#: What a record's spec must hold for the leaderboard to place it.
SPEC_REQUIRED = {"dataset": str, "tasks": list, "arch": str, "optimizer": str, "seed": int, "arch_options": dict,
                 "optimizer_options": dict}
_NUMBER_FIELDS = ("wall_seconds", "train_seconds", "train_samples_per_s", "selection_score")
_INT_FIELDS = ("selected_epoch", "epochs_run")
_DICT_FIELDS = ("dataset", "environment", "parameters", "arch_info", "option_defaults")
_NULLABLE = ("metrics", "error", "selected_epoch", "epochs_run", "optimizer_state") + _NUMBER_FIELDS


class RecordError(ValueError):
    """A stored record that does not follow the schema; the message is one line naming the bad field."""


class NewerSchema(RecordError):
    """A record written by a newer mtlbench than this one."""


@dataclass
class RunRecord:
    """One run's result. Build new ones with :func:`make_record`; read stored ones with :meth:`from_dict`."""

    run_id: str
    spec: dict[str, Any]
    status: str
    created: str
    metrics: dict[str, dict[str, dict[str, float | None]]] | None = None
    directions: dict[str, str] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    dataset: dict[str, Any] = field(default_factory=dict)
    curves: list[dict[str, Any]] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    arch_info: dict[str, Any] = field(default_factory=dict)
    selected_epoch: int | None = None
    selected_epochs: dict[str, int] = field(default_factory=dict)   # per task, where each task selects its own
    epochs_run: int | None = None
    wall_seconds: float | None = None
    train_seconds: float | None = None
    train_samples_per_s: float | None = None
    selection_score: float | None = None
    optimizer_state: Any = None
    optimizer_warnings: list[Any] = field(default_factory=list)
    option_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)   # {"arch": {...}, "optimizer": {...}}
    extra: dict[str, Any] = field(default_factory=dict)
    schema: str = RECORD_SCHEMA
    given: frozenset[str] = field(default=frozenset(), repr=False, compare=False)  # the optional fields stored

    # ------------------------------------------------------------------------------------------- reading

    @classmethod
    def from_dict(cls, data: Any) -> "RunRecord":
        """Validate ``data`` (a parsed JSON record) and return it typed; schema 1 is upgraded."""
        if not isinstance(data, dict):
            raise RecordError(f"not a JSON object but a {type(data).__name__}")
        version = _schema_version(data.get("schema"))
        d = dict(data)
        if version == 1:
            d = _upgrade_from_1(d)
        _check(d, every_direction=version >= 2)
        known = {f.name for f in fields(cls)} - {"extra", "schema", "given"}
        kwargs = {k: v for k, v in d.items() if k in known and (v is not None or k in _NULLABLE)}
        return cls(extra={k: v for k, v in d.items() if k not in known and k not in ("schema", "given")},
                   given=frozenset(k for k in d if k in known), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored on disk (fields in a fixed order, extras last)."""
        out: dict[str, Any] = {"schema": self.schema, "run_id": self.run_id, "spec": self.spec,
                               "status": self.status, "created": self.created}
        for f in fields(self):   # the optional fields the writer gave (a failed run has no metrics, curves...)
            if f.name not in out and f.name not in ("extra", "given") and (
                    f.name in ("error", "directions") or f.name in self.given):
                out[f.name] = getattr(self, f.name)
        out.update(self.extra)
        return out

    # ------------------------------------------------------------------------------------------- views

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.metrics is not None

    @property
    def method(self) -> "MethodId":
        from mtlbench.results.methods import MethodId

        return MethodId.of_spec(self.spec)

    @property
    def at_default_options(self) -> bool | None:
        """Whether the arch and optimizer ran with their default options (None: not recorded, schema 1)."""
        arch, opt = self.option_defaults.get("arch"), self.option_defaults.get("optimizer")
        if not isinstance(arch, dict) or not isinstance(opt, dict):
            return None
        return arch == self.spec["arch_options"] and opt == self.spec["optimizer_options"]

    @property
    def seconds_per_epoch(self) -> float | None:
        """Training time per epoch run (the cost column): ``train_seconds`` (or the curves' epoch times) / epochs."""
        secs = self.train_seconds
        if secs is None and self.curves:
            times = [c.get("seconds") for c in self.curves if isinstance(c, dict)]
            secs = sum(times) if times and all(isinstance(t, (int, float)) for t in times) else None
        epochs = self.epochs_run or len(self.curves) or None
        if secs is None or not epochs or not math.isfinite(secs):
            return None
        return float(secs) / epochs


    @property
    def compute_seconds(self) -> float | None:
        """Fine-tuning compute of the run, evaluations excluded (the cost column of a merging table, where an epoch
        means nothing to a merge): a merge's zoo (the sum of its experts' ``train_seconds``) plus the merge's own
        ``merge_seconds``; a training run's ``train_seconds``. None when a part is not recorded."""
        merge = self.extra.get("merge")
        if merge is None:
            return float(self.train_seconds) if _finite(self.train_seconds) else None
        zoo = merge.get("zoo") if isinstance(merge, dict) else None
        cost = merge.get("cost") if isinstance(merge, dict) else None
        parts = [e.get("train_seconds") if isinstance(e, dict) else None for e in zoo or []] if isinstance(
            zoo, list) else []
        parts.append(cost.get("merge_seconds") if isinstance(cost, dict) else None)
        if len(parts) < 2 or not all(_finite(v) for v in parts):
            return None
        return float(sum(parts))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def make_record(spec: Mapping[str, Any], run_id: str, status: str = "running", *,
                directions: Mapping[str, str] | None = None, error: Mapping[str, Any] | None = None,
                created: datetime | None = None, **fields_: Any) -> RunRecord:
    """The one constructor of a run record (trainer, sweep crash records, test helpers).

    ``created`` defaults to now (UTC, seconds). A failed run's ``error`` is ``{reason, type, traceback}``; the
    traceback's file paths are made relative to the project or the installed package (a record names no one's
    home directory). Every metric in ``metrics`` needs a direction; the record is validated before it is returned,
    so a writer cannot store what the loader would reject.
    """
    when = (created or datetime.now(timezone.utc)).astimezone(timezone.utc)
    err = None
    if error is not None:
        err = {**error, "reason": str(error.get("reason", "")), "type": str(error.get("type") or "Error"),
               "traceback": relative_traceback(error.get("traceback"))}
    d = {"schema": RECORD_SCHEMA, "run_id": run_id, "spec": dict(spec), "status": status,
         "created": when.isoformat(timespec="seconds"), "directions": dict(directions or {}), "error": err,
         **fields_}
    if status == "failed" and err is None:
        raise RecordError("a failed record needs an error {reason, type, traceback}")
    return RunRecord.from_dict(d)


def relative_traceback(text: str | None) -> str | None:
    """``text`` with absolute paths under this project or the package's install folder made relative to it
    (and any other site-packages folder cut to its package path)."""
    if not text:
        return None
    pkg = Path(__file__).resolve().parent.parent        # .../mtlbench
    roots = sorted({str(pkg.parent), str(pkg.parent.resolve())}, key=len, reverse=True)
    for root in roots:
        text = text.replace(root + "/", "")
    return re.sub(r'File "[^"]*/(site-packages|dist-packages)/', r'File "\1/', text)


# ----------------------------------------------------------------------------------------------- validation

def _schema_version(schema: Any) -> int:
    if not isinstance(schema, str) or not schema.startswith(SCHEMA_NAME + "/"):
        raise RecordError(f"not an mtlbench run record (schema {schema!r}, expected '{RECORD_SCHEMA}')")
    tail = schema[len(SCHEMA_NAME) + 1:]
    if not tail.isdigit():
        raise RecordError(f"unreadable schema version {schema!r}")
    version = int(tail)
    if version > SCHEMA_VERSION:
        raise NewerSchema(f"written by a newer mtlbench (schema {schema}; this one reads up to {RECORD_SCHEMA}): "
                          "upgrade mtlbench to read it")
    if version < 1:
        raise RecordError(f"unknown schema version {schema!r}")
    return version


def _upgrade_from_1(d: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 -> 2: ``created`` as an ISO string; directions of the then built-in metrics."""
    created = d.get("created")
    if isinstance(created, (int, float)) and not isinstance(created, bool) and math.isfinite(created):
        d["created"] = datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="seconds")
    names = set()
    if isinstance(d.get("metrics"), dict):
        for per_task in d["metrics"].values():
            if isinstance(per_task, dict):
                for per_metric in per_task.values():
                    if isinstance(per_metric, dict):
                        names.update(per_metric)
    d["directions"] = {m: SCHEMA1_DIRECTIONS[m] for m in sorted(names) if m in SCHEMA1_DIRECTIONS}
    d.setdefault("error", None)
    return d


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(d: dict[str, Any], every_direction: bool) -> None:
    for key, kind in (("run_id", str), ("spec", dict), ("status", str), ("created", str)):
        if not isinstance(d.get(key), kind):
            raise RecordError(f"'{key}' is {_what(d.get(key))}, expected a {kind.__name__}")
    if not d["run_id"]:
        raise RecordError("'run_id' is empty")
    if d["status"] not in STATUSES:
        raise RecordError(f"'status' is {d['status']!r}, expected one of {', '.join(STATUSES)}")
    try:
        datetime.fromisoformat(d["created"])
    except ValueError:
        raise RecordError(f"'created' is {d['created']!r}, expected an ISO 8601 time") from None
    spec = d["spec"]
    for key, kind in SPEC_REQUIRED.items():
        v = spec.get(key)
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise RecordError(f"'spec.{key}' is {_what(v)}, expected a {kind.__name__}")
    if not all(isinstance(t, str) for t in spec["tasks"]):
        raise RecordError("'spec.tasks' holds a non-string task name")
    metrics = d.get("metrics")
    if d["status"] == "ok" and metrics is None:
        raise RecordError("status is 'ok' but 'metrics' is missing or null")
    if metrics is not None:
        if not isinstance(metrics, dict):
            raise RecordError(f"'metrics' is {_what(metrics)}, expected an object split -> task -> metric")
        for split, per_task in metrics.items():
            if not isinstance(per_task, dict):
                raise RecordError(f"'metrics.{split}' is {_what(per_task)}, expected an object task -> metric")
            for task, per_metric in per_task.items():
                if not isinstance(per_metric, dict):
                    raise RecordError(f"'metrics.{split}.{task}' is {_what(per_metric)}, expected an object")
                for name, value in per_metric.items():
                    if value is not None and not _is_number(value):
                        raise RecordError(f"metric {split}/{task}/{name} is {_what(value)}, expected a number or "
                                          "null")
    directions = d.get("directions")
    if not isinstance(directions, dict):
        raise RecordError(f"'directions' is {_what(directions)}, expected an object metric -> max/min")
    bad = {k: v for k, v in directions.items() if v not in DIRECTIONS}
    if bad:
        k, v = next(iter(bad.items()))
        raise RecordError(f"direction of metric '{k}' is {v!r}, expected 'max' or 'min'")
    if every_direction and metrics:
        missing = sorted({m for pt in metrics.values() for pm in pt.values() for m in pm} - set(directions))
        if missing:
            raise RecordError(f"no direction (max/min) for metric(s) {', '.join(missing)}")
    error = d.get("error")
    if d["status"] == "failed" and not isinstance(error, dict):
        raise RecordError(f"status is 'failed' but 'error' is {_what(error)}, expected {{reason, type, traceback}}")
    if error is not None and (not isinstance(error, dict) or not isinstance(error.get("reason"), str)):
        raise RecordError(f"'error' is {_what(error)}, expected null or an object with a string 'reason'")
    for key in _DICT_FIELDS:
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise RecordError(f"'{key}' is {_what(d[key])}, expected an object")
    if d.get("curves") is not None and not isinstance(d["curves"], list):
        raise RecordError(f"'curves' is {_what(d['curves'])}, expected a list")
    for key in _NUMBER_FIELDS:
        if d.get(key) is not None and not _is_number(d[key]):
            raise RecordError(f"'{key}' is {_what(d[key])}, expected a number")
    for key in _INT_FIELDS:
        if d.get(key) is not None and (not isinstance(d[key], int) or isinstance(d[key], bool)):
            raise RecordError(f"'{key}' is {_what(d[key])}, expected an integer")
    per_task = d.get("selected_epochs")
    if per_task is not None and (not isinstance(per_task, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in per_task.values())):
        raise RecordError(f"'selected_epochs' is {_what(per_task)}, expected an object task -> integer")
    tasks = (d.get("dataset") or {}).get("tasks")
    if tasks is not None and (not isinstance(tasks, list) or not all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("metrics", []), list)
            for t in tasks)):
        raise RecordError("'dataset.tasks' is not a list of {name, metrics} objects")


def _what(v: Any) -> str:
    if v is None:
        return "null"
    text = repr(v)
    return f"a {type(v).__name__} ({text[:40] + '...' if len(text) > 40 else text})"
