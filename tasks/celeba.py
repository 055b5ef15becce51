"""``celeba``: CelebA (Liu et al., ICCV 2015), 40 binary face attributes on the aligned images, with the official
train / validation / test partition (162,770 / 19,867 / 19,962 images), as used by MGDA (Sener & Koltun 2018) and
F-MTL.

Layout under the data directory (the files of the official release)::

    celeba/img_align_celeba/000001.jpg ...   (178x218 aligned JPEGs)
    celeba/list_attr_celeba.txt               (count line, 40 attribute names, then "000001.jpg -1 1 ..." rows)
    celeba/list_eval_partition.txt            ("000001.jpg 0" rows: 0 train, 1 validation, 2 test)

Images are decoded once with Pillow (a matplotlib dependency), centre-cropped to 178x178 and resized to
``resolution`` (default 64, bilinear), stored as uint8 and cached; ``max_images`` takes the first images of each
split (in file order) for quick runs. Attributes -1/1 become 0/1; each is a binary task (accuracy, AUC).

Source: the official release is on Google Drive behind a confirmation page, so mtlbench does not download it;
the error names where the files go. Hashes are pinned to the md5s that torchvision's ``CelebA`` dataset publishes
for the official files (``torchvision/datasets/celeba.py``, ``file_list``): both list files are checked on every
load (a file with another md5 is one line naming both), and ``img_align_celeba.zip``, when it is still beside the
unpacked folder, once when the image cache is built (the unpacked JPEGs have no published hash; torchvision does
not check them either). The files could not be obtained in this session, so the pins are tested on fixtures
only. The record stores the sha256 of both list files. A corrupt or truncated JPEG, a malformed list file or an
image named in a list but missing is one line naming the file.
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
from mtlbench.tasks.helpers import cached_tensors, resolve_data_dir, sha256_file

ATTRIBUTES = ("5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
              "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby",
              "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male",
              "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose",
              "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair",
              "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young")
# md5 of the official files, as torchvision's CelebA ``file_list`` pins them
PINNED_MD5 = {"img_align_celeba.zip": "00d2c5bc6d35e252742224ab0c1e8fcb",
              "list_attr_celeba.txt": "75e246fa4810816ffd6ee81facbd244c",
              "list_eval_partition.txt": "d32c9cbf5e040fd4025c592c306e6668"}
HOW_TO_GET = ("get img_align_celeba.zip, list_attr_celeba.txt and list_eval_partition.txt from the CelebA page "
              "(mmlab.ie.cuhk.edu.hk/projects/CelebA.html) and unzip the images")


def check_md5(path: Path) -> None:
    """One line if ``path`` is not the official file (its md5 differs from the pinned one)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    want = PINNED_MD5[path.name]
    if h.hexdigest() != want:
        raise MtlbenchError(f"celeba: {path} has md5 {h.hexdigest()}, the official file has {want} (torchvision's "
                            f"pin); it is corrupt, truncated or another version: {HOW_TO_GET}")


def read_attributes(path: Path) -> tuple[list[str], np.ndarray]:
    lines = path.read_text().splitlines()
    if len(lines) < 3 or lines[1].split() != list(ATTRIBUTES):
        raise MtlbenchError(f"celeba: {path} does not have the official header (a count line, then the 40 attribute "
                            f"names)")
    names, rows = [], []
    for k, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if len(parts) != 41 or any(v not in ("1", "-1") for v in parts[1:]):
            raise MtlbenchError(f"celeba: {path} line {k} is not 'image.jpg' followed by 40 values of 1 or -1")
        names.append(parts[0])
        rows.append(parts[1:])
    return names, (np.asarray(rows, dtype=np.int8) > 0)


def read_partition(path: Path) -> dict[str, int]:
    out = {}
    for k, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise MtlbenchError(f"celeba: {path} line {k} is not 'image.jpg 0|1|2'")
        out[parts[0]] = int(parts[1])
    return out


def decode(path: Path, resolution: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("RGB")
    except FileNotFoundError as exc:
        raise MtlbenchError(f"celeba: image {path} is listed but missing") from exc
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise MtlbenchError(f"celeba: cannot decode {path} ({' '.join(str(exc).split())}): the file is corrupt or "
                            f"truncated; replace it from the original archive") from exc
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    im = im.resize((resolution, resolution), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


@register_dataset("celeba")
class CelebA(DatasetAdapter):
    """CelebA: 40 binary face attributes, aligned images, the official partition; user-supplied files."""

    version = "1"
    modality = "image"
    tasks = ATTRIBUTES
    default_training = {"epochs": 5, "batch_size": 256, "lr": 1e-3}

    @dataclass
    class Options:
        resolution: int = option_field(64, "image height and width after resizing", minimum=8)
        max_images: int | None = option_field(None, "at most this many images per split (none: all)", minimum=1)

        def __post_init__(self) -> None:
            if self.resolution < 8:
                raise ValueError(f"resolution must be at least 8, got {self.resolution}")
            if self.max_images is not None and self.max_images < 1:
                raise ValueError(f"max_images must be at least 1, got {self.max_images}")

    @classmethod
    def image_shape(cls, options):
        o = options or cls.Options()
        return (3, o.resolution, o.resolution)

    def load(self, seed: int) -> MultiTaskData:
        o = self.options or self.Options()
        data_dir = resolve_data_dir(self.data_dir)
        root = data_dir / "celeba" if data_dir is not None else None
        need = ("list_attr_celeba.txt", "list_eval_partition.txt", "img_align_celeba")
        missing = [n for n in need if root is None or not (root / n).exists()]
        if missing:
            where = str(root) if root is not None else "<data-dir>/celeba (pass --data-dir)"
            raise MtlbenchError(f"celeba: missing {', '.join(missing)} in {where}; {HOW_TO_GET}")
        for n in need[:2]:
            check_md5(root / n)
        sources = {n: sha256_file(root / n) for n in need[:2]}

        def build():
            if (root / "img_align_celeba.zip").is_file():
                check_md5(root / "img_align_celeba.zip")
            names, attrs = read_attributes(root / "list_attr_celeba.txt")
            part = read_partition(root / "list_eval_partition.txt")
            lost = [n for n in names if n not in part]
            if lost:
                raise MtlbenchError(f"celeba: {len(lost)} image(s) of list_attr_celeba.txt are not in "
                                    f"list_eval_partition.txt, e.g. {lost[0]}")
            which = np.asarray([part[n] for n in names])
            splits = {}
            for sid, split in enumerate(("train", "val", "test")):
                idx = np.flatnonzero(which == sid)[:o.max_images]
                imgs = np.stack([decode(root / "img_align_celeba" / names[i], o.resolution) for i in idx])
                splits[split] = {"images": torch.from_numpy(np.moveaxis(imgs, -1, 1).copy()),
                                 "labels": torch.from_numpy(attrs[idx].astype(np.float32)),
                                 "masks": torch.ones(len(idx), 40, dtype=torch.bool)}
            return {"format": "1", "splits": splits}

        payload, _ = cached_tensors("celeba", self.version, asdict(o), sources, build)
        tasks = tuple(TaskSpec(a, "binary", ("accuracy", "auc")) for a in ATTRIBUTES)
        schema = FeatureSchema(extras=("images",), image=ImageSpec(3, o.resolution, o.resolution))
        return MultiTaskData("celeba", self.version, schema, tasks,
                             {s: Split(dict(t)) for s, t in payload["splits"].items()},
                             {"files_sha256": sources, "partition": "official"})
