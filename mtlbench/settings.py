"""Every `mtlbench run` setting, declared once.

Each :class:`Setting` names its type, its default (or that the dataset suggests it), its valid range and its help
text. From this one table come:

- the command-line flags of `mtlbench run` (:func:`add_flags`) and their help texts, defaults included;
- the validation of a ``--config`` file (:func:`from_config`), as strict as the flags (one line per bad value);
- the training fields of the run spec (``spec=True``: :mod:`mtlbench.spec` builds ``RunSpec`` from them);
- the protocol keys the leaderboard groups tables by (:func:`protocol_of`).

A new setting is one entry in :data:`SETTINGS`. A setting added after run-spec version 1 declares ``v1_value``,
the value every version-1 run had: the run id hashes it only when it differs from that value, so the ids of
runs stored before the setting existed do not change (and the leaderboard's protocol of such a run is the same).

This module imports nothing heavy (no torch), so `mtlbench --help` and bad input answer at once.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable

from mtlbench.errors import MtlbenchError, unknown


class _Dataset:
    """Sentinel default: the dataset suggests the value (its adapter's ``default_training``)."""

    def __repr__(self) -> str:
        return "DATASET"


DATASET: Any = _Dataset()
_MISSING: Any = object()

# the fallback of a dataset that suggests no training setting of its own
FALLBACK_TRAINING = {"epochs": 10, "batch_size": 1024, "lr": 1e-3, "embed_dim": 16}
MAX_SEEDS = 10_000      # seeds per sweep: a count beyond this is a typo, refused before anything is expanded
MAX_RUNS = 100_000      # runs per sweep (the product of the grid's axes)
SELECTIONS = ("mean_primary", "val_loss")
PRECISIONS = ("fp32", "bf16")
EXECUTORS = ("local", "ray")
TRACKERS = ("mlflow", "tensorboard")


@dataclass(frozen=True)
class Setting:
    """One setting of `mtlbench run`.

    ``kind`` is how a value is parsed and checked: int, float, str, bool, names (a list of names, from
    ``a,b`` or a YAML list), tasksets (``a,b;c``: several task sets), seeds, options (KEY=VALUE pairs / a
    mapping), paths (a repeatable flag / a list), threads (``auto`` or a positive integer).
    ``spec``: a training field of the run spec (changes results, hashed into the run id); ``protocol``: the
    leaderboard never puts runs that differ in it into one table.
    """

    name: str
    kind: str
    default: Any
    help: str
    spec: bool = False
    protocol: bool = False
    minimum: float | None = None
    maximum: float | None = None
    open_minimum: bool = False
    choices: tuple[str, ...] = ()
    v1_value: Any = _MISSING
    flags: tuple[str, ...] = ()
    metavar: str | None = None
    label: str = ""  # how messages name it (default: the name with spaces)

    @property
    def title(self) -> str:
        return self.label or self.name.replace("_", " ")

    @property
    def option_strings(self) -> tuple[str, ...]:
        return self.flags or ("--" + self.name.replace("_", "-"),)

    @property
    def flag(self) -> str:
        return self.option_strings[-1]

    @property
    def added_after_v1(self) -> bool:
        return self.v1_value is not _MISSING

    def default_text(self) -> str:
        if self.default is DATASET:
            return "the dataset's (`mtlbench list -v` shows them)"
        if self.kind == "bool":
            return ""
        if self.default is None or self.default == [] or self.default == {}:
            return ""
        if isinstance(self.default, list):
            return ",".join(map(str, self.default))
        return str(self.default)

    def range_text(self) -> str:
        lo, hi = self.minimum, self.maximum
        if lo is None and hi is None:
            return ""
        if hi is None:
            return f"{'>' if self.open_minimum else '>='} {lo:g}"
        return f"in [{lo:g}, {hi:g}]"

    def check(self, value: Any, where: str) -> Any:
        """``value`` (from a config file or already parsed from a flag) checked and normalised; one line if bad."""
        return _CHECKS[self.kind](self, value, where)

    def parse_flag(self, text: Any) -> Any:
        """A flag's text (or list of texts for a repeatable flag) into a checked value."""
        if self.kind in ("int", "float") and isinstance(text, str):
            return self.check(_number(text, self.kind, self.flag), self.flag)
        return self.check(text, self.flag)


SEEDS_HELP = ("seeds: N (the first N seeds, 0..N-1; 0 means seed 0), a range A-B (inclusive) or a list 0,3,7 "
              f"(combinable: 0-2,7); at most {MAX_SEEDS:,}")

SETTINGS: tuple[Setting, ...] = (
    # the grid's axes: each value (combination) is one run
    Setting("dataset", "names", ["ecommerce"], "dataset name(s), comma-separated"),
    Setting("tasks", "tasksets", None, "comma-separated tasks (default: all of the dataset's); several task "
            "sets separated by ';'"),
    Setting("arch", "names", ["shared_bottom"], "architecture name(s), comma-separated"),
    Setting("optimizer", "names", ["ew"], "MTL optimizer name(s), comma-separated"),
    Setting("seeds", "seeds", [0], SEEDS_HELP),
    Setting("ablate", "names", [], "comma-separated on/off arch options (e.g. feature_gate,self_gate): the full "
            "model plus one run per switch flipped, crossed with the rest of the grid", metavar="SWITCHES"),
    # training settings: fields of the run spec, hashed into the run id
    Setting("epochs", "int", DATASET, "maximum epochs", spec=True, protocol=True, minimum=1),
    Setting("batch_size", "int", DATASET, "training batch size", spec=True, protocol=True, minimum=1),
    Setting("lr", "float", DATASET, "learning rate (Adam)", spec=True, protocol=True, minimum=0,
            open_minimum=True, label="learning rate"),
    Setting("weight_decay", "float", 1e-6, "Adam weight decay", spec=True, protocol=True, minimum=0),
    Setting("patience", "int", 3, "early stopping: epochs without a better validation score (0: never stop "
            "early)", spec=True, protocol=True, minimum=0),
    Setting("embed_dim", "int", DATASET, "embedding width shared by all archs: each categorical field's embedding "
            "and the one projection of the dense features (a dense-only table's input layer)", spec=True,
            protocol=True, minimum=1),
    Setting("device", "str", "auto", "auto (a GPU when there is one), cpu, cuda, cuda:N or mps; the run id "
            "names the device (cuda and cuda:0 are one)", spec=True),
    Setting("selection", "str", "mean_primary", "model selection on validation: mean_primary (mean primary "
            "metric over tasks) or val_loss", spec=True, protocol=True, choices=SELECTIONS),
    Setting("threads", "threads", "auto", "torch intra-op threads per run, part of the run id (results differ "
            "in the last digits between thread counts). auto: the dataset's suggestion (1 for the built-in "
            "tabular datasets, whose small models run fastest on one thread), at most the cores divided "
            "among parallel runs", spec=True, protocol=True, minimum=1, v1_value=1),
    Setting("precision", "str", "fp32", "compute precision of the forward passes: fp32, or bf16 (torch.autocast "
            "to bfloat16: matmuls and convolutions in bfloat16, parameters, gradients, optimizer state, losses "
            "and metrics in float32; part of the run id and the protocol)", spec=True, protocol=True,
            choices=PRECISIONS, v1_value="fp32"),
    # the method's and the dataset's own options (validated against their declared Options)
    Setting("arch_options", "options", {}, "architecture option", flags=("-A", "--arch-option"),
            metavar="KEY=VALUE"),
    Setting("optimizer_options", "options", {}, "optimizer option", flags=("-O", "--optimizer-option"),
            metavar="KEY=VALUE"),
    Setting("dataset_options", "options", {}, "dataset option", flags=("-D", "--dataset-option"),
            metavar="KEY=VALUE"),
    # model merging (`mtlbench list` shows the mergers): merge a cached zoo of fine-tuned experts
    Setting("merger", "names", [], "model merger(s), comma-separated: merge one fine-tuned expert per task "
            "(trained with the settings above and cached on first use) instead of training jointly"),
    Setting("merger_options", "options", {}, "merger option", flags=("-M", "--merger-option"), metavar="KEY=VALUE"),
    Setting("zoo_dir", "str", None, "where fine-tuned experts are cached (default: $MTLBENCH_ZOO_DIR, else "
            "~/.cache/mtlbench/zoo)"),
    Setting("no_task_id", "bool", False, "the deployment has no task id at inference: refuse mergers that need "
            "one (TALL-masks)"),
    # how runs are executed and stored (not part of a result)
    Setting("results_dir", "str", os.path.join("results", "runs"), "where records go"),
    Setting("data_dir", "str", None, "data directory (default: $MTLBENCH_DATA_DIR)"),
    Setting("plugins", "paths", [], "load a plugin (a .py file or a module) first; repeatable",
            flags=("--plugin",), metavar="FILE_OR_MODULE"),
    Setting("jobs", "int", None, "parallel runs in a sweep (default: one per core)", minimum=1),
    Setting("vectorize_seeds", "bool", False, "train the seeds of each spec together in this process, --jobs of "
            "them at a time, each handing its core on after every step; one normal record per seed, the same "
            "numbers as separate runs (dropout on a GPU: those seeds run one by one)"),
    Setting("executor", "str", "local", "local (processes on this machine) or ray", choices=EXECUTORS),
    Setting("ray_address", "str", None, "a Ray cluster to join (default: start a local one)"),
    Setting("log", "names", [], "mirror metrics to mlflow and/or tensorboard (comma-separated; optional extras)"),
    Setting("force", "bool", False, "rerun runs that already finished"),
    Setting("quiet", "bool", False, "no progress output"),
    Setting("dry_run", "bool", False, "list the expanded runs (and the combinations skipped as incompatible) and "
            "which are already done; train nothing"),
)
BY_NAME = {s.name: s for s in SETTINGS}


def spec_settings() -> list[Setting]:
    """The training settings that are run-spec fields, in declaration order."""
    return [s for s in SETTINGS if s.spec]


def protocol_keys() -> tuple[str, ...]:
    """What the leaderboard groups tables by: the dataset, its version, options and task set, and every
    training setting declared ``protocol=True``."""
    return ("dataset", "dataset_version", "dataset_options", "tasks",
            *(s.name for s in SETTINGS if s.protocol))


def protocol_of(spec: dict[str, Any]) -> dict[str, Any]:
    """A stored spec's protocol. A setting added after spec version 1 appears only where it differs from the
    value every version-1 run had (a v1 record lacks it): old and new runs of one protocol share a table."""
    out = {}
    for k in protocol_keys():
        s = BY_NAME.get(k)
        if s is not None and s.added_after_v1:
            v = spec.get(k, s.v1_value)
            if v != s.v1_value:
                out[k] = v
        else:
            out[k] = spec.get(k)
    return out


def defaults() -> dict[str, Any]:
    return {s.name: (list(s.default) if isinstance(s.default, list) else dict(s.default)
                     if isinstance(s.default, dict) else None if s.default is DATASET else s.default)
            for s in SETTINGS}


def dataset_default(name: str, suggested: dict[str, Any]) -> Any:
    """The value of a ``DATASET``-default setting for a dataset that suggests ``suggested``."""
    return suggested.get(name, FALLBACK_TRAINING.get(name))


def from_config(data: dict[str, Any], where: str) -> dict[str, Any]:
    """A config file's mapping, every key and value checked; ``seed: N`` is ``seeds: [N]``."""
    out: dict[str, Any] = {}
    if "seed" in data and "seeds" in data:
        raise MtlbenchError(f"{where}: give either 'seed' or 'seeds', not both")
    for key, value in data.items():
        k = str(key).replace("-", "_")
        if k == "seed":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise MtlbenchError(f"{where}: 'seed' must be a non-negative integer, got {value!r}")
            k, value = "seeds", [value]
        if k == "plugin":
            k = "plugins"
        if k not in BY_NAME:
            raise unknown(f"setting in {where}", key, [*BY_NAME, "seed"])
        out[k] = None if value is None else BY_NAME[k].check(value, f"{where}: '{k}'")
    return out


# -------------------------------------------------------------------------------------------- value checks

def _number(text: str, kind: str, where: str) -> Any:
    try:
        return int(text) if kind == "int" else float(text)
    except ValueError:
        raise MtlbenchError(f"{where} must be {'an integer' if kind == 'int' else 'a number'}, got {text!r}") \
            from None


def _in_range(s: Setting, value: float, where: str) -> None:
    lo, hi = s.minimum, s.maximum
    bad = (lo is not None and (value < lo or (s.open_minimum and value == lo))) or (hi is not None and value > hi)
    if bad:
        raise MtlbenchError(f"{where} must be {s.range_text()}, got {value!r}")


def _check_int(s: Setting, v: Any, where: str) -> int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise MtlbenchError(f"{where} must be an integer, got {v!r}")
    _in_range(s, v, where)
    return v


def _check_float(s: Setting, v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise MtlbenchError(f"{where} must be a finite number, got {v!r}")
    _in_range(s, v, where)
    return float(v)


def _check_str(s: Setting, v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise MtlbenchError(f"{where} must be a string, got {v!r}")
    if s.choices and v not in s.choices:
        raise unknown(s.name.replace("_", " "), v, s.choices)
    return v


def _check_bool(s: Setting, v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise MtlbenchError(f"{where} must be true or false, got {v!r}")
    return v


def _names(v: Any, where: str, allow_empty: bool) -> list[str]:
    if isinstance(v, str):
        v = [t.strip() for t in v.split(",") if t.strip()]
    if not isinstance(v, list):
        raise MtlbenchError(f"{where} must be a list of names or a comma-separated string, got {v!r}")
    for i, x in enumerate(v):
        if not isinstance(x, str) or not x.strip():
            raise MtlbenchError(f"{where}: item {i} must be a name, got {x!r}")
    if not v and not allow_empty:
        raise MtlbenchError(f"{where} is empty: name at least one")
    return [x.strip() for x in v]


def _check_names(s: Setting, v: Any, where: str) -> list[str]:
    return _names(v, where, allow_empty=s.default == [])  # a list that may be empty by default may be given empty


def _check_tasksets(s: Setting, v: Any, where: str) -> list[list[str]]:
    """``"a,b;c"``, ``[a, b]`` (one set) or ``[[a, b], [c]]`` (several) -> a list of task sets."""
    if isinstance(v, str):
        sets = [[t.strip() for t in part.split(",") if t.strip()] for part in v.split(";")]
    elif isinstance(v, list) and v and all(isinstance(x, str) for x in v):
        sets = [v]
    elif isinstance(v, list) and v and all(isinstance(x, list) for x in v):
        sets = v
    elif isinstance(v, list) and not v:
        raise MtlbenchError(f"{where} is empty; leave it out for all of the dataset's tasks")
    else:
        bad = next((x for x in v if not isinstance(x, (str, list))), None) if isinstance(v, list) else v
        raise MtlbenchError(f"{where} must be a list of task names or a list of task sets (lists of names), got "
                            f"{bad!r}" + (f" in {v!r}" if isinstance(v, list) else ""))
    for i, tasks in enumerate(sets):
        label = where if len(sets) == 1 else f"{where}: task set {i}"
        _names(tasks, label, allow_empty=False)
    return [[t.strip() for t in ts] for ts in sets]


def _check_seeds(s: Setting, v: Any, where: str) -> list[int]:
    if isinstance(v, bool):
        raise MtlbenchError(f"{where} must be seeds ({SEEDS_HELP}), got {v!r}")
    if isinstance(v, (int, str)):
        return parse_seeds(str(v), where)
    if not isinstance(v, list) or not v:
        raise MtlbenchError(f"{where} must be a non-empty list of seeds or a string ({SEEDS_HELP}), got {v!r}")
    for i, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise MtlbenchError(f"{where}: item {i} must be a non-negative integer seed, got {x!r}")
    if len(v) > MAX_SEEDS:
        raise MtlbenchError(f"{where}: {len(v):,} seeds is more than the {MAX_SEEDS:,} a sweep takes")
    return list(dict.fromkeys(v))


def _check_options(s: Setting, v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise MtlbenchError(f"{where} must be a mapping, got {v!r}")
    return {str(k): x for k, x in v.items()}


def _check_paths(s: Setting, v: Any, where: str) -> list[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise MtlbenchError(f"{where} must be a file or module name or a list of them, got {v!r}")
    return list(v)


def _check_threads(s: Setting, v: Any, where: str) -> int | str:
    if v == "auto":
        return v
    if isinstance(v, str) and re.fullmatch(r"\s*\d+\s*", v):
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise MtlbenchError(f"{where} must be auto or a positive integer, got {v!r}")
    return v


_CHECKS = {"int": _check_int, "float": _check_float, "str": _check_str, "bool": _check_bool,
           "names": _check_names, "tasksets": _check_tasksets, "seeds": _check_seeds, "options": _check_options,
           "paths": _check_paths, "threads": _check_threads}


def parse_seeds(text: str, where: str = "--seeds") -> list[int]:
    """``"5"`` -> 0..4; ``"0"`` -> [0]; ``"0-4"`` -> 0..4; ``"1,3,7"``; ``"0-2,9"``; duplicates removed, order
    kept. More than :data:`MAX_SEEDS` seeds is refused before any list is built."""
    text = str(text).strip()
    if re.fullmatch(r"\d+", text):
        n = int(text)
        if n > MAX_SEEDS:
            raise MtlbenchError(f"{where} {text}: a count of {n:,} seeds is more than the {MAX_SEEDS:,} a sweep "
                                f"takes ({SEEDS_HELP})")
        return [0] if n == 0 else list(range(n))
    parts: list[tuple[int, int]] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part) or re.fullmatch(r"(\d+)()", part)
        if not m:
            raise MtlbenchError(f"{where} {text!r} does not parse ({SEEDS_HELP})")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) else a
        if b < a:
            raise MtlbenchError(f"{where} {text!r}: range {part} runs backwards ({SEEDS_HELP})")
        parts.append((a, b))
    total = sum(b - a + 1 for a, b in parts)
    if total > MAX_SEEDS:
        raise MtlbenchError(f"{where} {text!r}: {total:,} seeds is more than the {MAX_SEEDS:,} a sweep takes")
    seeds: list[int] = []
    for a, b in parts:
        seeds.extend(range(a, b + 1))
    return list(dict.fromkeys(seeds))


# ------------------------------------------------------------------------------------------ command line

def add_flags(parser: Any, settings: Iterable[Setting] = SETTINGS) -> None:
    """One flag per setting, with its help text, default and range. Flags are parsed to raw text here and
    checked by :func:`from_flags`, so a bad value gets the same one line as in a config file."""
    for s in settings:
        parts = [s.help]
        if s.default_text():
            parts.append(f"default: {s.default_text()}")
        if s.range_text() and s.kind in ("int", "float"):
            parts.append(s.range_text())
        help_text = "; ".join(parts).replace("%", "%%")
        if s.kind == "bool":
            parser.add_argument(*s.option_strings, dest=s.name, action="store_true", default=None, help=help_text)
        elif s.kind in ("options", "paths"):
            parser.add_argument(*s.option_strings, dest=s.name, action="append", metavar=s.metavar,
                                help=help_text)
        else:
            parser.add_argument(*s.option_strings, dest=s.name, metavar=s.metavar, help=help_text)


def key_values(items: list[str], flag: str) -> dict[str, Any]:
    from mtlbench.registry import parse_value

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise MtlbenchError(f"{flag} expects KEY=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_value(v)
    return out


def from_flags(args: Any, base: dict[str, Any]) -> dict[str, Any]:
    """The settings given as flags, checked, layered over ``base`` (defaults + config file)."""
    out: dict[str, Any] = {}
    for s in SETTINGS:
        raw = getattr(args, s.name, None)
        if raw is None:
            continue
        if s.kind == "options":
            out[s.name] = {**base[s.name], **key_values(raw, s.flag)}
        elif s.kind == "paths":
            out[s.name] = base[s.name] + s.check(raw, s.flag)
        elif s.kind == "names" and isinstance(raw, str) and not raw.strip(",").strip():
            out[s.name] = s.check([""], s.flag) if s.default != [] else []
        else:
            out[s.name] = s.parse_flag(raw)
    return out
