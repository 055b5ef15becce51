"""Every registered dataset against the data contract (issue 14: parametrized over the registry, as timm and mteb
do, so a new dataset is checked without editing a list).

Declared, without loading anything and without a network: the adapter's name, version, description, modality (some
registered arch reads it), task names and task sets, image shape and dense tasks; every option's declared range
holds its default, and a value outside it is one line naming the option, the value and the range; a numeric option
that refuses a value declares its range (so `mtlbench list -v` shows it and the refusal names it).

Loaded, for every dataset that can be built here (the embedded generators, and adapters whose files are in the data
directory, ``$MTLBENCH_DATA_DIR``; the others are skipped with the adapter's own line saying what is missing:
downloads are switched off and the cache is a fresh temporary folder): at small sizes, the data passes
``validate()``, carries its registered name and version, its tasks are declared ones with a registered kind and
metrics whose direction is registered and that suit the kind, its labels have the shape, dtype and values of each
task's kind (per-pixel maps of dense tasks included), train/val/test are non-empty with labelled rows of every task
and do not share rows, and the same seed gives the same tensors (a second build in another cache folder)."""
from __future__ import annotations

import dataclasses
import typing
from collections import Counter
from functools import lru_cache

import pytest
import torch

from mtlbench import registry
from mtlbench.data import SPLITS, DatasetAdapter, offered_task_sets, offered_tasks
from mtlbench.errors import MtlbenchError
from mtlbench.registry import build_options
from mtlbench.vision.kinds import DENSE_KINDS, DENSE_METRICS

from conftest import check_range_refused

DATASETS = registry.names("dataset")
KINDS = ("binary", "regression", "multiclass") + DENSE_KINDS

# Small options per dataset: few rows or images, still leaving every split and every task labelled rows (the
# smallest sizes the options allow would leave some split empty: adult with max_rows=2, ecommerce's cvr on clicks).
# Not a list of datasets to test: every registered dataset is tested, one not named here at its defaults.
SMALL = {
    "adult": {"max_rows": 1000},
    "aliccp": {"max_rows": 1000},
    "aliexpress": {"max_rows": 1000},
    "celeba": {"resolution": 8, "max_images": 20},
    "census": {"max_rows": 1000},
    "ecommerce": {"n_rows": 1000, "n_users": 50, "n_items": 40, "n_categories": 5, "n_brands": 8, "max_seq_len": 4},
    "mmoe_synthetic": {"n_rows": 240, "input_dim": 4, "n_sin": 2},
    "multimnist": {"train": 8, "val": 4, "test": 4, "size": 32, "dense": True},
    "nyuv2": {"val_images": 1},
    "scenes": {"resolution": 8, "train": 4, "val": 2, "test": 2},
    "text": {"max_train": 16, "max_val": 4, "max_test": 4, "n_adapt": 4, "max_len": 16},
    "text8": {"max_train": 16, "max_val": 4, "max_test": 4, "n_adapt": 4, "max_len": 16},
}


def _options(entry, given=None):
    return build_options(entry.options_class, entry.resolve_options(dict(given or {})))


def _fields(entry):
    oc = entry.options_class
    return [] if oc is None else list(zip(dataclasses.fields(oc), typing.get_type_hints(oc).values()))


def _numeric(tp) -> bool:
    """int or float (bool is not), alone, optional, or as the elements of a tuple."""
    args = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
    if typing.get_origin(tp) in (typing.Union, tuple) or type(tp).__name__ == "UnionType":
        return bool(args) and all(_numeric(a) for a in args)
    return tp in (int, float)


# --------------------------------------------------------------------------------------------------- declared

def test_small_options_name_registered_datasets_with_valid_values():
    for name, given in SMALL.items():
        assert name in DATASETS, f"SMALL names '{name}', which is not registered"
        registry.get("dataset", name).resolve_options(given)


@pytest.mark.parametrize("name", DATASETS)
def test_declared_contract(name):
    e = registry.get("dataset", name)
    cls = e.obj
    assert isinstance(cls, type) and issubclass(cls, DatasetAdapter), f"{name}: {cls!r} is not a DatasetAdapter"
    assert e.name == name == cls.registered_name
    assert e.description and "\n" not in e.description
    assert isinstance(cls.version, str) and cls.version.strip(), f"{name}: no version (it keys caches and records)"
    readers = [a for a in registry.names("arch") if cls.modality in registry.variants(a)]
    assert readers, f"{name}: no registered arch reads {cls.modality} data"
    for given in ({}, SMALL.get(name, {})):
        opts = _options(e, given)
        tasks = offered_tasks(cls, opts)
        assert tasks and all(isinstance(t, str) and t for t in tasks), f"{name}: declares no tasks"
        assert len(set(tasks)) == len(tasks), f"{name}: a task is declared twice: {tasks}"
        for alias, members in offered_task_sets(cls, opts).items():
            assert alias not in tasks and members and set(members) <= set(tasks), (alias, members)
        default = getattr(cls, "default_tasks", None)
        if callable(default):
            assert default(opts) and set(default(opts)) <= set(tasks)
        assert set(cls.dense_tasks(opts)) <= set(tasks)
        shape = cls.image_shape(opts)
        if cls.modality == "image":
            assert shape is not None and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)


