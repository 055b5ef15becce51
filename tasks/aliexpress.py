"""AliExpress Searching System dataset (Li et al., "Improving Multi-Scenario Learning to Rank in E-commerce by
Exploiting Task Relationships in the Label Space", CIKM 2020; Tianchi dataset 74690), in the processed CSV layout
of MTReclib (Zhu et al.) that public MTL libraries (MTReclib, torch-rechub) read.

Files (a Tianchi login is needed, so nothing is downloaded): ``<data_dir>/aliexpress/AliExpress_<CC>/train.csv`` and
``test.csv`` for ``country`` CC in NL, ES, FR, US (MTReclib's ``AliExpress_NL/`` folders, or the Tianchi user and
item files joined by MTReclib's preprocessing). Each has a header and the columns ``search_id``,
``categorical_1..16``, ``numerical_1..63``, ``click``, ``conversion`` (any order); a file with other columns is
refused, naming the missing and unexpected ones. The files are not pinned by hash (user-supplied; no published
hashes); their sha256 is recorded in the run record and keys the processed-tensor cache.

Tasks (binary, AUC then logloss, on all impressions): ``ctr`` = click; ``ctcvr`` = click and conversion (in the
public preprocessing ``conversion`` already implies a click, so this equals ``conversion``; rows with a conversion
but no click are counted in ``info``).

Features: the 16 categorical columns are integer codes; their vocabulary is rebuilt from the training split (its
distinct codes, sorted, get ids 1..K; a code unseen in training -> OOV id 0). The 63 numerical columns are dense
features standardised with training statistics. ``search_id`` is not a feature; it groups the rows of one search.

Splits: ``test.csv`` is the test split (the dataset's own time-based split). Validation is carved from
``train.csv`` by search: a search goes to validation when a hash of (search_id, ``split_seed``) falls below
``val_fraction`` (default 0.1, so about 10 % of searches), so a search never straddles train and validation and the
split does not depend on the run seed. MTReclib selects models on the test set; here selection uses this
validation split. ``max_rows`` keeps a fixed seeded subset of the rows of each file first (for quick runs).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np

from mtlbench import DatasetAdapter, FeatureSchema, MultiTaskData, TaskSpec, option_field, register_dataset
from mtlbench.data import CategoricalField
from mtlbench.tasks import helpers as F

NAME = "aliexpress"
COUNTRIES = ("NL", "ES", "FR", "US")
CATEGORICAL = tuple(f"categorical_{i}" for i in range(1, 17))
NUMERICAL = tuple(f"numerical_{i}" for i in range(1, 64))
LABELS = ("click", "conversion")
HOW = ("get the AliExpress dataset from Tianchi (dataset id 74690, https://tianchi.aliyun.com/dataset/74690, login "
       "needed) in MTReclib's processed layout (columns search_id, categorical_1..16, numerical_1..63, click, "
       "conversion)")

TASKS = (
    TaskSpec("ctr", "binary", ("auc", "logloss"), group="click", description="click | impression"),
    TaskSpec("ctcvr", "binary", ("auc", "logloss"), group="conversion",
             description="click and conversion | impression"),
)


def source_files(country: str) -> list[F.SourceFile]:
    folder = f"aliexpress/AliExpress_{country}"
    return [F.SourceFile(f"{folder}/{name}", how_to_get=HOW) for name in ("train.csv", "test.csv")]


@register_dataset(NAME)
class AliExpress(DatasetAdapter):
    """AliExpress search logs (Tianchi 74690, country NL/ES/FR/US): ctr, ctcvr; user-supplied files."""

    version = "1.0"
    tasks = ("ctr", "ctcvr")
    default_training = {"epochs": 5, "batch_size": 2048, "lr": 1e-3}

    @dataclass
    class Options:
        country: Literal["NL", "ES", "FR", "US"] = "NL"
        val_fraction: float = option_field(0.1, "share of train.csv's searches carved out for validation", minimum=0,
                                           maximum=1, open_minimum=True, open_maximum=True)
        max_rows: int | None = option_field(None, "a fixed seeded subset of this many rows of each file (none: all)",
                                            minimum=1)
        split_seed: int = 2018

        def __post_init__(self) -> None:
            if self.country not in COUNTRIES:
                raise ValueError(f"country must be one of {', '.join(COUNTRIES)}; got {self.country!r}")
            if not 0.0 < self.val_fraction < 1.0:
                raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
            if self.max_rows is not None and self.max_rows < 1:
                raise ValueError(f"max_rows must be a positive number of rows, got {self.max_rows}")

    def load(self, seed: int) -> MultiTaskData:
        o = self.options or self.Options()
        files = source_files(o.country)
        found = F.locate(NAME, files, F.resolve_data_dir(self.data_dir))
        p, _ = F.cached_tensors(NAME, self.version, dataclasses.asdict(o),
                                {f.relpath: found[f.relpath].sha256 for f in files},
                                lambda: self._build(o, files, found))
        splits, schema, info = F.unpack(p)
        return MultiTaskData(NAME, self.version, schema, TASKS, splits, info)

    def _build(self, o: "AliExpress.Options", files: list[F.SourceFile], found: dict[str, F.Located]) -> F.Payload:
        columns = ("search_id",) + CATEGORICAL + NUMERICAL + LABELS
        (train_path, train_hash), (test_path, test_hash) = ((found[f.relpath].path, found[f.relpath].sha256)
                                                            for f in files)
        train = F.read_layout_csv(NAME, train_path, columns, NUMERICAL, "AliExpress (MTReclib)", train_hash)
        test = F.read_layout_csv(NAME, test_path, columns, NUMERICAL, "AliExpress (MTReclib)", test_hash)
        rows = F.subsample(train.num_rows, o.max_rows, o.split_seed)
        in_val = F.hash_uniform(F.column_numpy(train, "search_id")[rows], o.split_seed) < o.val_fraction
        parts = [(train, rows[~in_val]), (train, rows[in_val]),
                 (test, F.subsample(test.num_rows, o.max_rows, o.split_seed))]
        names = ("train", "val", "test")
        why = "after carving validation from train.csv by search" + (
            f" with max_rows={o.max_rows}" if o.max_rows is not None else "") + f" (val_fraction={o.val_fraction})"
        F.check_nonempty(NAME, {s: len(idx) for s, (_, idx) in zip(names, parts)}, why)
        vocab, cat = F.categorical_matrix(parts, CATEGORICAL)
        dense = F.dense_matrix(parts, NUMERICAL)
        labels_of = {id(t): (F.binary_column(NAME, t, "click", p), F.binary_column(NAME, t, "conversion", p))
                     for t, p in ((train, train_path), (test, test_path))}
        tensors, rates, unclicked = {}, {}, {}
        for s, (table, idx), c, d in zip(names, parts, cat, dense):
            click, conv = (x[idx] for x in labels_of[id(table)])
            labels = np.stack([click, click & conv], axis=1)
            tensors[s] = F.to_tensors(c, d, labels, np.ones_like(labels, dtype=bool))
            rates[s] = {"ctr": float(click.mean()), "ctcvr": float(labels[:, 1].mean())}
            unclicked[s] = int((conv & ~click).sum())
        schema = FeatureSchema(categorical=tuple(CategoricalField(n, v) for n, v in zip(CATEGORICAL, vocab)),
                               dense=NUMERICAL)
        info = {"country": o.country,
                "split": f"test = test.csv; val = searches of train.csv with hash(search_id, {o.split_seed}) < "
                         f"{o.val_fraction}; train = the other searches",
                "positive_rate": rates, "conversions_without_click": unclicked,
                "source_files": F.source_info(files, found)}
        return F.payload(tensors, schema, info)
