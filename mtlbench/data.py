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
"""
from __future__ import annotations

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
    """

    name: str
    kind: TaskKind
    metrics: tuple[str, ...]
    n_classes: int = 1
    group: str | None = None
    description: str = ""
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
            raise ValueError(f"split tensors disagree on the number of rows: {sizes}")
        for key in ("labels", "masks"):
            if key not in self.tensors:
                raise ValueError(f"split lacks '{key}'")

    def __len__(self) -> int:
        return int(self.tensors["labels"].shape[0])

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def select_tasks(self, idx: list[int]) -> "Split":
        t = dict(self.tensors)
        t["labels"] = t["labels"][:, idx]
        t["masks"] = t["masks"][:, idx]
        return Split(t)

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
        missing = [s for s in SPLITS if s not in self.splits]
        if missing:
            raise ValueError(f"dataset '{self.name}' lacks split(s) {missing}")
        for s, split in self.splits.items():
            if len(split) == 0:
                raise MtlbenchError(f"dataset '{self.name}': the {s} split is empty")
            if split["labels"].shape[1] != len(self.tasks):
                raise ValueError(f"{s} labels have {split['labels'].shape[1]} columns for {len(self.tasks)} tasks")
        if any(t.dense for t in self.tasks):  # per-pixel labels: present, and class maps within 0..K-1 or ignore
            from mtlbench.vision.dense import check_targets

            check_targets(self.name, self.tasks, self.splits)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def select_tasks(self, names: list[str] | tuple[str, ...]) -> "MultiTaskData":
        """Keep only ``names`` (in that order); unknown or duplicate names give one clear line."""
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
                raise MtlbenchError(f"dataset '{self.name}': task(s) {', '.join(empty)} have no labelled rows "
                                    f"in the {s} split")
        return MultiTaskData(self.name, self.version, self.schema, tuple(self.tasks[i] for i in idx), splits,
                             dict(self.info))

    def describe(self) -> dict[str, Any]:
        """Provenance and sizes, stored in every run record."""
        return {"name": self.name, "version": self.version, "rows": {s: len(sp) for s, sp in self.splits.items()},
                "tasks": [t.to_dict() for t in self.tasks], "schema": self.schema.to_dict(), **self.info}


class DatasetAdapter:
    """Base class of a task adapter. Subclasses set ``version``, may declare an ``Options`` dataclass, and
    implement :meth:`load`. ``default_training`` may suggest epochs, batch size and lr for this data."""

    version: str = "1"
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
    def task_names(cls) -> tuple[str, ...]:
        """The tasks this dataset offers (for `mtlbench list` and early validation); may be empty if dynamic."""
        return tuple(getattr(cls, "tasks", ()))
