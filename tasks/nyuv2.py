"""``nyuv2``: NYU Depth v2 in the preprocessed layout MTAN and LibMTL use (Liu et al., CVPR 2019; 795 train / 654
test images at 288x384, 13-class segmentation, depth, surface normals).

Layout under the data directory (as MTAN's download unpacks; its test split is the folder ``val``)::

    nyuv2/train/image/0.npy ... (float [288, 384, 3] in [0, 1])   nyuv2/val/image/0.npy ...
    nyuv2/train/label/0.npy     (float [288, 384], -1 = unlabelled, else 0..12)
    nyuv2/train/depth/0.npy     (float [288, 384, 1], 0 = no measurement)
    nyuv2/train/normal/0.npy    (float [288, 384, 3] unit vectors, 0 = no measurement)

Images are stored as uint8 (``round(255 x)``: the source RGB is 8-bit), the class map as uint8 with 255 for
unlabelled, depth and normals as float32 with validity maps (depth > 0; any normal component != 0), as MTAN's and
LibMTL's losses mask them. Validation: ``val_images`` training images (default 95) carved from train by a fixed
hash order (``split_seed``; independent of the run seed), so model selection never sees the test folder.

Source: the preprocessed archive linked from MTAN's README (``lorenmt/mtan``:
https://www.dropbox.com/s/p2nn02wijg7peiy/nyuv2.zip), the one LibMTL's NYUv2 example and later papers (CAGrad,
Nash-MTL, AuxiLearn) point to. No checksum of it is published anywhere we could find (MTAN's README, LibMTL's
docs and example, and the peer loaders that download the same file state none), and the archive could not be
fetched in this session to compute one, so no hash is pinned: the record stores the sha256 of every file read,
which identifies the data a run saw. mtlbench does not download it (Dropbox serves an HTML page unless asked for
``?dl=1``, and an unpinned download could not be verified); a missing folder is one line saying where to put it.
A truncated or corrupt ``.npy`` is one line naming the file.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mtlbench import (DatasetAdapter, FeatureSchema, MtlbenchError, MultiTaskData, Split, TaskSpec, option_field,
                      register_dataset)
from mtlbench.data import ImageSpec
from mtlbench.tasks.helpers import cached_tensors, hash_order, resolve_data_dir

KINDS = ("image", "label", "depth", "normal")
HOW_TO_GET = ("download the preprocessed NYUv2 archive of MTAN (https://www.dropbox.com/s/p2nn02wijg7peiy/nyuv2.zip, "
              "linked from github.com/lorenmt/mtan) and unpack it")


def load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise MtlbenchError(f"nyuv2: cannot read {path} ({' '.join(str(exc).split())}): the file is truncated or not "
                            f"a .npy array; replace it from the original archive") from exc


def read_folder(root: Path, folder: str) -> tuple[dict[str, torch.Tensor], str]:
    """Every sample of ``root/folder``, stacked; and the sha256 over all files read (in order)."""
    d = root / folder
    n = len(list((d / "image").glob("*.npy")))
    if n == 0:
        raise MtlbenchError(f"nyuv2: no images in {d / 'image'}; {HOW_TO_GET} so that {root} holds train/ and val/")
    h = hashlib.sha256()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in KINDS}
    for i in range(n):
        for k in KINDS:
            p = d / k / f"{i}.npy"
            if not p.is_file():
                raise MtlbenchError(f"nyuv2: {p} is missing ({n} images in {d / 'image'}); the folder is incomplete")
            a = load_npy(p)
            h.update(p.read_bytes())
            parts[k].append(a)
    shapes = {k: {a.shape for a in v} for k, v in parts.items()}
    for k, s in shapes.items():
        if len(s) != 1:
            raise MtlbenchError(f"nyuv2: {d / k} holds arrays of different shapes {sorted(s)}")
    img = np.stack(parts["image"])
    if img.ndim != 4 or img.shape[-1] != 3:
        raise MtlbenchError(f"nyuv2: images in {d / 'image'} have shape {img.shape[1:]}, expected [H, W, 3]")
    label = np.stack(parts["label"])
    seg = np.where(label < 0, 255, label).astype(np.uint8)
    depth = np.stack(parts["depth"]).astype(np.float32).reshape(len(img), 1, *img.shape[1:3])
    normal = np.moveaxis(np.stack(parts["normal"]).astype(np.float32), -1, 1)
    t = {"images": torch.from_numpy(np.moveaxis(np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8), -1, 1).copy()),
         "seg": torch.from_numpy(seg), "depth": torch.from_numpy(depth),
         "depth_valid": torch.from_numpy(depth[:, 0] > 0), "normal": torch.from_numpy(normal.copy()),
         "normal_valid": torch.from_numpy((normal != 0).any(1))}
    return t, h.hexdigest()


@register_dataset("nyuv2")
class NYUv2(DatasetAdapter):
    """NYUv2 (MTAN/LibMTL preprocessed layout): 13-class segmentation, depth, normals; user-supplied files."""

    version = "1"
    modality = "image"
    tasks = ("seg", "depth", "normal")
    default_training = {"epochs": 20, "batch_size": 8, "lr": 1e-4}

    @dataclass
    class Options:
        val_images: int = option_field(95, "validation images carved from the 795 training images", minimum=1,
                                       maximum=794)
        split_seed: int = option_field(0, "seed of the validation carve-out", minimum=0)

        def __post_init__(self) -> None:
            if self.val_images < 1:
                raise ValueError(f"val_images must be at least 1, got {self.val_images}")

    @classmethod
    def image_shape(cls, options):
        return (3, 288, 384)

    @classmethod
    def dense_tasks(cls, options):
        return cls.tasks

    def load(self, seed: int) -> MultiTaskData:
        o = self.options or self.Options()
        data_dir = resolve_data_dir(self.data_dir)
        if data_dir is None or not (data_dir / "nyuv2").is_dir():
            where = f"{data_dir / 'nyuv2'}" if data_dir is not None else "<data-dir>/nyuv2 (pass --data-dir)"
            raise MtlbenchError(f"nyuv2: missing folder {where}; {HOW_TO_GET}")
        root = data_dir / "nyuv2"
        stamp = {str(p.relative_to(root)): [p.stat().st_size, p.stat().st_mtime_ns]
                 for p in sorted(root.glob("*/*/*.npy"))}
        sources = {"listing": hashlib.sha256(repr(stamp).encode()).hexdigest()}

        def build():
            train, h_train = read_folder(root, "train")
            test, h_test = read_folder(root, "val")
            n = train["images"].shape[0]
            if o.val_images >= n:
                raise MtlbenchError(f"nyuv2: val_images={o.val_images} leaves no training images ({n} in train)")
            order = torch.from_numpy(hash_order(n, o.split_seed))
            val_idx, tr_idx = order[:o.val_images].sort().values, order[o.val_images:].sort().values
            splits = {"train": {k: v[tr_idx] for k, v in train.items()}, "val": {k: v[val_idx] for k, v in train.items()},
                      "test": test}
            for sp in splits.values():
                m = sp["images"].shape[0]
                sp["labels"], sp["masks"] = torch.zeros(m, 3), torch.ones(m, 3, dtype=torch.bool)
            return {"format": "1", "splits": splits, "sha256": {"train": h_train, "val": h_test}}

        payload, _ = cached_tensors("nyuv2", self.version, asdict(o), sources, build)
        C, H, W = payload["splits"]["train"]["images"].shape[1:]
        tasks = (TaskSpec("seg", "segmentation", ("miou", "pixel_acc"), n_classes=13, target="seg", ignore_index=255),
                 TaskSpec("depth", "depth", ("abs_err", "rel_err", "delta1"), target="depth", valid="depth_valid"),
                 TaskSpec("normal", "normals", ("mean_angle", "median_angle", "within_11_25", "within_22_5",
                                                "within_30"), target="normal", valid="normal_valid"))
        schema = FeatureSchema(extras=("images", "seg", "depth", "depth_valid", "normal", "normal_valid"),
                               image=ImageSpec(int(C), int(H), int(W)))
        return MultiTaskData("nyuv2", self.version, schema, tasks,
                             {s: Split(dict(t)) for s, t in payload["splits"].items()},
                             {"files_sha256": payload["sha256"], "val_from_train": o.val_images})