@pytest.mark.parametrize("name", DATASETS)
def test_options_declare_their_ranges(name):
    """Declared ranges hold the defaults and refuse what is outside in one line (the helper test_registry uses);
    a numeric option without a declared range accepts every probe, else it must declare the range it enforces;
    a choice option refuses an unknown value in one line naming it and the choices."""
    e = registry.get("dataset", name)
    for f, tp in _fields(e):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rng = f.metadata.get("range")
        if rng is not None:
            values = default if isinstance(default, (list, tuple)) else [default]
            assert all(v is None or rng.contains(v) for v in values), f"{name}: default {f.name}={default} " \
                                                                       f"is not {rng.text()}"
            check_range_refused(e, f)
        elif _numeric(tp):
            for probe in (-1, 0, 10 ** 9):
                value = (probe,) if isinstance(default, tuple) else probe
                try:
                    e.resolve_options({f.name: value})
                except MtlbenchError as exc:
                    pytest.fail(f"dataset '{name}' option '{f.name}' refuses {probe} ({exc}) but declares no range: "
                                f"declare it with option_field(..., minimum=..., maximum=...)")
        elif typing.get_origin(tp) is typing.Literal:
            with pytest.raises(MtlbenchError) as info:
                e.resolve_options({f.name: "no_such_choice"})
            msg = str(info.value)
            assert "\n" not in msg and f.name in msg and "no_such_choice" in msg
            assert all(str(c) in msg for c in typing.get_args(tp)), msg


# ----------------------------------------------------------------------------------------------------- loaded

