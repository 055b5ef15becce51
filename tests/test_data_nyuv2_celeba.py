"""NYUv2 (MTAN/LibMTL layout) and CelebA (official files) adapters on small fixture files written here in the
exact layout: shapes, label conventions, the validation split carved from train, and bad files as one line."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mtlbench import registry
from mtlbench.errors import MtlbenchError
from mtlbench.registry import build_options
from mtlbench.tasks.celeba import ATTRIBUTES


def _load(name, data_dir, **o):
    e = registry.get("dataset", name)
    return e.obj(build_options(e.options_class, e.resolve_options(o)), data_dir=str(data_dir)).load(0)


def write_nyuv2(root, n_train=6, n_test=3, H=16, W=24, seed=0):
    rng = np.random.default_rng(seed)
    for folder, n in (("train", n_train), ("val", n_test)):
        for k in ("image", "label", "depth", "normal"):
            (root / "nyuv2" / folder / k).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            d = root / "nyuv2" / folder
            np.save(d / "image" / f"{i}.npy", rng.random((H, W, 3)).astype(np.float32))
            label = rng.integers(-1, 13, (H, W)).astype(np.float32)
            np.save(d / "label" / f"{i}.npy", label)
            depth = rng.random((H, W, 1)).astype(np.float32) * 5
            depth[0, 0, 0] = 0.0  # one missing measurement
            np.save(d / "depth" / f"{i}.npy", depth)
            nrm = rng.normal(size=(H, W, 3)).astype(np.float32)
            nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True)
            nrm[1, 1] = 0.0
            np.save(d / "normal" / f"{i}.npy", nrm)


def test_nyuv2_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(tmp_path / "cache"))
    write_nyuv2(tmp_path)
    d = _load("nyuv2", tmp_path, val_images=2)
    assert {s: len(sp) for s, sp in d.splits.items()} == {"train": 4, "val": 2, "test": 3}
    tr = d.splits["train"]
    assert tr["images"].shape == (4, 3, 16, 24) and tr["images"].dtype == torch.uint8
    assert set(torch.unique(tr["seg"]).tolist()) <= set(range(13)) | {255} and bool((tr["seg"] == 255).any())
    assert not bool(tr["depth_valid"][:, 0, 0].any()) and bool(tr["depth_valid"][:, 2, 2].all())
    assert not bool(tr["normal_valid"][:, 1, 1].any())
    # the validation images are training images, never test ones
    src = np.stack([np.load(tmp_path / "nyuv2" / "train" / "image" / f"{i}.npy") for i in range(6)])
    as_u8 = np.moveaxis(np.rint(src * 255).astype(np.uint8), -1, 1)
    for img in d.splits["val"]["images"].numpy():
        assert any((img == a).all() for a in as_u8)
    assert d.task_names == ("seg", "depth", "normal")


def test_nyuv2_bad_files(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(MtlbenchError, match=r"nyuv2: missing folder .*nyuv2; download the preprocessed NYUv2"):
        _load("nyuv2", tmp_path)
    write_nyuv2(tmp_path)
    p = tmp_path / "nyuv2" / "train" / "depth" / "3.npy"
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(MtlbenchError, match=r"nyuv2: cannot read .*depth/3.npy .*truncated") as e:
        _load("nyuv2", tmp_path)
    assert "\n" not in str(e.value)


def write_celeba(root, n=7, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    d = root / "celeba" / "img_align_celeba"
    d.mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for nm in names:
        Image.fromarray(rng.integers(0, 255, (22, 18, 3), dtype=np.uint8)).save(d / nm, quality=95)
    attrs = rng.choice([-1, 1], size=(n, 40))
    lines = [str(n), " ".join(ATTRIBUTES)] + [f"{nm} " + " ".join(f"{v:2d}" for v in row)
                                             for nm, row in zip(names, attrs)]
    (root / "celeba" / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    part = [0, 0, 0, 1, 1, 2, 2][:n]
    (root / "celeba" / "list_eval_partition.txt").write_text("".join(f"{nm} {p}\n" for nm, p in zip(names, part)))
    return attrs, part


def pin_fixture(root, monkeypatch):
    """Pin the fixture's list files as if they were the official ones (the official md5s stay tested below)."""
    import hashlib

    from mtlbench.tasks import celeba

    pins = dict(celeba.PINNED_MD5)
    for n in ("list_attr_celeba.txt", "list_eval_partition.txt"):
        pins[n] = hashlib.md5((root / "celeba" / n).read_bytes()).hexdigest()
    monkeypatch.setattr(celeba, "PINNED_MD5", pins)


def test_celeba_official_md5_pins(tmp_path, monkeypatch):
    """The adapter checks the list files against torchvision's md5s of the official files: a fixture (or a
    corrupt copy) is one line naming both hashes."""
    from mtlbench.tasks import celeba

    assert celeba.PINNED_MD5 == {"img_align_celeba.zip": "00d2c5bc6d35e252742224ab0c1e8fcb",
                                 "list_attr_celeba.txt": "75e246fa4810816ffd6ee81facbd244c",
                                 "list_eval_partition.txt": "d32c9cbf5e040fd4025c592c306e6668"}
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(tmp_path / "cache"))
    write_celeba(tmp_path)
    with pytest.raises(MtlbenchError, match=r"celeba: .*list_attr_celeba.txt has md5 [0-9a-f]{32}, the official file "
                                            r"has 75e246fa4810816ffd6ee81facbd244c") as e:
        _load("celeba", tmp_path, resolution=8)
    assert "\n" not in str(e.value)
    pin_fixture(tmp_path, monkeypatch)
    (tmp_path / "celeba" / "img_align_celeba.zip").write_bytes(b"PK not the archive")
    with pytest.raises(MtlbenchError, match=r"img_align_celeba.zip has md5 .* the official file has 00d2c5bc"):
        _load("celeba", tmp_path, resolution=8)


def test_celeba_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(tmp_path / "cache"))
    attrs, part = write_celeba(tmp_path)
    pin_fixture(tmp_path, monkeypatch)
    d = _load("celeba", tmp_path, resolution=8)
    assert {s: len(sp) for s, sp in d.splits.items()} == {"train": 3, "val": 2, "test": 2}
    assert d.splits["train"]["images"].shape == (3, 3, 8, 8)
    assert torch.equal(d.splits["val"]["labels"], torch.from_numpy((attrs[3:5] > 0).astype(np.float32)))
    assert len(d.tasks) == 40 and d.tasks[20].name == "Male"


def test_celeba_bad_files(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(tmp_path / "cache"))
    write_celeba(tmp_path)
    pin_fixture(tmp_path, monkeypatch)
    img = tmp_path / "celeba" / "img_align_celeba" / "000004.jpg"
    img.write_bytes(img.read_bytes()[:60])
    with pytest.raises(MtlbenchError, match=r"celeba: cannot decode .*000004.jpg .*corrupt or truncated") as e:
        _load("celeba", tmp_path, resolution=8)
    assert "\n" not in str(e.value)
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("000001.jpg 7\n")
    pin_fixture(tmp_path, monkeypatch)
    with pytest.raises(MtlbenchError, match=r"list_eval_partition.txt line 1 is not 'image.jpg 0\|1\|2'"):
        _load("celeba", tmp_path, resolution=8)
