"""The image arch contract: a shared image encoder (or several), per-task dense or classification heads, the
declared layout of the shared features, and analytical FLOPs per sample.

An image arch reads ``batch["images"]`` through :class:`~mtlbench.vision.nets.ImageInput` (normalisation on the
device) and otherwise follows :class:`mtlbench.arch.MultiTaskArch`: :meth:`encode` uses shared parameters only,
:meth:`decode` only each task's head. It registers under the same name as its tabular counterpart where there is
one (``shared_bottom``, ``mmoe``...): the registry keeps one variant per modality and the run picks the one that
matches the dataset.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mtlbench.arch import FeatureLayout, MultiTaskArch
from mtlbench.data import FeatureSchema, TaskSpec
from mtlbench.errors import MtlbenchError
from mtlbench.vision import nets
from mtlbench.vision.nets import EncoderOptions


def map_layout(tasks: tuple[str, ...] | None = None, lead: int = 0) -> FeatureLayout:
    """``[*lead axes, B, C, H, W]`` (``lead`` extra leading axes, e.g. experts, count as positions)."""
    return FeatureLayout(lead, lead + 1, tuple(range(lead)) + (lead + 2, lead + 3), tasks)


def vector_layout(tasks: tuple[str, ...] | None = None, lead: int = 0) -> FeatureLayout:
    """``[*lead axes, B, D]``."""
    return FeatureLayout(lead, lead + 1, tuple(range(lead)), tasks)


def token_layout(tasks: tuple[str, ...] | None = None, lead: int = 0) -> FeatureLayout:
    """``[*lead axes, B, N, D]``."""
    return FeatureLayout(lead, lead + 2, tuple(range(lead)) + (lead + 1,), tasks)


class ImageArch(MultiTaskArch):
    """Base of the image archs. Subclasses build their modules in ``__init__`` (helpers below) and implement
    ``encode``/``decode``/``feature_layouts``. ``supports_dense``: it has per-pixel decoders."""

    modality = "image"
    supports_dense = True
    encoders: tuple[str, ...] = nets.ENCODERS  # the encoders this arch is defined on
    eval_batch_size = 256
    Options: Any = EncoderOptions

    def __init__(self, schema: FeatureSchema, tasks: tuple[TaskSpec, ...], embed_dim: int,
                 options: Any = None) -> None:
        super().__init__(schema, tasks, embed_dim, options)
        if schema.image is None:
            raise MtlbenchError(f"arch '{getattr(self, 'registered_name', type(self).__name__)}' needs images; "
                                f"the dataset has none")
        self.image = schema.image
        self.o = options if options is not None else self.Options()

    @classmethod
    def check_input(cls, arch: str, dataset: str, options: Any, image_shape: tuple[int, int, int] | None,
                    dense_tasks: list[str]) -> None:
        """One line, before any data loads: dense tasks without dense decoders, or an image size the encoder
        cannot take."""
        if dense_tasks and not cls.supports_dense:
            raise MtlbenchError(f"arch '{arch}' has no dense decoder, but task(s) {', '.join(dense_tasks)} of "
                                f"dataset '{dataset}' are per-pixel (drop them with --tasks, or use an arch with "
                                f"dense decoders)")
        if image_shape is None or options is None or not isinstance(options, EncoderOptions):
            return
        if options.encoder == "lenet":
            if dense_tasks:
                raise MtlbenchError(f"arch '{arch}' with encoder 'lenet' has no dense decoder (its output is one "
                                    f"vector per image), but task(s) {', '.join(dense_tasks)} of dataset "
                                    f"'{dataset}' are per-pixel (use encoder segnet, resnet or vit)")
            if min(image_shape[1:]) < nets.LeNet.min_size:
                raise MtlbenchError(f"arch '{arch}' with encoder 'lenet' cannot take {image_shape[1]}x"
                                    f"{image_shape[2]} images: height and width must be at least "
                                    f"{nets.LeNet.min_size} (a 9x9 conv, 2x2 pooling, a 5x5 conv, 2x2 pooling)")
            return
        m = nets.resolution_constraint(options)
        _, h, w = image_shape
        if h % m or w % m:
            why = {"segnet": f"{options.depth} levels of 2x2 pooling", "resnet":
                   f"{options.depth - 1} stride-2 stages", "vit": f"{options.patch}x{options.patch} patches"}
            raise MtlbenchError(f"arch '{arch}' with encoder '{options.encoder}' cannot take {h}x{w} images: height "
                                f"and width must be multiples of {m} ({why[options.encoder]}); change the "
                                f"dataset's resolution or the encoder's depth/patch")

    # -- helpers ---------------------------------------------------------------------------------------------
    def input_stage(self) -> nets.ImageInput:
        return nets.ImageInput(self.image)

    def encoder(self) -> nn.Module:
        return nets.build_encoder(self.o, self.image)

    def head(self, task: TaskSpec, enc: nn.Module, c_in: int | None = None) -> nn.Module:
        """The task's decoder on ``enc``'s output: dense (MTAN's prediction layer, upsampled) or classification."""
        c = enc.out_channels if c_in is None else c_in
        if task.dense:
            grid = getattr(enc, "grid", None)
            return nets.DenseHead(c, task.output_dim, (self.image.height, self.image.width), grid)
        return nets.ClassHead(c, task.output_dim, self.o.head_width or c)

    def layout_of(self, enc: nn.Module, tasks: tuple[str, ...] | None = None, lead: int = 0) -> FeatureLayout:
        kind = getattr(enc, "layout", "map")
        return {"tokens": token_layout, "vector": vector_layout}.get(kind, map_layout)(tasks, lead)

    def use_channels_last(self) -> "ImageArch":
        """Lay the input and every 4-D weight out NHWC (``torch.channels_last``); convolutions then run on
        oneDNN's NHWC kernels, several times faster on CPU for these narrow nets. The maths is unchanged (same
        shapes, weights and formulas); only the kernels' summation order differs, so values agree to float32
        rounding, not bit for bit. The training loop calls it (``mtlbench.train.build``); a model built directly
        stays NCHW."""
        for m in self.modules():
            if isinstance(m, nets.ImageInput):
                m.channels_last = True
        return self.to(memory_format=torch.channels_last)

    # -- facts -----------------------------------------------------------------------------------------------
    def flops(self) -> dict[str, Any]:
        """Analytical MACs per sample of a forward pass (see :func:`mtlbench.vision.nets.count_macs`), split into
        the shared part and each task's head; ``flops = 2 * macs``."""
        C, H, W = self.image.shape
        dtype = torch.uint8 if self.image.dtype == "uint8" else torch.float32
        device = next(self.parameters()).device
        T = len(self.tasks)
        batch = {"images": torch.zeros(1, C, H, W, dtype=dtype, device=device),
                 "labels": torch.zeros(1, T, device=device), "masks": torch.ones(1, T, dtype=torch.bool,
                                                                                  device=device)}
        groups = {"shared": self.shared, **{f"task:{t}": self.heads[t] for t in self.heads}}
        counts = nets.count_macs(self, lambda: self(batch), groups)
        task = {g.split(":", 1)[1]: n for g, n in counts.items() if g.startswith("task:")}
        total = sum(counts.values())
        return {"macs": total, "flops": 2 * total, "shared_macs": counts["shared"], "task_macs": task,
                "input": [C, H, W],
                "counted": "conv, linear and attention matmul multiply-accumulates per sample; norms, activations, "
                           "pooling, interpolation and biases not counted"}

    def describe(self) -> dict[str, Any]:
        layouts = self.feature_layouts()
        return {"feature_layouts": [l.to_dict() for l in layouts] if layouts is not None else None}
