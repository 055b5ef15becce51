"""The public dataset-plugin API: mtlbench.tasks.helpers (from_arrays, split_rows, data_file, read_csv), the
validation of what an adapter returns, label standardisation, R² / explained variance, options that change the
task list, task sets and suggested training in `list -v`, and rows without a selected label being dropped."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import mtlbench
from mtlbench import MtlbenchError, MultiTaskData, Split, TaskSpec
from mtlbench.cli import main
from mtlbench.data import CategoricalField, FeatureSchema
from mtlbench.metrics import evaluate_task, explained_variance, metric, r2
from mtlbench.spec import build_spec
from mtlbench.tasks import helpers as H

DATA = Path(os.environ.get("MTLBENCH_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
TOX21 = "tox21/tox21.csv.gz"
TOX21_SHA = "48b34e4e59a2bae6f95734cd206c1869ab355f50a5e50bb7371a21f861d5e297"  # shared/data/SHA256SUMS
F32_EPS = float(torch.finfo(torch.float32).eps)


def toy(n: int = 300, seed: int = 0, **kw) -> MultiTaskData:
    rng = np.random.default_rng(seed)
    labels = {"y": rng.normal(20.0, 5.0, n), "b": rng.random(n) < 0.4, "c": rng.integers(0, 3, n).astype(float)}
    labels["y"][rng.random(n) < 0.2] = np.nan
    return H.from_arrays("toy", labels, kinds={"y": "regression", "b": "binary", "c": "multiclass"},
                         categorical={"colour": rng.choice(["red", "green", "blue"], n), "k": rng.integers(0, 50, n)},
                         dense={"x": rng.normal(3.0, 2.0, n), "z": rng.uniform(0, 1, n)}, **kw)


# ----------------------------------------------------------------------------------------------- from_arrays

def test_from_arrays_builds_masks_vocabularies_and_standardised_features():
    d = toy()
    assert d.task_names == ("y", "b", "c")
    assert [t.kind for t in d.tasks] == ["regression", "binary", "multiclass"]
    assert [t.metrics for t in d.tasks] == [("rmse", "r2"), ("auc", "logloss"), ("accuracy", "logloss")]
    assert d.tasks[2].n_classes == 3
    rows = {s: len(sp) for s, sp in d.splits.items()}
    assert rows == {"train": 210, "val": 45, "test": 45}
    tr = d.splits["train"]
    assert tr["labels"].dtype == torch.float32 and tr["masks"].dtype == torch.bool
    # NaN labels are masked and stored as 0; bool labels are 0/1
    y_masked = tr["labels"][:, 0][~tr["masks"][:, 0]]
    assert y_masked.numel() > 0 and bool((y_masked == 0).all())
    assert set(tr["labels"][:, 1].unique().tolist()) == {0.0, 1.0}
    # vocabularies from train only: ids 1..K, K + 1 = vocab size; dense standardised with train statistics
    assert d.schema.categorical[0] == CategoricalField("colour", 4)
    assert int(tr["categorical"][:, 0].min()) == 1
    x = tr["dense"].double()
    assert torch.allclose(x.mean(0), torch.zeros(2, dtype=torch.float64), atol=100 * F32_EPS)
    assert torch.allclose(x.std(0, unbiased=False), torch.ones(2, dtype=torch.float64), atol=100 * F32_EPS)


def test_unseen_categories_get_the_oov_id():
    n = 200
    colour = np.array(["a"] * n, dtype=object)
    parts = H.split_rows(n, seed=3)
    colour[parts["test"][:5]] = "never_in_train"
    d = H.from_arrays("oov", np.zeros((n, 1)), tasks=["t"], categorical={"colour": colour}, split_seed=3)
    te = d.splits["test"]["categorical"][:, 0]
    assert int((te == 0).sum()) == 5 and d.schema.categorical[0].vocab_size == 2


def test_explicit_splits_per_row_and_by_index():
    n = 30
    split = np.array(["train"] * 20 + ["val"] * 5 + ["test"] * 5)
    d = H.from_arrays("s", np.arange(n, dtype=float), tasks=["t"], dense=np.arange(n)[:, None], split=split)
    assert d.splits["val"]["labels"][:, 0].tolist() == [20.0, 21.0, 22.0, 23.0, 24.0]
    d2 = H.from_arrays("s", np.arange(n, dtype=float), tasks=["t"], dense=np.arange(n)[:, None],
                       split={"train": range(10, 30), "val": [0, 1, 2], "test": range(3, 10)})
    assert d2.splits["val"]["labels"][:, 0].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(MtlbenchError, match="split holds 'dev'; valid: train, val, test"):
        H.from_arrays("s", np.zeros(n), tasks=["t"], dense=np.zeros((n, 1)), split=np.array(["dev"] * n))


@pytest.mark.parametrize("kwargs, message", [
    (dict(tasks=["a"]), r"1 task name\(s\) for 2 label column\(s\)"),
    (dict(tasks=["a", "b"], kinds="ordinal"), r"task 'a' has kind 'ordinal'; valid: binary, regression, multiclass"),
    (dict(tasks=["a", "b"], masks=np.ones((5, 2), bool)), r"masks has shape \[5, 2\]; expected \[40, 2\]"),
    (dict(tasks=["a", "b"], dense={"x": np.zeros(7)}), r"dense column 'x' has shape \[7\]; expected \[40\]"),
    (dict(tasks=["a", "b"], fractions=(0.5, 0.6, 0.1)), r"split fractions must be three non-negative numbers"),
    (dict(tasks=["a", "b"], kinds="binary", dense=np.zeros((40, 1))), r"holds 2 on a labelled row; expected 0 or 1"),
])
def test_from_arrays_bad_input_is_one_line(kwargs, message):
    labels = np.full((40, 2), 2.0)
    kwargs.setdefault("dense", np.zeros((40, 1)))
    with pytest.raises(MtlbenchError, match=message) as exc:
        H.from_arrays("bad", labels, **kwargs)
    assert "\n" not in str(exc.value)


# ----------------------------------------------------------------------------------------------- splits

def test_split_rows_is_a_fixed_partition():
    a = H.split_rows(1000, seed=7)
    b = H.split_rows(1000, seed=7)
    assert all(np.array_equal(a[s], b[s]) for s in a)
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(1000))
    assert [len(a[s]) for s in ("train", "val", "test")] == [700, 150, 150]
    assert not np.array_equal(a["val"], H.split_rows(1000, seed=8)["val"])
    sub = H.split_rows(1000, seed=7, max_rows=100)
    assert sum(len(v) for v in sub.values()) == 100 and set(sub["train"]) <= set(H.hash_order(1000, 7)[:100])


@pytest.mark.parametrize("as_text", [False, True])
def test_grouped_split_never_straddles_and_keeps_row_shares(as_text):
    groups = np.repeat(np.arange(300), 4)
    if as_text:
        groups = np.char.add("subject-", groups.astype(str))
    parts = H.split_rows(len(groups), seed=1, groups=groups)
    seen = [set(groups[parts[s]].tolist()) for s in ("train", "val", "test")]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert sum(len(v) for v in parts.values()) == len(groups)
    for s, f in zip(("train", "val", "test"), (0.7, 0.15, 0.15)):
        assert abs(len(parts[s]) - f * len(groups)) <= 4  # within one group of the share


def test_stratified_split_gives_every_stratum_its_share():
    strata = np.repeat(np.arange(50), 20)
    parts = H.split_rows(len(strata), seed=2, stratify=strata)
    for s, k in (("train", 14), ("val", 3), ("test", 3)):
        assert np.bincount(strata[parts[s]], minlength=50).tolist() == [k] * 50


# ----------------------------------------------------------------------------------------------- validation

def _data(**override) -> MultiTaskData:
    n = 8
    t = {"categorical": torch.zeros(n, 1, dtype=torch.long), "dense": torch.zeros(n, 2),
         "labels": torch.zeros(n, 2), "masks": torch.ones(n, 2, dtype=torch.bool)}
    t.update(override)
    schema = FeatureSchema(categorical=(CategoricalField("f", 3),), dense=("d0", "d1"))
    tasks = (TaskSpec("a", "binary", ("auc",)), TaskSpec("m", "multiclass", ("accuracy",), n_classes=3))
    return MultiTaskData("v", "1", schema, tasks, {s: Split(dict(t)) for s in ("train", "val", "test")})


@pytest.mark.parametrize("override, message", [
    (dict(labels=torch.zeros(8, 2, dtype=torch.bool)),
     r"train tensor 'labels' is bool \[8, 2\]; expected labels float32 \[8, 2\] \(labels are float32 even for binary"),
    (dict(masks=torch.ones(8, 2)), r"train tensor 'masks' is float32 \[8, 2\]; expected label masks bool \[8, 2\]"),
    (dict(categorical=torch.zeros(8, 1, dtype=torch.int32)), r"'categorical' is int32 \[8, 1\]; expected .* int64"),
    (dict(categorical=torch.full((8, 1), 3)), r"field 'f'\) holds id 3; expected ids in \[0, 3\)"),
    (dict(dense=torch.zeros(8, 3)), r"'dense' is float32 \[8, 3\]; expected dense features float32 \[8, 2\]"),
    (dict(dense=torch.tensor([[0.0, math.nan]] * 8)), r"'dense' column 1 \('d1'\) holds NaN or infinite values"),
    (dict(labels=torch.tensor([[2.0, 0.0]] * 8)), r"task 'a', binary\) holds 2 on a labelled row; expected 0 or 1"),
    (dict(labels=torch.tensor([[0.0, 3.0]] * 8)), r"task 'm', multiclass\) holds 3 .*expected class indices 0..2"),
    (dict(labels=torch.tensor([[math.nan, 0.0]] * 8), masks=torch.tensor([[False, True]] * 8)),
     r"task 'a'\) holds NaN or infinite values; expected finite labels \(mark a missing label with masks=False"),
    (dict(masks=torch.tensor([[False, True]] * 8)), r"task\(s\) a have no labelled row in the train split"),
])
def test_validation_names_the_tensor_and_what_was_expected(override, message):
    with pytest.raises(MtlbenchError, match=message) as exc:
        _data(**override).validate()
    assert "\n" not in str(exc.value)


def test_validation_checks_task_specs():
    good = _data()
    good.validate()
    bad = _data()
    bad.tasks = (TaskSpec("a", "binary", ("rmse",)), bad.tasks[1])
    with pytest.raises(MtlbenchError, match="metric 'rmse' of task 'a' does not suit a binary task"):
        bad.validate()
    bad.tasks = (TaskSpec("a", "binary", ("no_such_metric",)), bad.tasks[1])
    with pytest.raises(MtlbenchError, match="no_such_metric"):
        bad.validate()


# ----------------------------------------------------------------------------------------------- regression

def test_standardised_labels_train_in_z_units_and_report_original_units():
    raw = toy(seed=1)
    std = toy(seed=1, standardise_labels=True)
    mean, sd = std.tasks[0].label_scale
    tr_raw, tr = raw.splits["train"], std.splits["train"]
    m = tr["masks"][:, 0]
    y = tr_raw["labels"][:, 0][m].double()
    assert mean == pytest.approx(float(y.mean()), rel=1e-12)
    assert sd == pytest.approx(float(y.std(unbiased=False)), rel=1e-12)
    z = tr["labels"][:, 0][m].double()
    assert abs(float(z.mean())) < 10 * F32_EPS and abs(float(z.std(unbiased=False)) - 1) < 10 * F32_EPS
    assert torch.equal(tr["labels"][:, 1:], tr_raw["labels"][:, 1:])  # other tasks untouched
    # a prediction in z units is scored as the same prediction in original units
    te_raw, te = raw.splits["test"], std.splits["test"]
    pred_raw = te_raw["labels"][:, 0] + 1.5
    pred_z = ((pred_raw.double() - mean) / sd).float()
    got = evaluate_task(("rmse", "r2"), te["labels"][:, 0], pred_z, te["masks"][:, 0], std.tasks[0].label_scale)
    want = evaluate_task(("rmse", "r2"), te_raw["labels"][:, 0], pred_raw, te_raw["masks"][:, 0])
    # float32 labels of magnitude ~40 round-trip through z units: error ~ a few float32 ulps of 40
    assert got["rmse"] == pytest.approx(want["rmse"], abs=64 * F32_EPS * 40)
    assert got["rmse"] == pytest.approx(1.5, abs=64 * F32_EPS * 40)
    assert std.describe()["tasks"][0]["label_scale"] == {"mean": mean, "std": sd}


def test_r2_and_explained_variance():
    y = torch.tensor([1.0, 2.0, 4.0, 7.0])
    assert r2(y, y) == 1.0 and explained_variance(y, y) == 1.0
    assert r2(y, torch.full_like(y, float(y.mean()))) == pytest.approx(0.0, abs=1e-15)
    shifted = y + 3.0  # a constant offset: explained variance ignores it, R² does not
    assert explained_variance(y, shifted) == pytest.approx(1.0, abs=1e-15)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    assert r2(y, shifted) == pytest.approx(1.0 - 9.0 * 4 / ss_tot, rel=1e-12)
    assert math.isnan(r2(torch.ones(3), torch.zeros(3))) and math.isnan(explained_variance(torch.ones(3), y[:3]))
    assert math.isnan(r2(torch.zeros(0), torch.zeros(0)))
    assert metric("r2").direction == "max" and metric("explained_variance").kinds == ("regression",)


def test_metric_is_public():
    assert mtlbench.Metric is type(metric("rmse"))


# ----------------------------------------------------------------------------------------------- real data

@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MTLBENCH_OFFLINE", "1")
    return tmp_path


def tox21(data_dir) -> MultiTaskData:
    t = H.read_csv("tox21", H.data_file("tox21", TOX21, data_dir, sha256=TOX21_SHA))
    smiles = t.pop("smiles")
    t.pop("mol_id")
    atoms = {a: np.char.count(smiles.astype(str), a).astype(float) for a in ("C", "N", "O", "S", "Cl", "=", "(")}
    return H.from_arrays("tox21", t, kinds="binary", dense={"length": np.char.str_len(smiles), **atoms},
                         split_seed=0)


def test_real_multilabel_file_with_missing_labels(cache):
    if not (DATA / TOX21).is_file():
        pytest.skip(f"no {TOX21} under {DATA}")
    d = tox21(DATA)
    assert len(d.tasks) == 12 and sum(len(s) for s in d.splits.values()) == 8014
    labelled = d.splits["train"]["masks"].double().mean(0)
    assert bool((labelled > 0.7).all()) and bool((labelled < 0.95).all())
    # a subset of tasks drops the rows labelled for none of them, and says how many
    one = d.select_tasks(["SR-p53"])
    dropped = one.info["rows_without_labels_dropped"]
    for s in ("train", "val", "test"):
        m = d.splits[s]["masks"][:, d.task_names.index("SR-p53")]
        assert dropped[s] == int((~m).sum()) and len(one.splits[s]) == int(m.sum())
        assert bool(one.splits[s]["masks"].all())
    assert "rows_without_labels_dropped" not in d.select_tasks(list(d.task_names)[::-1]).info


def test_data_file_refuses_a_wrong_hash_and_names_a_missing_file(cache):
    f = cache / "d" / "x" / "t.csv"
    f.parent.mkdir(parents=True)
    f.write_text("a,b\n1,2\n")
    with pytest.raises(MtlbenchError, match=r"hash mismatch for .*t.csv: sha256 [0-9a-f]{64}, expected 00"):
        H.data_file("mine", "x/t.csv", cache / "d", sha256="00" * 32)
    cols = H.read_csv("mine", H.data_file("mine", "x/t.csv", cache / "d"))
    assert cols["a"].tolist() == [1] and cols["b"].tolist() == [2]
    with pytest.raises(MtlbenchError, match=r"mine: missing file\(s\) u.csv \(put it at .*x/u.csv\); see the wiki"):
        H.data_file("mine", "x/u.csv", cache / "d", how_to_get="see the wiki")


# ----------------------------------------------------------------------------------------------- via the CLI

SHRINK_PLUGIN = '''
from dataclasses import dataclass
import numpy as np
from mtlbench import DatasetAdapter, register_dataset
from mtlbench.tasks.helpers import from_arrays

LABELS = tuple(f"label{i}" for i in range(14))

@register_dataset("toy_multilabel")
class ToyMultiLabel(DatasetAdapter):
    """14 binary labels; -D n_labels=k keeps the first k."""

    version = "1"
    task_aliases = {"firsttwo": ("label0", "label1")}
    default_training = {"epochs": 1, "batch_size": 64, "lr": 1e-2, "embed_dim": 24}

    @dataclass
    class Options:
        n_labels: int = 14

    @classmethod
    def task_names(cls, options=None):
        return LABELS[:(options or cls.Options()).n_labels]

    def load(self, seed):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(400, 5))
        y = (x @ rng.normal(size=(5, 14)) + rng.normal(size=(400, 14)) > 0).astype(float)
        y[:200, 1] = np.nan  # label1 is missing on the first half of the rows
        y[:100, 0] = np.nan
        keep = self.task_names(self.options)
        return from_arrays("toy_multilabel", y[:, :len(keep)], tasks=keep, kinds="binary", dense=x)
'''


@pytest.fixture(scope="module")
def shrink_plugin(tmp_path_factory):
    p = tmp_path_factory.mktemp("plugin") / "toy_multilabel.py"
    p.write_text(SHRINK_PLUGIN)
    return p


def test_an_option_that_shrinks_the_task_list(shrink_plugin, tmp_path, capsys):
    results = tmp_path / "r"
    assert main(["run", "--plugin", str(shrink_plugin), "--dataset", "toy_multilabel", "-D", "n_labels=6",
                 "--results-dir", str(results), "--quiet", "--device", "cpu"]) == 0
    r = json.loads(next(results.glob("*.json")).read_text())
    assert r["spec"]["tasks"] == [f"label{i}" for i in range(6)]
    assert r["spec"]["embed_dim"] == 24  # the dataset's suggestion
    assert sorted(r["metrics"]["test"]) == sorted(r["spec"]["tasks"])
    with pytest.raises(MtlbenchError, match="label9"):
        build_spec(dataset="toy_multilabel", tasks=["label9"], arch="shared_bottom", optimizer="ew",
                   dataset_options={"n_labels": 6})


def test_task_subset_drops_unlabelled_rows_and_logs_it(shrink_plugin, tmp_path, capsys):
    results = tmp_path / "r"
    assert main(["run", "--plugin", str(shrink_plugin), "--dataset", "toy_multilabel", "--tasks", "firsttwo",
                 "--results-dir", str(results), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    r = json.loads(next(results.glob("*.json")).read_text())
    dropped = r["dataset"]["rows_without_labels_dropped"]
    assert sum(dropped.values()) == 100  # rows 0..99 have neither label0 nor label1
    assert "dropped rows with no label for any selected task: " + ", ".join(
        f"{s} {n:,}" for s, n in dropped.items()) in err


def test_list_verbose_shows_task_sets_and_suggested_training(shrink_plugin, capsys):
    assert main(["list", "-v", "--plugin", str(shrink_plugin)]) == 0
    out = capsys.readouterr().out
    assert "task set firsttwo = label0,label1" in out
    assert "training defaults: epochs 1, batch_size 64, lr 0.01, embed_dim 24" in out
    assert "task set group1 = income,marital" in out  # census's paper groups
    assert "embed_dim 100" in out  # mmoe_synthetic's dense-only input suggestion


def test_the_suggested_embed_dim_is_a_default_not_an_override():
    assert build_spec(dataset="mmoe_synthetic", tasks=None, arch="mmoe", optimizer="ew").embed_dim == 100
    assert build_spec(dataset="mmoe_synthetic", tasks=None, arch="mmoe", optimizer="ew",
                      embed_dim=8).embed_dim == 8
    assert build_spec(dataset="ecommerce", tasks=None, arch="mmoe", optimizer="ew").embed_dim == 16


def test_task_names_overrides_without_options_still_work():
    from mtlbench import DatasetAdapter
    from mtlbench.data import offered_task_sets, offered_tasks

    class Old(DatasetAdapter):  # written before task_names took the options
        task_aliases = {"both": ("a", "b")}

        @classmethod
        def task_names(cls):
            return ("a", "b")

    assert offered_tasks(Old, object()) == ("a", "b")
    assert offered_task_sets(Old, None) == {"both": ("a", "b")}


def test_flipped_bytes_of_the_same_size_and_mtime_fail_the_pinned_hash_in_a_new_process(tmp_path):
    """Issue 15: a hash memo keyed on (size, mtime) let a corrupted file pass; each process hashes the content."""
    import hashlib
    import os
    import subprocess
    import sys

    f = tmp_path / "data.bin"
    f.write_bytes(b"abcdefgh" * 1000)
    pinned = hashlib.sha256(f.read_bytes()).hexdigest()
    check = ("import sys; from pathlib import Path; from mtlbench.tasks import helpers as h\n"
             "try:\n"
             f"    h.verify('demo', Path({str(f)!r}), h.SourceFile('data.bin', sha256={pinned!r})); print('ok')\n"
             "except h.HashMismatch as e: print('refused')\n")
    env = {**os.environ, "MTLBENCH_CACHE_DIR": str(tmp_path / "cache")}
    run = lambda: subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env).stdout.strip()
    assert run() == "ok"
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[10] ^= 0xFF
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: metadata cannot tell
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert run() == "refused"
