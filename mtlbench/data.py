"""Data contracts: a multi-task dataset is tensors per split, a feature schema and one TaskSpec per task.

Every split holds the same named tensors, one row per example:

- ``categorical``: int64 ``[N, F]``, one column per categorical field, ids in ``[0, vocab_size)``;
- ``dense``: float32 ``[N, D]``;
- ``labels``: float32 ``[N, T]`` (class index stored as float for multiclass tasks);
- ``masks``: bool ``[N, T]``, False where a task's label is undefined or missing for that row;
- optional extras named by the schema (behaviour sequences as padded int64 ``[N, L]`` + lengths, images...).

Images (``FeatureSchema.image``): ``images`` holds ``[N, C, H, W]`` stored compactly (uint8 for 8-bit sources);
the arch's input stage normalises them on the device, per batch (``mtlbench.vision.nets.ImageInput``). Dense tasks
(``mtlbench.vision.dense``: segmentation, depth, normals, binary maps) keep their per-pixel labels in the split
under ``TaskSpec.target`` (and validity maps under ``TaskSpec.valid``); their ``labels`` column is unused (0) and
their ``masks`` column says whether the row is labelled.

Label masks are how a funnel is expressed: CVR is defined only on clicked impressions, so its mask is the click.

What an adapter returns is checked once before training (:meth:`MultiTaskData.validate`: every bad tensor is one
line naming it and what was expected). ``mtlbench.tasks.helpers.from_arrays`` builds a valid one from numpy arrays.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mtlbench.errors import MtlbenchError, unknown

TaskKind = Literal["binary", "regression", "multiclass", "segmentation", "depth", "normals", "binary_map"]
from mtlbench.vision.kinds import DENSE_KINDS  # noqa: E402
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class CategoricalField:
    name: str
    vocab_size: int


@dataclass(frozen=True)
class SequenceField:
    """A padded behaviour sequence (room for sequence models): ids of ``of_field``'s vocabulary, 0-padded."""

    name: str
    of_field: str
    max_len: int