@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """No downloads (adapters and Hugging Face), and caches in fresh folders: what is built is built here."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MTLBENCH_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(var, "1")
        mp.setenv("MTLBENCH_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield mp


def _build(name: str):
    """The dataset at its small options and seed 0; a skip naming what is missing where it cannot be built here."""
    e = registry.get("dataset", name)
    try:
        return e.obj(_options(e, SMALL.get(name))).load(0)
    except MtlbenchError as exc:
        if "missing" in str(exc):
            pytest.skip(f"{name} cannot be built offline here (downloads are off in this test): {exc}")
        raise
    except ImportError as exc:
        pytest.skip(f"{name} needs an optional extra that is not installed: {exc}")


@lru_cache(maxsize=None)
def _loaded(name: str):
    return _build(name)


@pytest.fixture
def data(request, offline):
    return _loaded(request.param)


def _splits(d):
    """SPLITS first, then any extra split the adapter adds (text: the unlabelled adaptation rows)."""
    return list(SPLITS) + sorted(s for s in d.splits if s not in SPLITS)


@pytest.mark.parametrize("data", DATASETS, indirect=True)
def test_loaded_data_keeps_the_contract(data):
    d = data
    name = d.name
    e = registry.get("dataset", name)
    assert d.version == e.obj.version
    d.validate()
    opts = _options(e, SMALL.get(name))
    assert set(d.task_names) <= set(offered_tasks(e.obj, opts)), "a loaded task is not declared"
    default = getattr(e.obj, "default_tasks", None)
    assert set(default(opts) if callable(default) else offered_tasks(e.obj, opts)) <= set(d.task_names)
    assert {t.name for t in d.tasks if t.dense} == set(e.obj.dense_tasks(opts)) & set(d.task_names)
    for t in d.tasks:
        assert t.kind in KINDS, (t.name, t.kind)
        assert t.metrics, f"task '{t.name}' declares no metric"
        for m in t.metrics:
            metric = registry.get("metric", m).obj
            assert metric.direction in ("max", "min"), (m, metric.direction)
            assert t.kind in metric.kinds, f"metric '{m}' does not suit {t.kind} task '{t.name}'"
        if t.dense:
            assert set(t.metrics) <= set(DENSE_METRICS[t.kind])
        if t.kind in ("multiclass", "segmentation"):
            assert t.n_classes >= 2
    if any(t.dense for t in d.tasks) or e.obj.modality == "image":
        assert d.schema.image is not None and d.schema.image.shape == e.obj.image_shape(opts)
    for s in SPLITS:
        sp = d.splits[s]
        n = len(sp)
        assert n > 0, f"the {s} split is empty"
        assert sp["labels"].dtype == torch.float32 and sp["labels"].shape == (n, len(d.tasks))
        assert sp["masks"].dtype == torch.bool and sp["masks"].shape == (n, len(d.tasks))
        assert bool(sp["masks"].any(0).all()), f"{s}: a task has no labelled row: {sp['masks'].any(0).tolist()}"
        for j, t in enumerate(d.tasks):
            _check_labels(t, sp, j, d.schema.image, s)


def _check_labels(t, sp, j, image, split):
    where = f"{split} split, task '{t.name}' ({t.kind})"
    rows = sp["masks"][:, j]
    y = sp["labels"][:, j][rows]
    if t.kind == "binary":
        assert bool(((y == 0) | (y == 1)).all()), where
    elif t.kind == "multiclass":
        assert bool(((y == y.round()) & (y >= 0) & (y < t.n_classes)).all()), where
    elif t.kind == "regression":
        assert bool(torch.isfinite(y).all()), where
    if not t.dense:
        return
    n, (h, w) = len(sp), (image.height, image.width)
    target = sp[t.target]
    valid = torch.ones(n, h, w, dtype=torch.bool)
    if t.valid:
        v = sp[t.valid]
        assert v.shape in ((n, h, w), (n, 1, h, w)) and v.dtype in (torch.bool, torch.uint8), (where, v.shape)
        valid = v.reshape(n, h, w).bool()
    valid &= rows.reshape(n, 1, 1)
    if t.kind == "segmentation":
        assert target.shape == (n, h, w) and not target.is_floating_point(), (where, target.shape, target.dtype)
        labelled = target != t.ignore_index
        assert bool(((target[labelled] >= 0) & (target[labelled] < t.n_classes)).all()), where
        assert bool((labelled & valid).any()), f"{where}: no labelled pixel"
        return
    channels = {"depth": 1, "normals": 3, "binary_map": 1}[t.kind]
    assert target.shape == (n, channels, h, w), (where, target.shape)
    assert bool(valid.any()), f"{where}: no valid pixel"
    px = target.float().permute(0, 2, 3, 1)[valid]  # [valid pixels, channels]
    assert bool(torch.isfinite(px).all()), where
    if t.kind == "depth":
        assert target.is_floating_point() and bool((px > 0).all()), f"{where}: depth <= 0 on a valid pixel"
    elif t.kind == "normals":
        assert target.is_floating_point()
        torch.testing.assert_close(px.norm(dim=1), torch.ones(len(px)), rtol=0, atol=1e-3, msg=where)
    else:
        assert bool(((px == 0) | (px == 1)).all()), f"{where}: a binary map holds a value other than 0 and 1"


def _fingerprints(sp) -> list[bytes]:
    """One bytes key per row: every tensor of the row but its labels and masks (the features a model sees)."""
    n = len(sp)
    keys = sorted(k for k in sp.tensors if k not in ("labels", "masks"))
    rows = torch.cat([sp[k].reshape(n, -1).to(torch.float64) for k in keys], 1) if keys else torch.zeros(n, 0)
    return [r.numpy().tobytes() for r in rows]


@pytest.mark.parametrize("data", DATASETS, indirect=True)
def test_splits_do_not_share_rows(data):
    """No split shares rows with another. Real sources hold repeated records (census, adult), so a row's features
    may recur in another split: at most for twice the share of rows whose features recur within a split (+ 1
    row); a leak (a split drawn from another, rows placed twice) shares most rows. Without repeats, none."""
    fps = {s: _fingerprints(data.splits[s]) for s in _splits(data)}
    # the share of a split's rows whose features recur within that split (the largest over the splits)
    repeat = max(sum(c for c in Counter(f).values() if c > 1) / len(f) for f in fps.values())
    for a in fps:
        seen = set(fps[a])
        for b in fps:
            if a >= b:
                continue
            shared = sum(x in seen for x in fps[b])
            allowed = 0 if repeat == 0 else int(2 * repeat * len(fps[b])) + 1
            assert shared <= allowed, (f"{shared} of {len(fps[b])} {b} rows also in {a} (repeats within a split: "
                                       f"{repeat:.1%})")


@pytest.mark.parametrize("data", DATASETS, indirect=True)
def test_same_seed_same_data(data, tmp_path, monkeypatch):
    """A second build from scratch (another cache folder, so nothing is read back) equals the first, tensor by
    tensor."""
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(tmp_path))
    again = _build(data.name)
    assert again.tasks == data.tasks and again.schema == data.schema
    assert set(again.splits) == set(data.splits)
    for s, sp in data.splits.items():
        assert set(sp.tensors) == set(again.splits[s].tensors), s
        for k, v in sp.tensors.items():
            w = again.splits[s][k]
            assert v.dtype == w.dtype and torch.equal(v, w), f"{s} tensor '{k}' differs between two builds"


@pytest.mark.parametrize("name", DATASETS)
def test_bad_option_value_is_one_line_before_loading(name):
    """Through the run spec, as the CLI passes it: a dataset option out of its declared range is refused in one line
    naming the option, the value and the range, before any file is looked for (so also where the data is absent)."""
    from mtlbench.spec import build_spec

    e = registry.get("dataset", name)
    ranged = [f for f, _ in _fields(e) if f.metadata.get("range") is not None]
    if not ranged:
        pytest.skip(f"{name} declares no option range")
    arch = next(a for a in registry.names("arch") if e.obj.modality in registry.variants(a))
    for f in ranged:
        rng = f.metadata["range"]
        bad = rng.minimum - 1 if rng.minimum is not None else rng.maximum + 1
        with pytest.raises(MtlbenchError) as info:
            build_spec(dataset=name, tasks=None, arch=arch, optimizer="ew", device="cpu",
                       dataset_options={f.name: bad})
        msg = str(info.value)
        assert "\n" not in msg and f.name in msg and rng.text() in msg and str(bad) in msg, msg
