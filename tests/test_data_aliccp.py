"""The aliccp adapter's parser on real rows: the torch-rechub Ali-CCP sample files (../shared/data), copied at test
time into a temporary data directory laid out as the adapter expects (never into the repository)."""
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
from mtlbench.tasks import aliccp

SAMPLES = "torchrechub_samples/ali-ccp"
SPLITS = ("train", "val", "test")


def _samples() -> Path:
    return Path(os.environ.get("MTLBENCH_DATA_DIR", "/nonexistent")) / SAMPLES


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    if not (_samples() / "ali_ccp_train_sample.csv").is_file():
        pytest.skip("the shared Ali-CCP sample files are not available")
    d = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(F.CACHE_DIR_ENV, str(d))
        mp.setenv(F.OFFLINE_ENV, "1")
        yield d


def _layout(root: Path) -> Path:
    folder = root / "ali-ccp"
    folder.mkdir(parents=True)
    for s in SPLITS:
        shutil.copyfile(_samples() / f"ali_ccp_{s}_sample.csv", folder / f"ali_ccp_{s}.csv")
    return folder


def _raw(s: str) -> pd.DataFrame:
    return pd.read_csv(_samples() / f"ali_ccp_{s}_sample.csv")


def _adapter(data_dir, **opts):
    e = get("dataset", "aliccp")
    return e.obj(build_options(e.options_class, e.resolve_options(opts)), data_dir=data_dir)


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    _layout(root)
    return root


def test_parses_the_real_sample_rows_with_three_label_spaces(sample_dir):
    data = _adapter(sample_dir).load(0)
    assert data.task_names == ("ctr", "cvr", "ctcvr")
    assert {s: len(v) for s, v in data.splits.items()} == {"train": 100, "val": 50, "test": 50}
    assert data.schema.n_categorical == 23 and data.schema.dense == aliccp.DENSE
    for s in SPLITS:
        raw, sp = _raw(s), data.splits[s]
        click = torch.tensor(raw["click"].to_numpy(), dtype=torch.bool)
        buy = torch.tensor(raw["purchase"].to_numpy(), dtype=torch.bool)
        y, m = sp["labels"], sp["masks"]
        assert torch.equal(y[:, 0], click.float()) and m[:, 0].all()
        assert torch.equal(m[:, 1], click), "cvr is defined on clicked impressions only"
        assert torch.equal(y[:, 1][click], buy[click].float())
        assert torch.equal(y[:, 2], (click & buy).float()) and m[:, 2].all()
    assert data.info["noisy_rows"] == {"train": 0, "val": 0, "test": 0}


def test_vocabulary_from_train_and_oov(sample_dir):
    data = _adapter(sample_dir).load(0)
    train, test = _raw("train"), _raw("test")
    for j, col in enumerate(aliccp.SPARSE):
        vocab = sorted(train[col].unique())
        assert data.schema.categorical[j].vocab_size == len(vocab) + 1
        got = data.splits["test"]["categorical"][:, j]
        seen = torch.tensor(test[col].isin(vocab).to_numpy())
        assert (got[~seen] == 0).all() and (got[seen] >= 1).all()
    assert not (data.splits["train"]["categorical"] == 0).any()


def test_noisy_rows_dropped_or_kept(tmp_path):
    folder = _layout(tmp_path)
    df = _raw("train")
    df.loc[[0, 1], ["click", "purchase"]] = [0, 1]  # a purchase without a click
    df.to_csv(folder / "ali_ccp_train.csv", index=False)
    dropped = _adapter(tmp_path).load(0)
    assert len(dropped.splits["train"]) == 98 and dropped.info["noisy_rows"]["train"] == 2
    kept = _adapter(tmp_path, drop_noisy=False).load(0)
    tr = kept.splits["train"]
    assert len(tr) == 100 and not tr["masks"][:2, 1].any() and not tr["labels"][:2].any()


def test_empty_split_after_filtering(tmp_path):
    folder = _layout(tmp_path)
    df = _raw("test")
    df["click"], df["purchase"] = 0, 1
    df.to_csv(folder / "ali_ccp_test.csv", index=False)
    with pytest.raises(MtlbenchError) as err:
        _adapter(tmp_path).load(0)
    msg = str(err.value)
    assert "the test split is empty after dropping rows with a purchase but no click" in msg and "\n" not in msg


def test_missing_files_say_which_and_where(tmp_path):
    folder = _layout(tmp_path)
    (folder / "ali_ccp_val.csv").unlink()
    with pytest.raises(MtlbenchError) as err:
        _adapter(tmp_path).load(0)
    msg = str(err.value)
    assert str(folder / "ali_ccp_val.csv") in msg and "ali_ccp_train.csv" not in msg
    assert "408" in msg and "preprocess_ali_ccp.py" in msg


def test_column_layout_mismatch_names_columns(tmp_path):
    folder = _layout(tmp_path)
    df = _raw("val").drop(columns=["D853", "301"])
    df["extra"] = 1
    df.to_csv(folder / "ali_ccp_val.csv", index=False)
    with pytest.raises(MtlbenchError) as err:
        _adapter(tmp_path).load(0)
    msg = str(err.value)
    assert "missing column(s) 301, D853" in msg and "unexpected column(s) extra" in msg
    assert str(folder / "ali_ccp_val.csv") in msg


def test_unparsable_value_is_one_line(tmp_path):
    folder = _layout(tmp_path)
    text = (folder / "ali_ccp_test.csv").read_text().splitlines()
    text[1] = "x" + text[1][1:]
    (folder / "ali_ccp_test.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(MtlbenchError) as err:
        _adapter(tmp_path).load(0)
    assert "cannot parse" in str(err.value) and "ali_ccp_test.csv" in str(err.value) and "\n" not in str(err.value)


def test_max_rows_and_cache(sample_dir, cache):
    a = _adapter(sample_dir, max_rows=40).load(0)
    assert {s: len(v) for s, v in a.splits.items()} == {"train": 40, "val": 40, "test": 40}
    b = _adapter(sample_dir, max_rows=40).load(3)
    assert torch.equal(a.splits["val"]["categorical"], b.splits["val"]["categorical"])
    assert len(list((cache / "tensors").glob("aliccp-*.pt"))) >= 2


def test_bad_options_and_unknown_task():
    e = get("dataset", "aliccp")
    with pytest.raises(MtlbenchError, match="drop_noisy' must be true or false"):
        e.resolve_options({"drop_noisy": "maybe"})
    with pytest.raises(MtlbenchError, match="unknown task for dataset 'aliccp' 'purchase'.*valid: ctcvr, ctr, cvr"):
        build_spec(dataset="aliccp", tasks=["ctr", "purchase"], arch="shared_bottom", optimizer="ew")
