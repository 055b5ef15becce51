"""``multimnist``: two MNIST digits overlaid in one image (Sener & Koltun, NeurIPS 2018, after Sabour et al. 2017),
built from the real MNIST test set (10,000 digits).

Source digits are split BEFORE pairing, so no digit image appears in two splits: a fixed hash permutation
(``split_seed``, independent of the run seed and of any library's random stream) puts 7,000 digits in train,
1,000 in validation (carved from the 8,000 training digits: model selection never sees test) and 2,000 in test.
Each example draws two digits of its split (with replacement) and places the left one at the top-left of a
36x36 canvas and the right one at the bottom-right, each shifted by up to 4 pixels in each direction (as the MGDA
paper describes), and overlays them by the pixel-wise maximum; the paper then resizes to 28x28, which we skip
(``size`` 36). Tasks ``left`` and ``right``: 10-way digit classification. With ``dense=true``, also ``seg``:
per-pixel digit class (0-9 from the digit that is brighter at that pixel, 10 background where both are below
``threshold``) and ``foreground`` (either digit above ``threshold``).

Files: ``mnist/t10k-images-idx3-ubyte.gz`` and ``mnist/t10k-labels-idx1-ubyte.gz`` under the data directory, or
downloaded from the PyTorch mirror of the MNIST files and accepted when their decompressed content has the
pinned sha256 (the data directory's copies are re-compressed, the content is identical). A file with another
hash, a truncated file or a wrong header is refused in one line.
"""
from __future__ import annotations

import gzip
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mtlbench import (DatasetAdapter, FeatureSchema, MtlbenchError, MultiTaskData, Split, TaskSpec, option_field,
                      register_dataset)
from mtlbench.data import ImageSpec
from mtlbench.tasks.helpers import SourceFile, cached_tensors, hash_order, locate, resolve_data_dir, source_info

MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
FILES = (
    SourceFile("mnist/t10k-images-idx3-ubyte.gz",
               sha256="167310007f03058885c7e95e6c0b19c20de5c7fd3031f4cbdadc9014a523d80b",
               content_sha256="0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
               url=MIRROR + "t10k-images-idx3-ubyte.gz"),
    SourceFile("mnist/t10k-labels-idx1-ubyte.gz",
               sha256="fc607395669ec21321ea83e4b82c0544b7e8e63ff5b34337c06bc0a17cc0da3c",
               content_sha256="ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
               url=MIRROR + "t10k-labels-idx1-ubyte.gz"),
)
SOURCE_SPLIT = (7000, 1000, 2000)


