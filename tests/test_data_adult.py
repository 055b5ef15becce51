"""The adult adapter on the real Parquet file (../shared/data/adult): labels, features, fixed split, cache, and every
bad input as one line."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from mtlbench.errors import MtlbenchError
from mtlbench.registry import build_options, get
from mtlbench.spec import build_spec
from mtlbench.tasks import helpers as F
from mtlbench.tasks import adult

REL = "adult/adult.parquet.brotli"


def _data_dir() -> Path:
    return Path(os.environ["MTLBENCH_DATA_DIR"])


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    if not (Path(os.environ.get("MTLBENCH_DATA_DIR", "/nonexistent")) / REL).is_file():
        pytest.skip("the shared adult file is not available")
    d = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(F.CACHE_DIR_ENV, str(d))
        mp.setenv(F.OFFLINE_ENV, "1")
        yield d


def _adapter(data_dir=None, **opts):
    e = get("dataset", "adult")
    return e.obj(build_options(e.options_class, e.resolve_options(opts)), data_dir=data_dir)


@pytest.fixture(scope="module")
def data(cache):
    return _adapter().load(0)


def test_sizes_rates_and_labels_match_the_raw_file(data):
    assert data.task_names == ("income", "marital")
    n = {s: len(v) for s, v in data.splits.items()}
    assert n == {"train": 34_189, "val": 7_326, "test": 7_327} and sum(n.values()) == 48_842
    raw = pd.read_parquet(_data_dir() / REL, columns=["income", "marital-status"])
    got = [int(sum(float(sp["labels"][:, i].sum()) for sp in data.splits.values())) for i in range(2)]
    assert got == [int((raw["income"] == ">50K").sum()), int((raw["marital-status"] == "Never-married").sum())]
    assert got[0] / 48_842 == pytest.approx(0.239, abs=0.001)
    assert all(sp["masks"].all() for sp in data.splits.values())
    assert data.info["source_files"][REL] == {"sha256": adult.FILE.sha256, "pinned": True}


def test_features_exclude_labels_and_weight(data):
    names = [f.name for f in data.schema.categorical] + list(data.schema.dense)
    for col in ("income", "marital-status", "fnlwgt"):
        assert col not in names
    assert tuple(f.name for f in data.schema.categorical) == adult.CATEGORICAL and data.schema.dense == adult.DENSE
    tr = data.splits["train"]
    assert not (tr["categorical"] == 0).any()
    assert float(tr["dense"].mean(0).abs().max()) < 1e-4
    for sp in data.splits.values():
        vocab = torch.tensor([f.vocab_size for f in data.schema.categorical])
        assert (sp["categorical"] >= 0).all() and (sp["categorical"] < vocab).all()


def test_split_is_fixed_and_cached(data, cache):
    again = _adapter().load(5)
    for s in data.splits:
        assert torch.equal(data.splits[s]["categorical"], again.splits[s]["categorical"])
        assert torch.equal(data.splits[s]["labels"], again.splits[s]["labels"])
    assert list((cache / "tensors").glob("adult-*.pt"))
    other = _adapter(split_seed=1).load(0)
    assert not torch.equal(other.splits["test"]["labels"], data.splits["test"]["labels"][:len(other.splits["test"])])


def test_missing_file_names_it_where_and_url(tmp_path):
    with pytest.raises(MtlbenchError) as err:
        _adapter(tmp_path).load(0)
    msg = str(err.value)
    assert "adult.parquet.brotli" in msg and str(tmp_path / REL) in msg and adult.URL in msg and "\n" not in msg


def test_hash_mismatch_is_refused(tmp_path):
    (tmp_path / "adult").mkdir()
    shutil.copyfile(_data_dir() / REL, tmp_path / REL)
    with open(tmp_path / REL, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(MtlbenchError, match="hash mismatch for .*adult.parquet.brotli"):
        _adapter(tmp_path).load(0)


def test_empty_split_after_max_rows():
    with pytest.raises(MtlbenchError, match="val split is empty with max_rows=2"):
        _adapter(max_rows=2).load(0)
    d = _adapter(max_rows=1000).load(0)
    assert {s: len(v) for s, v in d.splits.items()} == {"train": 700, "val": 150, "test": 150}


def test_bad_options_and_unknown_task():
    e = get("dataset", "adult")
    with pytest.raises(MtlbenchError, match=r"option 'max_rows' must be >= 1, got -1"):
        e.resolve_options({"max_rows": -1})
    with pytest.raises(MtlbenchError, match="unknown option for dataset 'adult' 'mode'"):
        e.resolve_options({"mode": "full"})
    with pytest.raises(MtlbenchError, match="unknown task for dataset 'adult' 'education'.*valid: income, marital"):
        build_spec(dataset="adult", tasks=["education"], arch="shared_bottom", optimizer="ew")
