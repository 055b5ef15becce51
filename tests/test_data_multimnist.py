"""MultiMNIST from the real MNIST test file: source digits split before pairing, labels match the digits, the dense
variant, and bad files (corrupt, truncated, wrong hash) as one line."""
from __future__ import annotations

import gzip
import shutil

import pytest
import torch

from mtlbench import registry
from mtlbench.errors import MtlbenchError
from mtlbench.registry import build_options
from mtlbench.tasks import multimnist
from mtlbench.tasks.helpers import hash_order

import os
from pathlib import Path

from conftest import SHARED_DATA as _SHARED

SHARED_DATA = _SHARED if _SHARED.is_dir() else Path(os.environ.get("MTLBENCH_DATA_DIR", str(_SHARED)))
needs_mnist = pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="MNIST files not in ../shared/data")


def _load(data_dir=None, seed=0, **o):
    e = registry.get("dataset", "multimnist")
    return e.obj(build_options(e.options_class, e.resolve_options({"train": 64, "val": 16, "test": 16, **o})),
                 data_dir=data_dir).load(seed)


@needs_mnist
def test_source_digits_disjoint_and_labels_right(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(tmp_path))
    order = hash_order(10000, 0)
    parts = [set(order[:7000]), set(order[7000:8000]), set(order[8000:])]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    d = _load(str(SHARED_DATA), dense=True)
    assert d.task_names == ("left", "right", "seg", "foreground")
    tr = d.splits["train"]
    assert tr["images"].shape == (64, 1, 36, 36) and tr["images"].dtype == torch.uint8
    # the seg map's classes are the two digit labels (and background 10)
    for k in range(8):
        present = set(torch.unique(tr["seg"][k]).tolist()) - {10}
        assert present <= {int(tr["labels"][k, 0]), int(tr["labels"][k, 1])} and present
    fg = tr["foreground"][:, 0].bool()
    assert bool(((tr["seg"] != 10) == fg).all())
    plain = _load(str(SHARED_DATA))
    assert plain.task_names == ("left", "right")
    assert d.describe()["source_digits"] == {"train": 7000, "val": 1000, "test": 2000}


@needs_mnist
def test_truncated_and_corrupt_files_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(tmp_path / "cache"))
    src = SHARED_DATA / "mnist" / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(src.read_bytes())
    bad = tmp_path / "t.gz"
    bad.write_bytes(gzip.compress(raw[:-784]))  # one image short
    with pytest.raises(MtlbenchError, match=r"holds 7839216 data bytes, its header says 7840000 .*truncated") as e:
        multimnist.read_idx(bad, 2051, 3)
    assert "\n" not in str(e.value)
    bad.write_bytes(src.read_bytes()[:5000])  # a cut gzip stream
    with pytest.raises(MtlbenchError, match=r"is not a readable gzip file"):
        multimnist.read_idx(bad, 2051, 3)
    with pytest.raises(MtlbenchError, match=r"magic number 2051, expected 2049"):
        multimnist.read_idx(src, 2049, 1)


@needs_mnist
def test_hash_mismatch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MTLBENCH_OFFLINE", "1")
    d = tmp_path / "data" / "mnist"
    d.mkdir(parents=True)
    shutil.copy(SHARED_DATA / "mnist" / "t10k-labels-idx1-ubyte.gz", d)
    raw = bytearray(gzip.decompress((SHARED_DATA / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes()))
    raw[-1] ^= 0xFF  # one pixel changed: the header and size are fine, the content is not MNIST's
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(MtlbenchError, match=r"hash mismatch for .*t10k-images-idx3-ubyte.gz") as e:
        _load(str(tmp_path / "data"))
    assert "\n" not in str(e.value)


def test_segmentation_label_out_of_range_is_one_line():
    from mtlbench.data import FeatureSchema, ImageSpec, MultiTaskData, Split, TaskSpec

    seg = torch.zeros(4, 3, 3, dtype=torch.uint8)
    seg[2, 1, 1] = 13
    split = Split({"images": torch.zeros(4, 1, 3, 3, dtype=torch.uint8), "seg": seg, "labels": torch.zeros(4, 1),
                   "masks": torch.ones(4, 1, dtype=torch.bool)})
    task = TaskSpec("seg", "segmentation", ("miou",), n_classes=13, target="seg", ignore_index=255)
    with pytest.raises(MtlbenchError, match=r"dataset 'x': task 'seg' has class label 13 in the train split, outside "
                                            r"0..12 and not the ignore value 255"):
        MultiTaskData("x", "1", FeatureSchema(image=ImageSpec(1, 3, 3)), (task,),
                      {"train": split, "val": split, "test": split})
