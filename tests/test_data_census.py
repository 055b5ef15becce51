"""The census adapter on the real UCI test file (../shared/data), plus the shared file helpers of mtlbench.tasks.helpers:
hash pinning, downloads, the processed-tensor cache, fixed splits, and every bad input as one line."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mtlbench.cli import main
from mtlbench.errors import MtlbenchError
from mtlbench.registry import build_options, get
from mtlbench.spec import build_spec
from mtlbench.tasks import helpers as F
from mtlbench.tasks import census

TEST_GZ = "census_income/census-income.test.gz"


def _data_dir() -> Path:
    return Path(os.environ["MTLBENCH_DATA_DIR"])


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """A private cache directory for this module; no network access attempted."""
    if not (Path(os.environ.get("MTLBENCH_DATA_DIR", "/nonexistent")) / TEST_GZ).is_file():
        pytest.skip("the shared census test file is not available")
    d = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(F.CACHE_DIR_ENV, str(d))
        mp.setenv(F.OFFLINE_ENV, "1")
        yield d


def _adapter(data_dir=None, **opts):
    e = get("dataset", "census")
    return e.obj(build_options(e.options_class, e.resolve_options(opts)), data_dir=data_dir)


@pytest.fixture(scope="module")
def loaded(cache):
    t0 = time.perf_counter()
    first = _adapter().load(0)
    t1 = time.perf_counter()
    second = _adapter().load(1)
    t2 = time.perf_counter()
    return first, second, t1 - t0, t2 - t1


def test_test_only_split_sizes_rates_and_fixed_split(loaded):
    data, again, _, _ = loaded
    assert data.task_names == ("income", "marital", "education")
    assert {s: len(v) for s, v in data.splits.items()} == {"train": 49_881, "val": 24_940, "test": 24_941}
    # the split is fixed by split_seed: another run seed gives identical tensors
    for s in data.splits:
        for k in ("categorical", "dense", "labels", "masks"):
            assert torch.equal(data.splits[s][k], again.splits[s][k])
    rates = {t: sum(float(sp["labels"][:, i].sum()) for sp in data.splits.values()) / 99_762
             for i, t in enumerate(data.task_names)}
    assert rates["income"] == pytest.approx(0.062, abs=0.001)     # .names: 6.20 % '50000+.' in the test file
    assert rates["marital"] == pytest.approx(0.433, abs=0.001)
    assert all(sp["masks"].all() for sp in data.splits.values())
    assert data.info["mode"] == "test_only"
    assert data.info["source_files"][TEST_GZ] == {"sha256": census.TEST_FILE.sha256, "pinned": True}


def test_labels_match_an_independent_parse_of_the_raw_file(loaded):
    data = loaded[0]
    raw = pd.read_csv(_data_dir() / TEST_GZ, header=None, names=census.COLUMNS, skipinitialspace=True,
                      na_filter=False, usecols=["income", "marital_stat", "education"])
    expected = {"income": int((raw["income"] == "50000+.").sum()),
                "marital": int((raw["marital_stat"] == "Never married").sum()),
                "education": int(raw["education"].isin(census.EDUCATION_POSITIVE["associate_or_above"]).sum())}
    got = {t: int(sum(float(sp["labels"][:, i].sum()) for sp in data.splits.values()))
           for i, t in enumerate(data.task_names)}
    assert got == expected


def test_education_definition_is_documented_exactly():
    pos = census.EDUCATION_POSITIVE
    assert set(pos["associate_or_above"]) == {
        "Associates degree-occup /vocational", "Associates degree-academic program", "Bachelors degree(BA AB BS)",
        "Masters degree(MA MS MEng MEd MSW MBA)", "Prof school degree (MD DDS DVM LLB JD)", "Doctorate degree(PhD EdD)"}
    assert set(pos["bachelors_or_above"]) < set(pos["associate_or_above"]) < set(pos["some_college_or_above"])
    assert set(pos["some_college_or_above"]) - set(pos["associate_or_above"]) == {"Some college but no degree"}
    assert set(census.EDUCATION_VALUES) >= set(pos["some_college_or_above"]) and len(census.EDUCATION_VALUES) == 17


def test_no_label_leaks_into_features_and_schema(loaded):
    data = loaded[0]
    names = [f.name for f in data.schema.categorical] + list(data.schema.dense)
    for col in ("income", "marital_stat", "education", "instance_weight"):
        assert col not in names
    assert len(data.schema.categorical) == 31 and data.schema.dense == census.CONTINUOUS
    for s, sp in data.splits.items():
        vocab = torch.tensor([f.vocab_size for f in data.schema.categorical])
        assert (sp["categorical"] >= 0).all() and (sp["categorical"] < vocab).all()
        assert sp["categorical"].dtype == torch.int64 and sp["dense"].dtype == torch.float32
    assert not (data.splits["train"]["categorical"] == 0).any(), "OOV id 0 never occurs in the training split"
    dense = data.splits["train"]["dense"]
    assert float(dense.mean(0).abs().max()) < 1e-4 and float((dense.std(0) - 1).abs().max()) < 1e-3


def test_drop_columns_and_education_option(cache):
    d = _adapter(drop_columns=["tax_filer_stat", "age"], education_positive="bachelors_or_above",
                 max_rows=2000).load(0)
    names = [f.name for f in d.schema.categorical] + list(d.schema.dense)
    assert "tax_filer_stat" not in names and "age" not in names and len(names) == 36
    assert d.info["education_positive"] == list(census.EDUCATION_POSITIVE["bachelors_or_above"])
    assert {s: len(v) for s, v in d.splits.items()} == {"train": 1000, "val": 500, "test": 500}


def test_encoding_and_hash_order_helpers():
    values = np.array(["b", "a", "c", "z"])
    train = (values, np.array([0, 1, 0]))           # b, a, b
    other = (np.array(["c", "a", "q"]), np.array([0, 1, 2, 1]))  # c, a, q, a
    size, (tr, ot) = F.encode_categorical([train, other])
    assert size == 3 and tr.tolist() == [2, 1, 2] and ot.tolist() == [0, 1, 0, 1]
    p = F.hash_order(1000, 7)
    assert sorted(p.tolist()) == list(range(1000)) and np.array_equal(p, F.hash_order(1000, 7))
    assert not np.array_equal(p, F.hash_order(1000, 8))
    # pinned values: the split is a fixed function of (row, split_seed), never of a library's random stream
    assert F.hash_order(10, 2018).tolist() == [8, 5, 7, 3, 6, 4, 2, 1, 0, 9]
    assert F.hash_uniform(np.array([0, 1, 123456789]), 2018).tolist() == pytest.approx(
        [0.9065328031393485, 0.7879229883788164, 0.684680408734295], abs=1e-15)
    u = F.hash_uniform(np.arange(100_000), 3)
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.01


def test_cache_second_load_is_fast_and_identical(loaded, cache):
    first, second, t_first, t_second = loaded
    files = list((cache / "tensors").glob("census-*.pt"))
    assert files, "the processed tensors were cached"
    assert t_second < t_first / 5, (t_first, t_second)
    print(f"census test_only: first load {t_first:.2f} s, second load {t_second:.3f} s")
    # a corrupt cache file is rebuilt, not trusted
    for f in files:
        f.write_bytes(b"garbage")
    rebuilt = _adapter().load(0)
    assert torch.equal(rebuilt.splits["val"]["categorical"], first.splits["val"]["categorical"])


def test_split_seed_changes_the_split(cache):
    a = _adapter(max_rows=3000).load(0)
    b = _adapter(max_rows=3000, split_seed=7).load(0)
    assert not torch.equal(a.splits["train"]["labels"], b.splits["train"]["labels"]) or \
        not torch.equal(a.splits["train"]["dense"], b.splits["train"]["dense"])


def test_full_mode_without_train_file_is_one_clear_line(cache, tmp_path):
    with pytest.raises(MtlbenchError) as err:
        _adapter(mode="full").load(0)
    msg = str(err.value)
    assert "\n" not in msg
    assert "census-income.data.gz" in msg
    assert str(_data_dir() / "census_income" / "census-income.data.gz") in msg
    assert census.UCI_BASE + "census-income.data.gz" in msg


def test_full_mode_reads_train_file_and_checks_its_row_count(cache, monkeypatch):
    # a stand-in train file (the first 3,000 rows of the test file) where downloads land: <cache>/downloads
    fake = cache / "downloads" / census.TRAIN_FILE.relpath
    fake.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(_data_dir() / TEST_GZ, "rt") as src:
        head = [next(src) for _ in range(3000)]
    try:
        with gzip.open(fake, "wt") as out:
            out.writelines(head)
        with pytest.raises(MtlbenchError, match="3,000 rows, expected 199,523"):
            _adapter(mode="full").load(0)
        monkeypatch.setitem(census.ROWS, census.TRAIN_FILE.relpath, 3000)
        data = _adapter(mode="full").load(0)
    finally:
        fake.unlink()
    assert {s: len(v) for s, v in data.splits.items()} == {"train": 3000, "val": 49_881, "test": 49_881}
    assert data.info["source_files"]["census_income/census-income.data.gz"]["pinned"] is False
    assert "not pinned" in data.info["train_file_check"]
    assert data.info["mode"] == "full"


def test_train_file_with_another_layout_is_refused(cache, monkeypatch):
    fake = cache / "downloads" / census.TRAIN_FILE.relpath
    fake.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(_data_dir() / TEST_GZ, "rt") as src:
        head = [next(src) for _ in range(50)]
    try:
        with gzip.open(fake, "wt") as out:  # the instance weight column removed
            out.writelines(",".join(line.split(",")[:24] + line.split(",")[25:]) for line in head)
        with pytest.raises(MtlbenchError, match="has 41 comma-separated fields per row, expected 42"):
            _adapter(mode="full").load(0)
        monkeypatch.setitem(census.ROWS, census.TRAIN_FILE.relpath, 50)
        with gzip.open(fake, "wt") as out:  # a label value that is not UCI's
            out.writelines(line.replace(" - 50000.", " <=50K") for line in head)
        with pytest.raises(MtlbenchError, match="unexpected value.*'<=50K' in column 'income'"):
            _adapter(mode="full").load(0)
    finally:
        fake.unlink()


def test_missing_test_file_names_it_where_and_url(cache, tmp_path):
    with pytest.raises(MtlbenchError) as err:
        _adapter(tmp_path).load(0)
    msg = str(err.value)
    assert "census-income.test.gz" in msg and str(tmp_path / TEST_GZ) in msg and census.TEST_FILE.url in msg


def test_hash_mismatch_is_refused(cache, tmp_path):
    bad = tmp_path / TEST_GZ
    bad.parent.mkdir(parents=True)
    with gzip.open(bad, "wt") as out:
        out.write("38, Private\n")
    with pytest.raises(MtlbenchError, match="hash mismatch") as err:
        _adapter(tmp_path).load(0)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_recompressed_copy_is_accepted_by_content_hash(cache, tmp_path):
    copy = tmp_path / TEST_GZ
    copy.parent.mkdir(parents=True)
    with gzip.open(_data_dir() / TEST_GZ, "rb") as src, gzip.open(copy, "wb", compresslevel=1) as out:
        shutil.copyfileobj(src, out)
    assert F.sha256_file(copy) != census.TEST_FILE.sha256
    found = F.locate("census", [census.TEST_FILE], tmp_path)
    assert found[TEST_GZ].path == copy


def test_download_is_hash_pinned(cache, tmp_path, monkeypatch):
    monkeypatch.delenv(F.OFFLINE_ENV)
    src = (_data_dir() / TEST_GZ).resolve().as_uri()
    good = F.SourceFile("dl/census-income.test.gz", sha256=census.TEST_FILE.sha256, url=src)
    found = F.locate("census", [good], tmp_path / "empty")
    assert found[good.relpath].path == cache / "downloads" / good.relpath
    wrong = F.SourceFile("x/census-income.test.gz", sha256="0" * 64, url=src)
    with pytest.raises(MtlbenchError, match="hash mismatch"):
        F.locate("census", [wrong], tmp_path / "empty")
    assert not (cache / "downloads" / "x" / "census-income.test.gz").exists(), "a bad download is discarded"


def test_empty_split_after_max_rows(cache):
    with pytest.raises(MtlbenchError, match="val split is empty with max_rows=3"):
        _adapter(max_rows=3).load(0)


@pytest.mark.parametrize("opts, needle", [
    ({"mode": "fulll"}, "must be one of test_only, full"),
    ({"education_positive": "phd"}, "associate_or_above"),
    ({"drop_columns": ["nope"]}, "unknown feature column 'nope'"),
    ({"drop_columns": ["education"]}, "unknown feature column 'education'"),
    ({"max_rows": 0}, "option 'max_rows' must be >= 1, got 0"),
    ({"split_seed": -1}, "option 'split_seed' must be >= 0, got -1"),
])
def test_bad_options_one_line(opts, needle):
    e = get("dataset", "census")
    with pytest.raises(MtlbenchError, match=needle):
        e.resolve_options(opts)


def test_task_groups_and_unknown_task():
    for tasks in (["income", "marital"], ["education", "marital"]):
        spec = build_spec(dataset="census", tasks=tasks, arch="shared_bottom", optimizer="ew")
        assert list(spec.tasks) == tasks
    assert census.PAPER_TASK_GROUPS == {"group1": ("income", "marital"), "group2": ("education", "marital")}
    with pytest.raises(MtlbenchError, match="unknown task for dataset 'census' 'ctr'.*valid: education, income"):
        build_spec(dataset="census", tasks=["income", "ctr"], arch="shared_bottom", optimizer="ew")


def test_cli_one_epoch_run(cache, tmp_path, capsys):
    code = main(["run", "--dataset", "census", "--tasks", "income,marital", "-D", "max_rows=4000", "--epochs", "1",
                 "--batch-size", "256", "--quiet", "--results-dir", str(tmp_path / "runs")])
    assert code == 0
    (path,) = sorted((tmp_path / "runs").glob("*.json"))
    rec = json.loads(path.read_text())
    assert rec["status"] == "ok" and rec["spec"]["tasks"] == ["income", "marital"]
    assert rec["spec"]["dataset_options"]["max_rows"] == 4000 and rec["spec"]["dataset_options"]["mode"] == "test_only"
    assert rec["dataset"]["rows"] == {"train": 2000, "val": 1000, "test": 1000}
    for t in ("income", "marital"):
        assert 0.5 < rec["metrics"]["test"][t]["auc"] <= 1.0
    capsys.readouterr()
    assert main(["run", "--dataset", "census", "--tasks", "income,bogus", "--quiet",
                 "--results-dir", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bogus" in err and "valid: education, income, marital" in err


def test_paper_task_groups_are_selectable_by_name():
    from mtlbench.spec import build_spec

    s = build_spec(dataset="census", tasks=["group2"], arch="mmoe", optimizer="ew", device="cpu")
    assert s.tasks == ("education", "marital")
    s = build_spec(dataset="census", tasks=["group1"], arch="mmoe", optimizer="ew", device="cpu")
    assert s.tasks == ("income", "marital")
