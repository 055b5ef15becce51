"""Single-task baseline: one independent network per task, nothing shared (the reference for Δm%)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mtlbench import MLP, MultiTaskArch, option_field, register_arch
from mtlbench.arch import tower


@register_arch("single")
class SingleTask(MultiTaskArch):
    """One network per task (own embeddings, bottom and tower): the single-task baseline Δm% is measured against.

    Each task's network has the same shape as ``shared_bottom`` (input layer -> bottom MLP -> tower), so the
    comparison isolates the effect of sharing. Training all T networks in one run is equivalent to T separate
    runs: their parameters and losses are disjoint, so under equal weighting their gradients never interact.

    ``selection = "per_task"`` (default) makes model selection match that too: each task's network keeps the
    weights of its own best validation epoch (by its own primary metric, or its own loss under
    ``--selection val_loss``), training goes on while any task still improves (patience counted per task), and
    each task is tested at its own best epoch. ``"joint"`` selects one epoch for all networks by the run's
    criterion over all tasks (mtlbench before 2026-12), which stops a task that is still improving when the
    others have peaked and so biases Δm% in favour of MTL methods.
    """

    shares_parameters = False  # a sweep skips single x (gradient / representation methods) up front

    @dataclass
    class Options:
        bottom_units: tuple[int, ...] = option_field((256, 128), "bottom MLP hidden widths", minimum=1)
        tower_units: tuple[int, ...] = option_field((64,), "tower hidden widths", minimum=1)
        dropout: float = option_field(0.0, "dropout rate", minimum=0, maximum=1, open_maximum=True)
        batch_norm: bool = True
        selection: Literal["per_task", "joint"] = "per_task"

        def __post_init__(self) -> None:
            if self.selection not in ("per_task", "joint"):
                raise ValueError(f"selection must be per_task or joint, got {self.selection!r}")

    def __init__(self, schema, tasks, embed_dim, options=None):
        super().__init__(schema, tasks, embed_dim, options)
        o = self.options = options or self.Options()
        for t in self.tasks:
            inp = self.input_layer()
            bottom = MLP(inp.output_dim, o.bottom_units, o.dropout, o.batch_norm)
            self.heads[t.name].update({"input": inp, "bottom": bottom,
                                       "tower": tower(bottom.output_dim, o.tower_units, t, o.dropout,
                                                      o.batch_norm)})

    def selection_groups(self):
        if self.options is not None and self.options.selection == "joint":
            return None
        return self.per_task_groups()

    def encode(self, batch):
        return ()

    def decode(self, features, batch):
        out = []
        for t in self.task_names:
            h = self.heads[t]
            out.append(h["tower"](h["bottom"](h["input"](batch))))
        return out
