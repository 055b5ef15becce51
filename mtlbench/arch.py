"""The architecture contract.

An architecture is built from the feature schema, the task specs, the shared embedding width and its own
``Options``. It is split in two, so optimizers can work with per-task gradients without knowing the model:

- :meth:`MultiTaskArch.encode` maps a batch to the *shared features*: a tuple of tensors computed only by the
  shared parameters (``self.shared``);
- :meth:`MultiTaskArch.decode` maps the features to one output per task, using only the task-specific parameters
  (``self.heads[task]``). Each task's output depends on the shared parameters only through the features.

So ``d loss_t / d shared`` = VJP of ``encode`` with ``d loss_t / d features``, which the training step computes for
all tasks with one batched backward through the shared trunk. Every parameter lives either in ``self.shared`` or
in exactly one ``self.heads[task]`` (tests check the partition).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mtlbench.data import FeatureSchema, TaskSpec
from mtlbench.layers import MLP, InputLayer
from mtlbench.objectives import task_loss
from mtlbench.vision.dense import dense_loss


@dataclass(frozen=True)
class FeatureLayout:
    """The axes of one shared feature tensor, declared by the arch so that Rep-MTL, the method that reads them,
    never guesses them from sizes: ``batch_axis``, ``channel_axis`` and the position axes (spatial ``H, W`` of a
    map, the token axis of a ViT, an expert axis). ``tasks``: the tasks whose heads read this tensor (None: every
    task). MGDA-UB (``mgda`` with ``rep=true``) reads no layout: it flattens every feature gradient, batch
    included."""

    batch_axis: int
    channel_axis: int
    position_axes: tuple[int, ...] = ()
    tasks: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"batch_axis": self.batch_axis, "channel_axis": self.channel_axis,
                "position_axes": list(self.position_axes), "tasks": None if self.tasks is None else list(self.tasks)}


@dataclass
class ArchOutput:
    """Per-task raw outputs (logits, values or class logits) and the shared features they came from."""

    outputs: list[torch.Tensor]
    features: tuple[torch.Tensor, ...]
    # an auxiliary loss of the shared parameters outside the MTL aggregation (e.g. the slimmable arch's CIKD): the
    # training step adds its gradient to the method's update once (``StepContext.backward`` / ``apply_aux``)
    aux: torch.Tensor | None = None


class MultiTaskArch(nn.Module):
    """Base class of every architecture. Subclasses fill ``self.shared`` and ``self.heads`` and implement
    :meth:`encode` and :meth:`decode`. Optional hyper-parameters go in a nested ``Options`` dataclass."""

    Options: Any = None
    # False for an arch that shares no parameters between tasks (``single``): a sweep then skips, before anything
    # loads, the optimizers that need per-task gradients of shared parameters or a shared representation.
    shares_parameters: bool = True
    modality: str = "tabular"  # the data it reads; image archs ("image") subclass mtlbench.vision.ImageArch

    @classmethod
    def required_features(cls, options: Any) -> tuple[str, ...]:
        """Optional input features this arch needs with these options (e.g. ``"sequences"``), checked against
        the dataset's :meth:`DatasetAdapter.provided_features` when the run spec is built, before any data loads."""
        return ()

    def __init__(self, schema: FeatureSchema, tasks: tuple[TaskSpec, ...], embed_dim: int,
                 options: Any = None) -> None:
        super().__init__()
        self.schema, self.tasks, self.embed_dim, self.options = schema, tuple(tasks), embed_dim, options
        self.task_names = tuple(t.name for t in tasks)
        self.shared = nn.ModuleDict()
        self.heads = nn.ModuleDict({t.name: nn.ModuleDict() for t in tasks})

    def input_layer(self) -> InputLayer:
        """A fresh input layer of the common shape (same embedding width for every arch)."""
        return InputLayer(self.schema, self.embed_dim)

    # -- the split -------------------------------------------------------------------------------------------
    def encode(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def decode(self, features: tuple[torch.Tensor, ...], batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> ArchOutput:
        # Each feature enters the heads through its own identity node, so that d loss / d feature is the
        # partial derivative along the heads only, even when one feature is computed from another (MMoE's
        # experts read its embeddings): the chain rule through the trunk then counts every path exactly once.
        features = tuple(f.view_as(f) for f in self.encode(batch))
        return ArchOutput(self.decode(features, batch), features)

    # -- what is optimised ----------------------------------------------------------------------------------
    def loss_tasks(self) -> tuple[str, ...]:
        """The tasks whose losses are optimised, in order (default: every task). An arch may predict a task it
        does not train directly: ESMM predicts cvr but optimises only ctr and ctcvr. The MTL optimizer sees
        these losses; ``self.heads`` is keyed by them (a predicted-only task needs no head)."""
        return self.task_names

    def task_losses(self, outputs: list[torch.Tensor], batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """One loss per :meth:`loss_tasks` entry. Default: each task's masked loss on its own output. Archs with
        a paper-specific objective (ESMM's CTCVR product, AITM's calibrator) override this."""
        return [dense_loss(t, o, batch, i) if t.dense else task_loss(t, o, batch["labels"][:, i], batch["masks"][:, i])
                for i, (t, o) in enumerate(zip(self.tasks, outputs))]

    # -- parameter declaration -------------------------------------------------------------------------------
    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.shared.parameters() if p.requires_grad]

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {t: [p for p in self.heads[t].parameters() if p.requires_grad] for t in self.heads}

    def feature_layouts(self) -> tuple[FeatureLayout, ...] | None:
        """One :class:`FeatureLayout` per tensor :meth:`encode` returns, or None where the arch does not declare
        them: then every tensor has its batch on axis 0 and channels last (tabular vectors ``[B, D]``). Image
        archs always declare; so does every tabular arch that returns expert stacks ``[n, B, D]``. Methods never
        guess an axis from sizes; a contract test checks the declared batch axis on every registered arch."""
        return None

    def selection_groups(self) -> dict[str, str] | None:
        """How model selection treats this arch. ``None`` (default): one epoch is selected for the whole model by
        the run's criterion over all tasks. An arch whose tasks are independent networks (``single``) returns, per
        task, the ``state_dict`` key prefix of that task's network (e.g. ``{"ctr": "heads.ctr."}``): the trainer
        then selects each task's best epoch by that task's own validation metric, keeps training while any task
        still improves (patience per task), and tests each task at its own best epoch, as T separate runs would.
        Every ``state_dict`` key must fall under exactly one prefix."""
        return None

    def per_task_groups(self) -> dict[str, str]:
        """``selection_groups`` for an arch whose whole network per task lives under ``heads.<task>``."""
        return {t: f"heads.{t}." for t in self.task_names}

    def describe(self) -> dict[str, Any]:
        """Arch facts resolved at build time (e.g. HoME's task groups), stored in the run record."""
        return {}

    def record_extras(self, split: Any, device: str) -> dict[str, Any]:
        """Facts of the trained, selected model for the run record, merged into its ``arch_info`` (e.g.
        TaskExpert's expert usage). ``split``: the test split (the one the reported metrics come from); called
        once after model selection, never during training. Default: nothing."""
        return {}

    def parameter_counts(self) -> dict[str, Any]:
        shared = sum(p.numel() for p in self.shared.parameters())
        task = {t: sum(p.numel() for p in self.heads[t].parameters()) for t in self.heads}
        return {"total": sum(p.numel() for p in self.parameters()), "shared": shared, "task": task}


def tower(in_dim: int, units: tuple[int, ...], task: TaskSpec, dropout: float = 0.0,
          batch_norm: bool = True) -> MLP:
    """A task tower: hidden layers, then a linear output of the task's width (1, or C classes)."""
    return MLP(in_dim, units, dropout=dropout, batch_norm=batch_norm, out_dim=task.output_dim)
