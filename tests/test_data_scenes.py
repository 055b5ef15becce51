"""The embedded `scenes` dataset: deterministic bytes, consistent labels, caching; and a tiny end-to-end run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mtlbench import registry
from mtlbench.registry import build_options
from mtlbench.tasks.scenes import render

GEN = """
import sys, torch, hashlib
torch.set_num_threads(int(sys.argv[1]))
from mtlbench.tasks.scenes import render
out = render(6, 16, 3, 3, 70.0, 0.02, torch.Generator().manual_seed(5))
h = hashlib.sha256()
for k in sorted(out):
    h.update(out[k].contiguous().numpy().tobytes())
print(h.hexdigest())
"""


def test_same_seed_same_bytes_on_1_and_2_threads():
    digests = {subprocess.run([sys.executable, "-c", GEN, str(n)], capture_output=True, text=True,
                              check=True).stdout.strip() for n in (1, 2)}
    assert len(digests) == 1


def test_labels_agree_with_each_other():
    out = render(12, 24, 4, 4, 70.0, 0.02, torch.Generator().manual_seed(0))
    valid, seg = out["valid"], out["seg"].long()
    assert out["images"].dtype == torch.uint8 and out["images"].shape == (12, 3, 24, 24)
    assert bool((seg[~valid] == 255).all()) and bool((seg[valid] < 6).all())
    n = out["normal"].permute(0, 2, 3, 1)[valid]
    torch.testing.assert_close(n.norm(dim=-1), torch.ones(n.shape[0]), rtol=0, atol=1e-5)
    # camera frame (x right, y up, z backwards): every visible normal faces its pixel's ray
    half = torch.tan(torch.deg2rad(torch.tensor(35.0)))
    c = (torch.arange(24) + 0.5) / 24 * 2 - 1
    ray = torch.stack([c[None, :].expand(24, 24) * half, -c[:, None].expand(24, 24) * half, -torch.ones(24, 24)], -1)
    facing = (out["normal"].permute(0, 2, 3, 1) * ray).sum(-1)[valid]
    assert bool((facing < 1e-5).all())
    assert bool((out["depth"][:, 0][valid] > 0).all())
    fg = out["foreground"][:, 0].bool()
    assert bool((fg == ((seg >= 2) & valid)).all())
    # a boundary pixel has a 4-neighbour of another class
    s = seg
    diff = torch.zeros_like(fg)
    diff[:, :, 1:] |= s[:, :, 1:] != s[:, :, :-1]
    diff[:, :, :-1] |= s[:, :, 1:] != s[:, :, :-1]
    diff[:, 1:] |= s[:, 1:] != s[:, :-1]
    diff[:, :-1] |= s[:, 1:] != s[:, :-1]
    assert bool((out["boundary"][:, 0].bool() == diff).all())
    # floor normals point up: in the world the floor is y = 0; several classes occur
    assert len(torch.unique(seg[valid])) >= 4


def test_adapter_caches_and_is_seeded(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLBENCH_CACHE_DIR", str(tmp_path))
    e = registry.get("dataset", "scenes")
    opts = build_options(e.options_class, e.resolve_options({"resolution": 16, "train": 4, "val": 2, "test": 2}))
    a = e.obj(opts).load(3)
    assert list((tmp_path / "tensors").glob("scenes-*.pt"))
    b = e.obj(opts).load(3)
    c = e.obj(opts).load(4)
    assert torch.equal(a.splits["train"]["images"], b.splits["train"]["images"])
    assert not torch.equal(a.splits["train"]["images"], c.splits["train"]["images"])
    assert a.schema.image.shape == (3, 16, 16)
    assert [t.kind for t in a.tasks] == ["segmentation", "depth", "normals", "binary_map", "binary_map"]


def test_end_to_end_tiny_run(tmp_path):
    env = dict(os.environ, MTLBENCH_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "mtlbench.cli", "run", "--dataset", "scenes", "--arch",
                        "shared_bottom", "--tasks", "seg,depth", "--epochs", "2", "--batch-size", "8", "-D",
                        "resolution=16", "-D", "train=24", "-D", "val=8", "-D", "test=8", "-A", "depth=2",
                        "--results-dir", str(tmp_path / "runs"), "--device", "cpu"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    rec = json.loads(next((tmp_path / "runs").glob("*.json")).read_text())
    assert rec["status"] == "ok"
    assert rec["flops"]["macs"] > 0 and set(rec["flops"]["task_macs"]) == {"seg", "depth"}
    assert set(rec["metrics"]["test"]["seg"]) == {"miou", "pixel_acc"}
    assert 0.0 <= rec["metrics"]["test"]["seg"]["miou"] <= 1.0
    assert rec["arch_info"]["feature_layouts"][0]["channel_axis"] == 1
