"""The aliexpress adapter's parser on real rows: the torch-rechub AliExpress sample files (../shared/data), copied at
test time into a temporary data directory laid out as the adapter expects (never into the repository)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mtlbench.errors import MtlbenchError
from mtlbench.registry import build_options, get
from mtlbench.spec import build_spec
from mtlbench.tasks import helpers as F
from mtlbench.tasks import aliexpress

SAMPLES = "torchrechub_samples/aliexpress"


def _samples() -> Path:
    return Path(os.environ.get("MTLBENCH_DATA_DIR", "/nonexistent")) / SAMPLES


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    if not (_samples() / "aliexpress_train_sample.csv").is_file():
        pytest.skip("the shared AliExpress sample files are not available")
    d = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(F.CACHE_DIR_ENV, str(d))
        mp.setenv(F.OFFLINE_ENV, "1")
        yield d


def _layout(root: Path, country: str = "NL") -> Path:
    folder = root / "aliexpress" / f"AliExpress_{country}"
    folder.mkdir(parents=True)
    shutil.copyfile(_samples() / "aliexpress_train_sample.csv", folder / "train.csv")
    shutil.copyfile(_samples() / "aliexpress_test_sample.csv", folder / "test.csv")
    return folder


def _adapter(data_dir, **opts):
    e = get("dataset", "aliexpress")
    return e.obj(build_options(e.options_class, e.resolve_options(opts)), data_dir=data_dir)


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    _layout(root, "NL")
    return root


def test_parses_the_real_sample_rows(sample_dir):
    data = _adapter(sample_dir, val_fraction=0.3).load(0)
    assert data.task_names == ("ctr", "ctcvr")
    raw_train = pd.read_csv(_samples() / "aliexpress_train_sample.csv")
    raw_test = pd.read_csv(_samples() / "aliexpress_test_sample.csv")
    n = {s: len(v) for s, v in data.splits.items()}
    assert n["train"] + n["val"] == len(raw_train) == 100 and n["test"] == len(raw_test) == 20
    assert n["val"] > 0 and n["train"] > 0
    # labels: ctr = click, ctcvr = click and conversion, on every impression
    test = data.splits["test"]
    assert test["labels"][:, 0].tolist() == raw_test["click"].astype(float).tolist()
    assert test["labels"][:, 1].tolist() == (raw_test["click"] & raw_test["conversion"]).astype(float).tolist()
    assert all(sp["masks"].all() for sp in data.splits.values())
    assert tuple(f.name for f in data.schema.categorical) == aliexpress.CATEGORICAL and data.schema.n_dense == 63
    assert data.schema.dense == tuple(f"numerical_{i}" for i in range(1, 64))
    # a search never straddles train and validation
    val_rows = int(n["val"])
    assert val_rows == int(sum(raw_train["search_id"].isin(
        raw_train["search_id"].unique()[F.hash_uniform(raw_train["search_id"].unique(), 2018) < 0.3])))


def test_categorical_vocabulary_from_train_and_oov(sample_dir):
    data = _adapter(sample_dir, val_fraction=0.3).load(0)
    raw_test = pd.read_csv(_samples() / "aliexpress_test_sample.csv")
    raw_train = pd.read_csv(_samples() / "aliexpress_train_sample.csv")
    in_val = F.hash_uniform(raw_train["search_id"].to_numpy(), 2018) < 0.3
    tr = raw_train[~in_val]
    for j in range(16):
        col = f"categorical_{j + 1}"
        vocab = np.unique(tr[col].to_numpy())
        assert data.schema.categorical[j].vocab_size == len(vocab) + 1
        got = data.splits["test"]["categorical"][:, j].numpy()
        seen = raw_test[col].isin(vocab).to_numpy()
        assert (got[~seen] == 0).all() and (got[seen] >= 1).all()
        assert (vocab[got[seen] - 1] == raw_test[col].to_numpy()[seen]).all()
    assert float(data.splits["train"]["dense"].mean(0).abs().max()) < 1e-4


def test_country_option_and_fixed_split(tmp_path):
    _layout(tmp_path, "FR")
    a = _adapter(tmp_path, country="FR", val_fraction=0.3).load(0)
    b = _adapter(tmp_path, country="FR", val_fraction=0.3).load(9)
    assert a.info["country"] == "FR"
    for s in a.splits:
        assert torch.equal(a.splits[s]["dense"], b.splits[s]["dense"])
    with pytest.raises(MtlbenchError, match="AliExpress_NL/train.csv"):
        _adapter(tmp_path, country="NL").load(0)


def test_missing_files_say_which_and_where(tmp_path):
    with pytest.raises(MtlbenchError) as err:
        _adapter(tmp_path, country="ES").load(0)
    msg = str(err.value)
    assert "\n" not in msg
    for name in ("train.csv", "test.csv"):
        assert str(tmp_path / "aliexpress" / "AliExpress_ES" / name) in msg
    assert "74690" in msg


def test_column_layout_mismatch_names_columns(tmp_path):
    folder = _layout(tmp_path)
    df = pd.read_csv(folder / "train.csv").drop(columns=["numerical_63"]).rename(columns={"click": "clicked"})
    df.to_csv(folder / "train.csv", index=False)
    with pytest.raises(MtlbenchError) as err:
        _adapter(tmp_path).load(0)
    msg = str(err.value)
    assert "missing column(s) numerical_63, click" in msg and "unexpected column(s) clicked" in msg
    assert str(folder / "train.csv") in msg


def test_non_binary_label_is_refused(tmp_path):
    folder = _layout(tmp_path)
    df = pd.read_csv(folder / "test.csv")
    df.loc[0, "conversion"] = 2
    df.to_csv(folder / "test.csv", index=False)
    with pytest.raises(MtlbenchError, match="non-binary value.*2.*'conversion'"):
        _adapter(tmp_path).load(0)


def test_empty_validation_split_is_one_line(sample_dir):
    with pytest.raises(MtlbenchError, match="the val split is empty after carving validation"):
        _adapter(sample_dir, val_fraction=0.001).load(0)


def test_bad_options_and_unknown_task():
    e = get("dataset", "aliexpress")
    with pytest.raises(MtlbenchError, match="must be one of NL, ES, FR, US; got 'RU'"):
        e.resolve_options({"country": "RU"})
    with pytest.raises(MtlbenchError, match=r"option 'val_fraction' must be > 0 and < 1, got 1.5"):
        e.resolve_options({"val_fraction": 1.5})
    with pytest.raises(MtlbenchError, match="unknown task for dataset 'aliexpress' 'cvr'.*valid: ctcvr, ctr"):
        build_spec(dataset="aliexpress", tasks=["ctr", "cvr"], arch="shared_bottom", optimizer="ew")
