"""Ali-CCP, Alibaba Click and Conversion Prediction (Ma et al., "Entire Space Multi-Task Model", SIGIR 2018; Tianchi
dataset 408), in the processed CSV layout of torch-rechub (``examples/ranking/data/ali-ccp/preprocess_ali_ccp.py``).

Files (a Tianchi login is needed, so nothing is downloaded): ``<data_dir>/ali-ccp/ali_ccp_train.csv``,
``ali_ccp_val.csv`` and ``ali_ccp_test.csv``, the output of torch-rechub's preprocessing of the Tianchi files
``sample_skeleton_{train,test}.csv`` and ``common_features_{train,test}.csv`` (train = the Tianchi train file;
val and test = the Tianchi test file split 1:1). Columns (header, any order): ``click``, ``purchase``, 23 sparse
fields ``101, 121, 122, 124, 125, 126, 127, 128, 129, 205, 206, 207, 210, 216, 508, 509, 702, 853, 301, 109_14,
110_14, 127_14, 150_14`` (integer codes) and 8 dense ``D109_14, D110_14, D127_14, D150_14, D508, D509, D702,
D853``; a file with other columns is refused, naming the missing and unexpected ones. The files are not pinned by
hash (user-supplied); their sha256 is recorded and keys the processed-tensor cache.

Tasks (binary, AUC then logloss), the three label spaces kept apart (see the reference notes, pitfall 1):
``ctr`` = click on all impressions; ``cvr`` = purchase given click, defined on clicked impressions only (masked
elsewhere: ESMM's CVR AUC); ``ctcvr`` = click and purchase on all impressions.

Noisy rows (no click but a purchase) are dropped by default (``drop_noisy``), as torch-rechub's preprocessing and
the official AITM code do; with ``drop_noisy=false`` they stay, count as negatives for ``ctr``/``ctcvr`` and are
masked for ``cvr``. A split left empty by this filter (or by ``max_rows``) is refused in one line.

Features: the sparse codes' vocabulary is rebuilt from the training split (its distinct codes, sorted, get ids
1..K; unseen in training -> OOV id 0); the dense columns are standardised with training statistics.
``max_rows`` keeps a fixed seeded subset (from ``split_seed``) of each file, for quick runs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from mtlbench import DatasetAdapter, FeatureSchema, MultiTaskData, TaskSpec, option_field, register_dataset
from mtlbench.data import CategoricalField
from mtlbench.tasks import helpers as F

NAME = "aliccp"
SPARSE = ("101", "121", "122", "124", "125", "126", "127", "128", "129", "205", "206", "207", "210", "216", "508",
          "509", "702", "853", "301", "109_14", "110_14", "127_14", "150_14")
DENSE = ("D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853")
LABELS = ("click", "purchase")
HOW = ("get Ali-CCP from Tianchi (dataset id 408, https://tianchi.aliyun.com/dataset/408, login needed) and "
       "convert it with torch-rechub's examples/ranking/data/ali-ccp/preprocess_ali_ccp.py")
FILES = tuple(F.SourceFile(f"ali-ccp/ali_ccp_{s}.csv", how_to_get=HOW) for s in ("train", "val", "test"))

TASKS = (
    TaskSpec("ctr", "binary", ("auc", "logloss"), group="click", description="click | impression"),
    TaskSpec("cvr", "binary", ("auc", "logloss"), group="conversion",
             description="purchase | click (masked on unclicked impressions)"),
    TaskSpec("ctcvr", "binary", ("auc", "logloss"), group="conversion",
             description="click and purchase | impression"),
)


@register_dataset(NAME)
class AliCCP(DatasetAdapter):
    """Ali-CCP (Tianchi 408, torch-rechub layout): ctr, cvr (on clicks), ctcvr; user-supplied files."""

    version = "1.0"
    tasks = ("ctr", "cvr", "ctcvr")
    default_training = {"epochs": 3, "batch_size": 4096, "lr": 1e-3}

    @dataclass
    class Options:
        drop_noisy: bool = True
        max_rows: int | None = option_field(None, "a fixed seeded subset of this many rows of each file (none: all)",
                                            minimum=1)
        split_seed: int = 2018

        def __post_init__(self) -> None:
            if self.max_rows is not None and self.max_rows < 1:
                raise ValueError(f"max_rows must be a positive number of rows, got {self.max_rows}")

    def load(self, seed: int) -> MultiTaskData:
        o = self.options or self.Options()
        found = F.locate(NAME, FILES, F.resolve_data_dir(self.data_dir))
        p, _ = F.cached_tensors(NAME, self.version, dataclasses.asdict(o),
                                {f.relpath: found[f.relpath].sha256 for f in FILES}, lambda: self._build(o, found))
        splits, schema, info = F.unpack(p)
        return MultiTaskData(NAME, self.version, schema, TASKS, splits, info)

    def _build(self, o: "AliCCP.Options", found: dict[str, F.Located]) -> F.Payload:
        names = ("train", "val", "test")
        parts, labels_of, noisy = [], [], {}
        for s, f in zip(names, FILES):
            path = found[f.relpath].path
            table = F.read_layout_csv(NAME, path, LABELS + SPARSE + DENSE, DENSE, "Ali-CCP (torch-rechub)",
                                      found[f.relpath].sha256)
            click, buy = F.binary_column(NAME, table, "click", path), F.binary_column(NAME, table, "purchase", path)
            idx = F.subsample(table.num_rows, o.max_rows, o.split_seed)
            bad = buy[idx] & ~click[idx]
            noisy[s] = int(bad.sum())
            if o.drop_noisy:
                idx = idx[~bad]
            parts.append((table, idx))
            labels_of.append((click[idx], buy[idx]))
        why = ("after dropping rows with a purchase but no click" if o.drop_noisy else "") + (
            f" with max_rows={o.max_rows}" if o.max_rows is not None else "")
        F.check_nonempty(NAME, {s: len(idx) for s, (_, idx) in zip(names, parts)}, why.strip())
        vocab, cat = F.categorical_matrix(parts, SPARSE)
        dense = F.dense_matrix(parts, DENSE)
        tensors, rates = {}, {}
        for s, (click, buy), c, d in zip(names, labels_of, cat, dense):
            labels = np.stack([click, buy & click, buy & click], axis=1)
            masks = np.stack([np.ones_like(click), click, np.ones_like(click)], axis=1)
            tensors[s] = F.to_tensors(c, d, labels, masks)
            rates[s] = {"ctr": float(click.mean()),
                        "cvr": float((buy & click).sum() / click.sum()) if click.any() else None,
                        "ctcvr": float((buy & click).mean())}
        schema = FeatureSchema(categorical=tuple(CategoricalField(n, v) for n, v in zip(SPARSE, vocab)), dense=DENSE)
        info = {"split": "the given ali_ccp_{train,val,test}.csv files",
                "positive_rate": rates, "noisy_rows": noisy, "noisy_rows_dropped": o.drop_noisy,
                "source_files": F.source_info(FILES, found)}
        return F.payload(tensors, schema, info)