def read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    """An idx file (gzip or raw) as uint8 ``[n, *shape]``; a corrupt or truncated file is one line."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise MtlbenchError(f"multimnist: {path} is not a readable gzip file ({exc}); delete it or replace it "
                            f"with the original MNIST file") from exc
    head = 4 + 4 * dims
    if len(raw) < head or int.from_bytes(raw[:4], "big") != magic:
        got = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise MtlbenchError(f"multimnist: {path} has idx magic number {got}, expected {magic} (not an MNIST "
                            f"{'image' if dims == 3 else 'label'} file)")
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    need = head + int(np.prod(shape))
    if len(raw) != need:
        raise MtlbenchError(f"multimnist: {path} holds {len(raw) - head} data bytes, its header says "
                            f"{need - head} ({'x'.join(map(str, shape))}): the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape)


def overlay(digits: torch.Tensor, labels: torch.Tensor, n: int, size: int, threshold: int,
            g: torch.Generator) -> dict[str, torch.Tensor]:
    """``n`` two-digit images from ``digits`` (uint8 ``[m, 28, 28]``) with their labels and dense maps."""
    m = digits.shape[0]
    i, j = torch.randint(0, m, (n,), generator=g), torch.randint(0, m, (n,), generator=g)
    shift = torch.randint(0, 5, (n, 4), generator=g)
    far = size - 28
    offs = [(shift[:, 0], shift[:, 1]), (far - shift[:, 2], far - shift[:, 3])]
    ar = torch.arange(28)
    layers = []
    for idx, (oy, ox) in zip((i, j), offs):
        canvas = torch.zeros(n, size, size, dtype=torch.uint8)
        rows = (oy[:, None, None] + ar[None, :, None]).expand(n, 28, 28)
        cols = (ox[:, None, None] + ar[None, None, :]).expand(n, 28, 28)
        canvas[torch.arange(n)[:, None, None].expand(n, 28, 28), rows, cols] = digits[idx]
        layers.append(canvas)
    left, right = layers
    img = torch.maximum(left, right)
    seg = torch.where(left >= right, labels[i][:, None, None], labels[j][:, None, None])
    fg = img >= threshold
    seg = torch.where(fg, seg, torch.full_like(seg, 10)).to(torch.uint8)
    return {"images": img[:, None], "labels": torch.stack([labels[i], labels[j]], 1).float(),
            "seg": seg, "foreground": fg[:, None].to(torch.uint8)}


@register_dataset("multimnist")
class MultiMNIST(DatasetAdapter):
    """MultiMNIST from the real MNIST test set: left and right digit (+ per-pixel digit class with dense=true)."""

    version = "1"
    modality = "image"
    tasks = ("left", "right", "seg", "foreground")
    default_training = {"epochs": 10, "batch_size": 256, "lr": 1e-3}

    @dataclass
    class Options:
        train: int = option_field(10000, "training pairs (from 7,000 source digits)", minimum=1)
        val: int = option_field(2000, "validation pairs (from 1,000 source digits)", minimum=1)
        test: int = option_field(2000, "test pairs (from 2,000 source digits)", minimum=1)
        size: int = option_field(36, "canvas height and width in pixels", minimum=32)
        dense: bool = False
        threshold: int = option_field(128, "foreground intensity threshold", minimum=1, maximum=255)
        split_seed: int = option_field(0, "seed of the source-digit split", minimum=0)
        data_seed: int | None = option_field(None, "seed of the pairing and shifts (none: the run seed)", minimum=0)

        def __post_init__(self) -> None:
            for name in ("train", "val", "test"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
            if self.size < 32:
                raise ValueError(f"size must be at least 32 (28-pixel digits shifted by up to 4), got {self.size}")
            if not 0 < self.threshold <= 255:
                raise ValueError(f"threshold must be in 1..255, got {self.threshold}")

    @classmethod
    def default_tasks(cls, options) -> tuple[str, ...]:
        return cls.tasks if options is not None and options.dense else ("left", "right")

    @classmethod
    def image_shape(cls, options):
        o = options or cls.Options()
        return (1, o.size, o.size)

    @classmethod
    def dense_tasks(cls, options):
        return ("seg", "foreground") if options is not None and options.dense else ()

    def load(self, seed: int) -> MultiTaskData:
        o = self.options or self.Options()
        found = locate("multimnist", FILES, resolve_data_dir(self.data_dir))
        sources = {f.relpath: found[f.relpath].sha256 for f in FILES}
        data_seed = seed if o.data_seed is None else o.data_seed
        opts = {**asdict(o), "data_seed": data_seed}

        def build():
            images = read_idx(found[FILES[0].relpath].path, 2051, 3)
            labels = read_idx(found[FILES[1].relpath].path, 2049, 1)
            if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
                raise MtlbenchError(f"multimnist: {images.shape[0]} images of {images.shape[1:]} for "
                                    f"{labels.shape[0]} labels; expected matching counts of 28x28 digits")
            order = hash_order(images.shape[0], o.split_seed)
            a, b = SOURCE_SPLIT[0], SOURCE_SPLIT[0] + SOURCE_SPLIT[1]
            parts = {"train": order[:a], "val": order[a:b], "test": order[b:]}
            g = torch.Generator().manual_seed(data_seed)
            splits = {}
            for name, idx in parts.items():
                d = torch.from_numpy(images[np.sort(idx)].copy())
                lab = torch.from_numpy(labels[np.sort(idx)].astype(np.int64))
                t = overlay(d, lab, getattr(o, name), o.size, o.threshold, g)
                n = t["images"].shape[0]
                t["labels"] = torch.cat([t["labels"], torch.zeros(n, 2)], 1)
                t["masks"] = torch.ones(n, 4, dtype=torch.bool)
                splits[name] = t
            return {"format": "1", "splits": splits,
                    "source_digits": {k: len(v) for k, v in parts.items()}}

        payload, _ = cached_tensors("multimnist", self.version, opts, sources, build)
        tasks = (TaskSpec("left", "multiclass", ("accuracy", "logloss"), n_classes=10, description="top-left digit"),
                 TaskSpec("right", "multiclass", ("accuracy", "logloss"), n_classes=10,
                          description="bottom-right digit"),
                 TaskSpec("seg", "segmentation", ("miou", "pixel_acc"), n_classes=11, target="seg",
                          ignore_index=255, description="per-pixel digit class, 10 = background"),
                 TaskSpec("foreground", "binary_map", ("iou", "best_f"), target="foreground", pos_weight=0.5,
                          description="digit pixels"))
        schema = FeatureSchema(extras=("images", "seg", "foreground"), image=ImageSpec(1, o.size, o.size))
        data = MultiTaskData("multimnist", self.version, schema, tasks,
                             {s: Split(dict(t)) for s, t in payload["splits"].items()},
                             {"data_seed": data_seed, "source_digits": payload["source_digits"],
                              "files": source_info(FILES, found)})
        return data if o.dense else data.select_tasks(("left", "right"))
