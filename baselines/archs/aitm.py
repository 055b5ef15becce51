"""AITM: "Modeling the Sequential Dependence among Audience Multi-step Conversions with Multi-task Learning in
Targeted Display Advertising", Xi, Chen, Yan, Zhang, Zhu, Zhuang, Chen, KDD 2021 (Adaptive Information Transfer
Multi-task framework).

**The run's task order is the funnel order** (e.g. ``--tasks ctr,ctcvr``: impression -> click -> purchase): task
t receives information from task t-1, and the calibrator below penalises ``yhat_t > yhat_(t-1)``. Listing the
tasks in another order builds a different (and, for the calibrator, meaningless) model. Note that with the
``ecommerce`` task ``cvr`` (post-click conversion, defined on clicks only) the funnel constraint
``pCVR <= pCTR`` does not hold by definition; the paper's funnel tasks are all defined over impressions
(``ctr``, ``ctcvr``).

Forward, per task t (all towers read the shared embeddings ``x``):

- ``q_t = Tower_t(x)`` (MLP ``tower_units``, default 128-64-32 as in the official code);
- t = 1: ``z_1 = q_1``; t >= 2: ``p_(t-1) = Info(z_(t-1))`` (Linear + ReLU + dropout to the tower width, the
  official Dense(32, relu)), and the AIT attention over the two vectors ``u in {p_(t-1), q_t}``:
  ``a_u = softmax_u(<W_Q u, W_K u> / sqrt(attention_dim))``, ``z_t = sum_u a_u W_V u`` (W_Q, W_K, W_V without
  bias, initialised N(0, 0.01) as in the official code);
- ``yhat_t = sigmoid(Linear(z_t))``.

What is transferred for t >= 3: the previous task's AIT output ``z_(t-1)`` (``transfer_from=ait``, the default;
our reading of the paper's recursion and torch-rechub's code), or its tower output ``q_(t-1)``
(``transfer_from=tower``). The official code has two tasks only, where both are ``q_1``, so they coincide there.

Loss (:meth:`task_losses`, one per task, in the run's order): task t's masked BCE, plus for t >= 2 the behavioural
expectation calibrator ``alpha * mean_batch(max(yhat_t - yhat_(t-1), 0))`` over every row of the batch (as the
official code's ``reduce_mean``; PaddleRec sums instead, MTReclib omits it). ``alpha`` defaults to 0.6 (the
official ``--weight``); ``alpha=0`` gives plain per-task BCE. All tasks must be binary.

Where the parameters live (what an MTL optimizer sees): a module is task-specific only if no other task's loss
reaches it, which the arch works out from the graph. With alpha > 0, every module of tasks 1..T-1 reaches task
t+1's loss (tower and AIT through the info transfer, the output layer through the calibrator), so they are
*shared* (``self.shared["funnel"][task]``) and their outputs are shared features; the last task's tower, the
info layer into it, its AIT and output layer are ``heads[last task]``, and the other heads are empty. With
``alpha=0`` the output layers of tasks 1..T-1 (and with ``transfer_from=tower`` their AIT and info layers)
become task-specific. ``describe()`` (stored in the run record) lists the placement. Shared: input layer +
the shared funnel modules.

Other defaults: ``attention_dim`` 32 (official), ``dropout`` 0 (official keep-probs 0.9/0.7/0.7), BatchNorm in
the towers on (the suite's common MLP block; the official towers have none: ``batch_norm=false``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from mtlbench import MLP, MtlbenchError, MultiTaskArch, option_field, register_arch
from mtlbench.objectives import task_loss


class AIT(nn.Module):
    """Attention over the transferred vector ``p`` and the task's own ``q`` (both ``[B, d]``) -> ``[B, a]``."""

    def __init__(self, dim: int, attention_dim: int) -> None:
        super().__init__()
        self.scale = 1.0 / math.sqrt(attention_dim)
        self.query = nn.Linear(dim, attention_dim, bias=False)
        self.key = nn.Linear(dim, attention_dim, bias=False)
        self.value = nn.Linear(dim, attention_dim, bias=False)
        for lin in (self.query, self.key, self.value):
            nn.init.normal_(lin.weight, std=0.01)

    def weights(self, p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention weights ``[B, 2]`` (on p, on q) and the values ``[B, 2, a]``."""
        u = torch.stack((p, q), dim=1)
        score = (self.query(u) * self.key(u)).sum(-1) * self.scale
        return torch.softmax(score, dim=1), self.value(u)

    def forward(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        a, v = self.weights(p, q)
        return (a.unsqueeze(-1) * v).sum(1)


@register_arch("aitm")
class AITM(MultiTaskArch):
    """AITM (Xi et al., KDD 2021): towers + adaptive information transfer along the funnel + output calibrator."""

    @dataclass
    class Options:
        tower_units: tuple[int, ...] = option_field((128, 64, 32), "tower hidden widths", minimum=1)
        attention_dim: int = option_field(32, "width of the attention projections", minimum=1)
        alpha: float = 0.6
        transfer_from: Literal["ait", "tower"] = "ait"
        dropout: float = option_field(0.0, "dropout rate", minimum=0, maximum=1, open_maximum=True)
        batch_norm: bool = True

        def __post_init__(self) -> None:
            if not self.tower_units or any(u < 1 for u in self.tower_units):
                raise ValueError(f"tower_units must be one or more positive widths, got {self.tower_units}")
            if self.attention_dim < 1:
                raise ValueError(f"attention_dim must be at least 1, got {self.attention_dim}")
            if not (math.isfinite(self.alpha) and self.alpha >= 0.0):
                raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha}")
            if self.transfer_from not in ("ait", "tower"):
                raise ValueError(f"transfer_from must be ait or tower, got {self.transfer_from!r}")
            if not 0.0 <= self.dropout < 1.0:
                raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def __init__(self, schema, tasks, embed_dim, options=None):
        super().__init__(schema, tasks, embed_dim, options)
        o = self.o = options or self.Options()
        bad = [t for t in self.tasks if t.kind != "binary"]
        if bad:
            raise MtlbenchError(f"aitm needs binary tasks (its calibrator compares probabilities); "
                                f"{', '.join(f'{t.name} is {t.kind}' for t in bad)}")
        self.shared["input"] = inp = self.input_layer()
        d, T = o.tower_units[-1], len(self.tasks)
        # the graph: node -> (task index, module key (None for x), input nodes); z_1 is q_1 itself
        z = lambda t: "q0" if t == 0 else f"z{t}"  # noqa: E731
        nodes: dict[str, tuple[int, str | None, tuple[str, ...]]] = {"x": (-1, None, ())}
        modules: dict[tuple[int, str], nn.Module] = {}
        for t in range(T):
            nodes[f"q{t}"] = (t, "tower", ("x",))
            modules[t, "tower"] = MLP(inp.output_dim, o.tower_units, o.dropout, o.batch_norm)
            if t == 0:
                z_dim = d
            else:
                src = z(t - 1) if o.transfer_from == "ait" else f"q{t - 1}"
                src_dim = o.attention_dim if (o.transfer_from == "ait" and t >= 2) else d
                nodes[f"p{t}"] = (t, "info", (src,))
                modules[t, "info"] = MLP(src_dim, (d,), o.dropout, batch_norm=False)
                nodes[f"z{t}"] = (t, "ait", (f"p{t}", f"q{t}"))
                modules[t, "ait"] = AIT(d, o.attention_dim)
                z_dim = o.attention_dim
            nodes[f"y{t}"] = (t, "out", (z(t),))
            modules[t, "out"] = nn.Linear(z_dim, 1)
        # which losses reach each node (reverse topological order); task-specific iff only its own task's
        reach: dict[str, set[int]] = {}
        for name in reversed(list(nodes)):
            r: set[int] = set()
            if name.startswith("y"):
                t = int(name[1:])
                r = {t} | ({t + 1} if o.alpha > 0 and t + 1 < T else set())
            for other, (_, _, ins) in nodes.items():
                if name in ins:
                    r |= reach[other]
            reach[name] = r
        self._nodes, self._order = nodes, list(nodes)
        self._in_head = {n: (key is not None and reach[n] == {t}) for n, (t, key, _) in nodes.items()}
        funnel = nn.ModuleDict()
        for n, (t, key, _) in nodes.items():
            if key is None:
                continue
            name = self.task_names[t]
            if self._in_head[n]:
                self.heads[name][key] = modules[t, key]
            else:
                if name not in funnel:
                    funnel[name] = nn.ModuleDict()
                funnel[name][key] = modules[t, key]
        if len(funnel):
            self.shared["funnel"] = funnel
        # shared features: x, then every shared node that a head module reads or that is a task output
        consumed_by_head = {i for n, (_, _, ins) in nodes.items() if self._in_head[n] for i in ins}
        self._features = ["x"] + [n for n in self._order if n != "x" and not self._in_head[n]
                                  and (n in consumed_by_head or n.startswith("y"))]

    def describe(self) -> dict[str, Any]:
        placement = {}
        for n, (t, key, _) in self._nodes.items():
            if key is not None:
                name = self.task_names[t]
                placement[f"{name}.{key}"] = f"heads.{name}" if self._in_head[n] else "shared"
        return {"funnel": list(self.task_names), "alpha": self.o.alpha, "transfer_from": self.o.transfer_from,
                "placement": placement, "features": list(self._features)}

    def _module(self, node: str) -> nn.Module:
        t, key, _ = self._nodes[node]
        name = self.task_names[t]
        return self.heads[name][key] if self._in_head[node] else self.shared["funnel"][name][key]

    def _run(self, values: dict[str, torch.Tensor], heads: bool) -> None:
        """Compute, in graph order, every node not yet in ``values``: shared nodes only, or all of them."""
        for n in self._order:
            if n in values or (self._in_head[n] and not heads):
                continue
            values[n] = self._module(n)(*(values[i] for i in self._nodes[n][2]))

    def encode(self, batch):
        values = {"x": self.shared["input"](batch)}
        self._run(values, heads=False)
        return tuple(values[n] for n in self._features)

    def decode(self, features, batch):
        values = dict(zip(self._features, features))
        self._run(values, heads=True)
        return [values[f"y{t}"] for t in range(len(self.tasks))]

    def calibrator(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per task t >= 2: ``alpha * mean(max(yhat_t - yhat_(t-1), 0))`` over the batch (t = 1: 0)."""
        probs = [torch.sigmoid(o.reshape(-1)) for o in outputs]
        zero = outputs[0].new_zeros(())
        return [zero] + [self.o.alpha * torch.relu(probs[t] - probs[t - 1]).mean() for t in range(1, len(probs))]

    def task_losses(self, outputs, batch):
        cal = self.calibrator(outputs) if self.o.alpha > 0 else [None] * len(outputs)
        losses = []
        for i, (t, o) in enumerate(zip(self.tasks, outputs)):
            loss = task_loss(t, o, batch["labels"][:, i], batch["masks"][:, i])
            losses.append(loss if i == 0 or cal[i] is None else loss + cal[i])
        return losses
