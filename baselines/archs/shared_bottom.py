"""Shared-Bottom (Caruana, 1997): one shared MLP under per-task towers."""
from __future__ import annotations

from dataclasses import dataclass

from mtlbench import MLP, MultiTaskArch, option_field, register_arch
from mtlbench.arch import tower


@register_arch("shared_bottom")
class SharedBottom(MultiTaskArch):
    """Shared-Bottom: shared embeddings and bottom MLP, one tower per task (Caruana 1997; MMoE paper eq. 1)."""

    @dataclass
    class Options:
        bottom_units: tuple[int, ...] = option_field((256, 128), "bottom MLP hidden widths", minimum=1)
        tower_units: tuple[int, ...] = option_field((64,), "tower hidden widths", minimum=1)
        dropout: float = option_field(0.0, "dropout rate", minimum=0, maximum=1, open_maximum=True)
        batch_norm: bool = True

    def __init__(self, schema, tasks, embed_dim, options=None):
        super().__init__(schema, tasks, embed_dim, options)
        o = options or self.Options()
        self.shared["input"] = self.input_layer()
        self.shared["bottom"] = MLP(self.shared["input"].output_dim, o.bottom_units, o.dropout, o.batch_norm)
        for t in self.tasks:
            self.heads[t.name]["tower"] = tower(self.shared["bottom"].output_dim, o.tower_units, t, o.dropout,
                                                o.batch_norm)

    def encode(self, batch):
        return (self.shared["bottom"](self.shared["input"](batch)),)

    def decode(self, features, batch):
        (z,) = features
        return [self.heads[t]["tower"](z) for t in self.task_names]