@dataclass(frozen=True)
class ImageSpec:
    """The ``images`` tensor of every split: ``[N, channels, height, width]`` of ``dtype`` (``uint8``: 0..255);
    the input stage computes ``(x / scale - mean) / std`` per channel on the device."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    dtype: str = "uint8"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict[str, Any]:
        return {"channels": self.channels, "height": self.height, "width": self.width, "mean": list(self.mean),
                "std": list(self.std), "dtype": self.dtype}


@dataclass(frozen=True)
class FeatureSchema:
    categorical: tuple[CategoricalField, ...] = ()
    dense: tuple[str, ...] = ()
    sequences: tuple[SequenceField, ...] = ()
    extras: tuple[str, ...] = ()  # other per-row tensors (e.g. images) a specialised arch may read
    image: ImageSpec | None = None  # set for image datasets: the split holds ``images``

    @property
    def n_categorical(self) -> int:
        return len(self.categorical)

    @property
    def n_dense(self) -> int:
        return len(self.dense)

    def to_dict(self) -> dict[str, Any]:
        return {"categorical": {f.name: f.vocab_size for f in self.categorical}, "dense": list(self.dense),
                "sequences": {s.name: {"of_field": s.of_field, "max_len": s.max_len} for s in self.sequences},
                "extras": list(self.extras), **({"image": self.image.to_dict()} if self.image else {})}


@dataclass(frozen=True)
class TaskSpec:
    """One prediction task.

    ``metrics`` lists metric names (see ``mtlbench list``); the first is the task's primary metric, used for
    model selection and Δm%. ``group`` is an optional meta-category hint (HoME's default task grouping).
    ``label_scale`` = ``(mean, std)`` marks a regression task whose stored labels were standardised
    (:meth:`MultiTaskData.standardise_labels`): the model learns ``(y - mean) / std``, and predictions and labels
    are mapped back (``y * std + mean``) before any metric, so metrics are in the original units.
    """

    name: str
    kind: TaskKind
    metrics: tuple[str, ...]
    n_classes: int = 1
    group: str | None = None
    description: str = ""
    label_scale: tuple[float, float] | None = None
    # dense tasks only (see mtlbench.vision.dense): the split keys of the per-pixel labels and validity map, the
    # ignore value of a class map, and the positive weight of a binary map's BCE (None: HED class balancing)
    target: str = ""
    valid: str = ""
    ignore_index: int = 255
    pos_weight: float | None = None

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    @property
    def dense(self) -> bool:
        return self.kind in DENSE_KINDS

    @property
    def output_dim(self) -> int:
        if self.kind in ("multiclass", "segmentation"):
            return self.n_classes
        return 3 if self.kind == "normals" else 1

    @property
    def loss(self) -> str:
        return {"binary": "bce", "regression": "mse", "multiclass": "cross_entropy",
                "segmentation": "cross_entropy_ignore", "depth": "l1_valid", "normals": "cosine_valid",
                "binary_map": "bce_balanced" if self.pos_weight is None else "bce_weighted"}[self.kind]

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "kind": self.kind, "loss": self.loss, "metrics": list(self.metrics),
             "n_classes": self.n_classes, "group": self.group}
        if self.label_scale is not None:
            d["label_scale"] = {"mean": self.label_scale[0], "std": self.label_scale[1]}
        if self.dense:
            d.update(target=self.target, valid=self.valid, ignore_index=self.ignore_index,
                     pos_weight=self.pos_weight)
        return d


@dataclass
class Split:
    """The tensors of one split; all share their first dimension."""

    tensors: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        sizes = {k: v.shape[0] for k, v in self.tensors.items()}
        if len(set(sizes.values())) > 1:
            raise MtlbenchError(f"split tensors disagree on the number of rows: {sizes} (every tensor of a split "
                                f"holds one row per example)")
        for key in ("labels", "masks"):
            if key not in self.tensors:
                raise MtlbenchError(f"a split lacks the tensor '{key}' (a split holds at least 'labels' float32 "
                                    f"[N, T] and 'masks' bool [N, T])")

    def __len__(self) -> int:
        return int(self.tensors["labels"].shape[0])

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def select_tasks(self, idx: list[int]) -> "Split":
        t = dict(self.tensors)
        t["labels"] = t["labels"][:, idx]
        t["masks"] = t["masks"][:, idx]
        return Split(t)

    def select_rows(self, keep: torch.Tensor) -> "Split":
        """The rows where ``keep`` (bool ``[N]``) is True, every tensor alike."""
        return Split({k: v[keep] for k, v in self.tensors.items()})

    def to(self, device: torch.device | str) -> "Split":
        return Split({k: v.to(device) for k, v in self.tensors.items()})


@dataclass
class MultiTaskData:
    """What a task adapter returns: splits, schema, task specs and provenance (name, version, options)."""

    name: str
    version: str
    schema: FeatureSchema
    tasks: tuple[TaskSpec, ...]
    splits: dict[str, Split]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        missing = [s for s in SPLITS if s not in self.splits]
        if missing:
            raise MtlbenchError(f"dataset '{self.name}' lacks split(s) {', '.join(missing)} (an adapter returns "
                                f"train, val and test)")
        for s, split in self.splits.items():
            if len(split) == 0:
                raise MtlbenchError(f"dataset '{self.name}': the {s} split is empty")
            labels = split["labels"]
            if labels.dim() != 2 or labels.shape[1] != len(self.tasks):
                raise MtlbenchError(f"dataset '{self.name}': {s} tensor 'labels' has shape {list(labels.shape)} for "
                                    f"{len(self.tasks)} task(s); expected [N, {len(self.tasks)}], one column per "
                                    f"task")
        if any(t.dense for t in self.tasks):  # per-pixel labels: present, and class maps within 0..K-1 or ignore
            from mtlbench.vision.dense import check_targets

            check_targets(self.name, self.tasks, self.splits)
        self._validated = False

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def validate(self) -> "MultiTaskData":
        """Check what an adapter returned, once, before anything trains: task specs, then per split the dtype and
        shape of every tensor, categorical ids within their vocabularies, finite values, labels that fit each
        task's kind, and at least one labelled training row per task. The first problem is one line naming the
        tensor and what was expected. Returns ``self``."""
        if self._validated:
            return self
        from mtlbench import registry

        where = f"dataset '{self.name}'"
        names = self.task_names
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise MtlbenchError(f"{where}: task name(s) {', '.join(dup)} appear twice")
        known = set(registry.names("metric"))
        for t in self.tasks:
            if t.kind not in ("binary", "regression", "multiclass") + DENSE_KINDS:
                raise MtlbenchError(f"{where}: task '{t.name}' has kind {t.kind!r}; expected one of binary, "
                                    f"regression, multiclass, {', '.join(DENSE_KINDS)}")
            if not t.metrics:
                raise MtlbenchError(f"{where}: task '{t.name}' lists no metrics (the first is its primary metric)")
            for m in t.metrics:
                if m not in known:
                    raise unknown(f"metric of task '{t.name}' ({where})", m, sorted(known))
                kinds = registry.get("metric", m).obj.kinds
                if t.kind not in kinds:
                    raise MtlbenchError(f"{where}: metric '{m}' of task '{t.name}' does not suit a {t.kind} task "
                                        f"(it suits {', '.join(kinds)})")
            if t.kind in ("multiclass", "segmentation") and t.n_classes < 2:
                raise MtlbenchError(f"{where}: multiclass task '{t.name}' has n_classes={t.n_classes}; expected >= 2")
            if t.label_scale is not None and (t.kind != "regression" or not t.label_scale[1] > 0):
                raise MtlbenchError(f"{where}: task '{t.name}' has label_scale {t.label_scale}; only a regression "
                                    f"task has one, with a positive std")
        for s in SPLITS:
            self._validate_split(s, self.splits[s])
        train_masks = self.splits["train"]["masks"]
        empty = [n for n, has in zip(names, train_masks.any(0).tolist()) if not has]
        if empty:
            raise MtlbenchError(f"{where}: task(s) {_short(empty)} have no labelled row in the train split")
        self._validated = True
        return self

    def _validate_split(self, s: str, split: Split) -> None:
        where = f"dataset '{self.name}': {s} tensor"
        n, n_tasks = len(split), len(self.tasks)

        def check(key: str, dtype: torch.dtype, shape: list[int], what: str) -> torch.Tensor:
            if key not in split.tensors:
                raise MtlbenchError(f"{where} '{key}' is missing; expected {what} {_dt(dtype)} {shape}")
            x = split[key]
            if x.dtype != dtype or list(x.shape) != shape:
                hint = " (labels are float32 even for binary tasks: labels.float())" if key == "labels" else ""
                raise MtlbenchError(f"{where} '{key}' is {_dt(x.dtype)} {list(x.shape)}; expected {what} {_dt(dtype)} "
                                    f"{shape}{hint}")
            return x

        labels = check("labels", torch.float32, [n, n_tasks], "labels")
        masks = check("masks", torch.bool, [n, n_tasks], "label masks")
        sc = self.schema
        if sc.n_categorical or "categorical" in split.tensors:
            cat = check("categorical", torch.int64, [n, sc.n_categorical], "categorical ids")
            if sc.n_categorical:
                vocab = torch.tensor([f.vocab_size for f in sc.categorical], dtype=torch.int64)
                bad = (cat < 0) | (cat >= vocab)
                if bool(bad.any()):
                    j = int(bad.any(0).nonzero()[0])
                    col = cat[:, j]
                    v = int(col[(col < 0) | (col >= vocab[j])][0])
                    raise MtlbenchError(f"{where} 'categorical' column {j} (field '{sc.categorical[j].name}') holds id "
                                        f"{v}; expected ids in [0, {int(vocab[j])}) (its vocab_size)")
        if sc.n_dense or "dense" in split.tensors:
            dense = check("dense", torch.float32, [n, sc.n_dense], "dense features")
            if not bool(torch.isfinite(dense).all()):
                j = int((~torch.isfinite(dense)).any(0).nonzero()[0])
                raise MtlbenchError(f"{where} 'dense' column {j} ('{sc.dense[j]}') holds NaN or infinite values; "
                                    f"expected finite numbers (impute them first)")
        for q in sc.sequences:
            check(q.name, torch.int64, [n, q.max_len], f"sequence '{q.name}' ids")
        if sc.image is not None:
            dtype = getattr(torch, sc.image.dtype, None)
            if isinstance(dtype, torch.dtype):
                check("images", dtype, [n, *sc.image.shape], "images")
        if not bool(torch.isfinite(labels).all()):
            j = int((~torch.isfinite(labels)).any(0).nonzero()[0])
            raise MtlbenchError(f"{where} 'labels' column {j} (task '{self.tasks[j].name}') holds NaN or infinite "
                                f"values; expected finite labels (mark a missing label with masks=False and store 0)")
        for j, t in enumerate(self.tasks):
            y = labels[:, j][masks[:, j]]
            if t.kind == "binary":
                bad = y[(y != 0) & (y != 1)]
                expected = "0 or 1"
            elif t.kind == "multiclass":
                bad = y[(y != y.round()) | (y < 0) | (y >= t.n_classes)]
                expected = f"class indices 0..{t.n_classes - 1}"
            else:
                continue
            if bad.numel():
                raise MtlbenchError(f"{where} 'labels' column {j} (task '{t.name}', {t.kind}) holds "
                                    f"{float(bad[0]):g} on a labelled row; expected {expected}")

    def select_tasks(self, names: list[str] | tuple[str, ...]) -> "MultiTaskData":
        """Keep only ``names`` (in that order); unknown or duplicate names give one clear line.

        Rows with no label for any kept task are dropped from every split (they would only cost time: no loss and
        no metric reads them); how many per split is in ``info["rows_without_labels_dropped"]``."""
        names = list(names)
        if not names:
            raise MtlbenchError("the task list is empty (valid: " + ", ".join(self.task_names) + ")")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise MtlbenchError(f"task(s) listed twice: {', '.join(dup)}")
        for n in names:
            if n not in self.task_names:
                raise unknown(f"task for dataset '{self.name}'", n, self.task_names)
        idx = [self.task_names.index(n) for n in names]
        splits = {s: sp.select_tasks(idx) for s, sp in self.splits.items()}
        for s, sp in splits.items():
            empty = [names[j] for j in range(len(names)) if not bool(sp["masks"][:, j].any())]
            if empty:
                raise MtlbenchError(f"dataset '{self.name}': task(s) {_short(empty)} have no labelled rows "
                                    f"in the {s} split")
        dropped: dict[str, int] = {}
        for s, sp in splits.items():
            keep = sp["masks"].any(1)
            if not bool(keep.all()):
                dropped[s] = len(sp) - int(keep.sum())
                splits[s] = sp.select_rows(keep)
        info = dict(self.info)
        if dropped:
            info["rows_without_labels_dropped"] = {s: dropped.get(s, 0) for s in splits}
        out = MultiTaskData(self.name, self.version, self.schema, tuple(self.tasks[i] for i in idx), splits, info)
        out._validated = self._validated
        return out

    def standardise_labels(self, tasks: list[str] | tuple[str, ...] | None = None) -> "MultiTaskData":
        """Regression labels z-scored with the mean and standard deviation of their labelled *training* rows
        (computed in float64; a constant task is only centred), for every regression task or the ``tasks`` named.
        Each task keeps its ``(mean, std)`` as ``label_scale``, so metrics are reported in the original units.
        Masked rows stay 0."""
        names = [t.name for t in self.tasks if t.kind == "regression"] if tasks is None else list(tasks)
        for n in names:
            if n not in self.task_names:
                raise unknown(f"task to standardise in dataset '{self.name}'", n, self.task_names)
        idx = [self.task_names.index(n) for n in names]
        train = self.splits["train"]
        new_tasks = list(self.tasks)
        mean = torch.zeros(len(self.tasks), dtype=torch.float64)
        std = torch.ones(len(self.tasks), dtype=torch.float64)
        for j in idx:
            t = self.tasks[j]
            if t.kind != "regression":
                raise MtlbenchError(f"dataset '{self.name}': task '{t.name}' is {t.kind}; only regression labels "
                                    f"are standardised")
            if t.label_scale is not None:
                raise MtlbenchError(f"dataset '{self.name}': task '{t.name}' is already standardised")
            y = train["labels"][:, j][train["masks"][:, j]].double()
            m = float(y.mean()) if y.numel() else 0.0
            sd = float(y.std(unbiased=False)) if y.numel() > 1 else 0.0
            sd = sd if sd > 0 and math.isfinite(sd) else 1.0
            mean[j], std[j] = m, sd
            new_tasks[j] = dataclasses.replace(t, label_scale=(m, sd))
        scaled = torch.zeros(len(self.tasks), dtype=torch.bool)
        scaled[idx] = True
        splits = {}
        for s, sp in self.splits.items():
            z = ((sp["labels"].double() - mean) / std).float()
            z = torch.where(sp["masks"], z, torch.zeros_like(z))
            splits[s] = Split({**sp.tensors, "labels": torch.where(scaled, z, sp["labels"])})
        info = dict(self.info)
        info["standardised_labels"] = names
        return MultiTaskData(self.name, self.version, self.schema, tuple(new_tasks), splits, info)

    def describe(self) -> dict[str, Any]:
        """Provenance and sizes, stored in every run record."""
        return {"name": self.name, "version": self.version, "rows": {s: len(sp) for s, sp in self.splits.items()},
                "tasks": [t.to_dict() for t in self.tasks], "schema": self.schema.to_dict(), **self.info}


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _short(items: list[str], keep: int = 8) -> str:
    return ", ".join(items) if len(items) <= keep else ", ".join(items[:keep]) + f", ... ({len(items)} in all)"


def _call_with_options(fn: Any, options: Any) -> Any:
    """``fn(options)``, or ``fn()`` for an override written before options were passed."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(options)
    return fn(options) if params else fn()


class DatasetAdapter:
    """Base class of a task adapter. Subclasses set ``version`` and ``tasks``, may declare an ``Options``
    dataclass, and implement :meth:`load` (``mtlbench.tasks.helpers.from_arrays`` builds its return value from
    numpy arrays).

    ``default_training`` suggests training settings for this data: ``epochs``, ``batch_size``, ``lr`` and
    ``embed_dim``, the width of the shared input layer (every categorical field's embedding and the one projection
    of the dense features; a dense-only table has only that projection, so it is the input layer's width). A flag
    the user gives wins; ``mtlbench list -v`` shows them. ``task_aliases`` names task sets (``--tasks group1``).
    When the tasks depend on the options (e.g. an option that keeps the first k labels), override
    :meth:`task_names` (and :meth:`task_sets`), which receive the options instance."""

    version: str = "1"
    tasks: tuple[str, ...] = ()
    modality: str = "tabular"  # "image": the splits hold images and archs are looked up in their image variant
    default_training: dict[str, Any] = {}
    task_aliases: dict[str, tuple[str, ...]] = {}  # named task sets, e.g. a paper's groups: --tasks group1

    def __init__(self, options: Any = None, data_dir: str | None = None) -> None:
        self.options = options
        self.data_dir = data_dir

    @classmethod
    def provided_features(cls, options: Any) -> tuple[str, ...]:
        """Optional features (``"sequences"``, ...) the schema will have with these options: what an arch's
        ``required_features`` is checked against without loading the data."""
        return ()

    @classmethod
    def image_shape(cls, options: Any) -> tuple[int, int, int] | None:
        """``(C, H, W)`` of the images with these options, known before loading (image datasets)."""
        return None

    @classmethod
    def dense_tasks(cls, options: Any) -> tuple[str, ...]:
        """The tasks with per-pixel labels with these options (checked against an arch's dense decoders)."""
        return ()

    def load(self, seed: int) -> MultiTaskData:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def task_names(cls, options: Any = None) -> tuple[str, ...]:
        """The tasks this dataset offers with these options (``None``: the defaults), for `mtlbench list` and
        early validation; may be empty if only loading can tell (then ``--tasks`` is required)."""
        return tuple(getattr(cls, "tasks", ()))

    @classmethod
    def task_sets(cls, options: Any = None) -> dict[str, tuple[str, ...]]:
        """Named task sets (``--tasks NAME``) with these options; default ``task_aliases``."""
        return {k: tuple(v) for k, v in (getattr(cls, "task_aliases", {}) or {}).items()}


def offered_tasks(adapter: type, options: Any = None) -> tuple[str, ...]:
    """``adapter.task_names(options)``, also for a plugin that overrides it without the options argument."""
    return tuple(_call_with_options(adapter.task_names, options))


def offered_task_sets(adapter: type, options: Any = None) -> dict[str, tuple[str, ...]]:
    """``adapter.task_sets(options)``, or the ``task_aliases`` of an adapter that predates task_sets."""
    fn = getattr(adapter, "task_sets", None)
    if fn is None:
        return {k: tuple(v) for k, v in (getattr(adapter, "task_aliases", {}) or {}).items()}
    return dict(_call_with_options(fn, options))
