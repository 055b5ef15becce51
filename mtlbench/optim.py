"""The MTL optimizer contract: how T task losses become one update.

Each training step the loop builds a :class:`StepContext` and calls ``method.step(ctx)``; the method must leave
``.grad`` set on every trainable parameter, then the loop calls the torch optimizer and ``method.after_step(ctx)``.
The context offers, lazily and cached, everything the families of methods need:

- loss-only methods (EW, UW, DWA, RLW, FAMO...): ``ctx.losses`` and ``ctx.backward(weights)``, one backward;
- Jacobian / Gramian methods (MGDA, PCGrad, CAGrad, Nash-MTL, UPGrad...): ``ctx.jacobian()`` (per-task gradients
  of the shared parameters, ``[T, P]``) or ``ctx.gramian()``, then ``ctx.set_grads(shared_grad, task_weights)``;
- representation methods (MGDA-UB, Rep-MTL): ``ctx.features`` and ``ctx.feature_grads()``;
- methods needing an extra forward (FAMO's loss after the step, SAM-style perturbations, GradNorm):
  ``ctx.forward()`` recomputes the outputs and losses at the current parameters;
- stateful methods keep their state in attributes and save it through ``state_dict`` / ``load_state_dict``.

A task with no labelled row in a batch is absent from that step for every method (issue 16): its loss is a constant 0
with no gradient, and treating it as a task with loss 0 corrupts methods (MGDA's min-norm point is then 0, FAMO
and UW chase a log of 0, loss histories average in zeros). :func:`present_tasks` finds the present tasks; the
training loop then hands the method ``ctx.restrict(present)`` (losses, heads, Jacobian rows of the present tasks
only) inside ``method.only(present)``, which narrows the method's per-task state (declared in ``task_state``) to
those tasks and writes it back afterwards; the absent tasks' weights are logged as 0. A batch in which no task has a
label is skipped. When every task is present nothing of this runs, so results do not change.

Per-task gradients are computed the cheap way: one backward per task through its head only, down to the shared
features, then a single batched vector-Jacobian product through the shared trunk (``is_grads_batched``), with a
per-task loop as the fallback where batching is not supported.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from mtlbench.errors import MtlbenchError

Requirement = str  # "shared_grads" | "features"


def upcast_half(t: torch.Tensor) -> torch.Tensor:
    """float32 for a half-precision tensor (``--precision bf16``'s activations), anything else unchanged."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


class StepContext:
    """Everything one training step knows, with expensive quantities computed on first use and cached."""

    def __init__(self, model: nn.Module, batch: dict[str, torch.Tensor], output: Any,
                 losses: list[torch.Tensor], forward: Callable[[], tuple[Any, list[torch.Tensor]]],
                 generator: torch.Generator, step: int, epoch: int) -> None:
        self.model, self.batch, self.output, self.losses = model, batch, output, losses
        self.generator, self.step, self.epoch = generator, step, epoch
        self._forward = forward
        # the tasks whose losses are optimised (duck-typed models without loss_tasks(): all their tasks)
        loss_tasks = getattr(model, "loss_tasks", None)
        self.task_names: tuple[str, ...] = tuple(loss_tasks() if loss_tasks else model.task_names)
        self.shared_params: list[nn.Parameter] = model.shared_parameters()
        tp = model.task_parameters()
        self.task_params: list[list[nn.Parameter]] = [tp.get(t, []) for t in self.task_names]
        self._feature_grads: list[tuple[torch.Tensor, ...]] | None = None
        self._head_grads: list[tuple[torch.Tensor | None, ...]] | None = None
        self._jacobian: torch.Tensor | None = None
        # the arch's auxiliary loss (ArchOutput.aux), added once: folded into the first ``backward`` (one pass),
        # else backpropagated alone by ``apply_aux`` after the method's step; the flag is shared with ``restrict``
        self.aux: torch.Tensor | None = getattr(output, "aux", None)
        self._aux_done = [self.aux is None]

    # -- losses ----------------------------------------------------------------------------------------------
    @property
    def n_tasks(self) -> int:
        return len(self.losses)

    @property
    def loss_values(self) -> torch.Tensor:
        """The task losses as a detached vector ``[T]``."""
        return torch.stack([l.detach() for l in self.losses])

    @property
    def label_counts(self) -> torch.Tensor:
        """Labelled rows per task in this batch ``[T]`` (0: the task's loss is a constant 0 here)."""
        counts = self.batch["masks"].sum(0)
        names = tuple(getattr(self.model, "task_names", self.task_names))
        return counts[[names.index(t) for t in self.task_names]] if names != self.task_names else counts

    @property
    def features(self) -> tuple[torch.Tensor, ...]:
        return self.output.features

    def restrict(self, index: list[int]) -> "StepContext":
        """The same step seen with only the tasks at ``index`` (losses, heads, per-task gradients, extra forwards):
        what a method sees when the other tasks have no labelled row in the batch."""
        sub = copy.copy(self)
        sub.losses = [self.losses[i] for i in index]
        sub.task_names = tuple(self.task_names[i] for i in index)
        sub.task_params = [self.task_params[i] for i in index]
        pick = (lambda xs: None if xs is None else [xs[i] for i in index])  # noqa: E731
        sub._feature_grads, sub._head_grads = pick(self._feature_grads), pick(self._head_grads)
        J = self._jacobian
        sub._jacobian = None if J is None else J[torch.as_tensor(index, device=J.device)]
        parent_forward = self._forward

        def forward() -> tuple[Any, list[torch.Tensor]]:
            out, losses = parent_forward()
            return out, [losses[i] for i in index]

        sub._forward = forward
        return sub

    def backward(self, weights: torch.Tensor | None = None, retain_graph: bool = False) -> None:
        """One backward of ``sum_t weights[t] * loss_t`` (weights 1 if None), accumulating into ``.grad``."""
        if weights is None:
            total = torch.stack(self.losses).sum()
        else:
            total = (weights.to(self.losses[0].dtype) * torch.stack(self.losses)).sum()
        self.plus_aux(total).backward(retain_graph=retain_graph)

    def plus_aux(self, total: torch.Tensor) -> torch.Tensor:
        """``total`` plus the arch's auxiliary loss if not yet added: for a method that backpropagates its own
        objective (Rep-MTL's regularised sum) instead of calling :meth:`backward`."""
        if self._aux_done[0]:
            return total
        self._aux_done[0] = True
        return total + self.aux

    def apply_aux(self) -> None:
        """Backpropagate the arch's auxiliary loss if the method's step did not (gradient methods write their
        update with ``set_grads``; their graph is still alive): its gradient adds to the update unchanged."""
        if not self._aux_done[0]:
            self._aux_done[0] = True
            self.aux.backward()

    def forward(self) -> tuple[Any, list[torch.Tensor]]:
        """An extra forward at the current parameters (same batch, training mode): ``(output, losses)``."""
        return self._forward()

    # -- per-task gradients ----------------------------------------------------------------------------------
    def _head_pass(self) -> None:
        if self._feature_grads is not None:
            return
        feats = self.features
        fgrads, hgrads = [], []
        for loss, params in zip(self.losses, self.task_params):
            grads = torch.autograd.grad(loss, (*feats, *params), retain_graph=True, allow_unused=True)
            # a bf16 run's features are bfloat16: their gradients in float32 (any other dtype as it is)
            fgrads.append(tuple(upcast_half(torch.zeros_like(f) if g is None else g)
                                for f, g in zip(feats, grads[:len(feats)])))
            hgrads.append(grads[len(feats):])
        self._feature_grads, self._head_grads = fgrads, hgrads

    def feature_grads(self) -> list[tuple[torch.Tensor, ...]]:
        """Per task, ``d loss_t / d features`` (one tuple per task, aligned with ``ctx.features``)."""
        self._head_pass()
        assert self._feature_grads is not None
        return self._feature_grads

    def head_grads(self) -> list[tuple[torch.Tensor | None, ...]]:
        """Per task, ``d loss_t / d head_t`` for that task's own parameters (aligned with ``task_params[t]``)."""
        self._head_pass()
        assert self._head_grads is not None
        return self._head_grads

    def jacobian(self) -> torch.Tensor:
        """Per-task gradients of the shared parameters, flattened: ``[T, P]`` (row t = grad of loss_t)."""
        if self._jacobian is not None:
            return self._jacobian
        if not self.shared_params:
            raise MtlbenchError("this method needs per-task gradients of shared parameters, but the architecture "
                                "declares none")
        fgrads = self.feature_grads()
        feats = self.features
        cot = tuple(torch.stack([fg[i] for fg in fgrads]) for i in range(len(feats)))
        rows = _batched_vjp(feats, self.shared_params, cot)
        self._jacobian = torch.cat([r.reshape(r.shape[0], -1) for r in rows], dim=1)
        return self._jacobian

    def gramian(self) -> torch.Tensor:
        """``J J^T`` (``[T, T]``), the inner products of the task gradients."""
        j = self.jacobian()
        return j @ j.T

    # -- writing the update ----------------------------------------------------------------------------------
    def set_grads(self, shared_grad: torch.Tensor, task_weights: torch.Tensor | None = None) -> None:
        """Write a flat update for the shared parameters and ``task_weights[t] * d loss_t / d head_t`` for each
        head (weights 1 if None: each head follows its own loss)."""
        self._head_pass()
        assert self._head_grads is not None
        offset = 0
        for p in self.shared_params:
            n = p.numel()
            _accumulate(p, shared_grad[offset:offset + n].view_as(p))
            offset += n
        if offset != shared_grad.numel():
            raise ValueError(f"shared update has {shared_grad.numel()} entries for {offset} shared parameters")
        for t, (params, grads) in enumerate(zip(self.task_params, self._head_grads)):
            w = 1.0 if task_weights is None else task_weights[t]
            for p, g in zip(params, grads):
                if g is not None:
                    _accumulate(p, g * w)


def present_tasks(ctx: StepContext, host_counts: torch.Tensor | None = None) -> list[int] | None:
    """Indices of the tasks with at least one labelled row in this batch, or None when every task has one.
    ``host_counts``: labelled rows per data task counted on the host (the loader's ``host_label_counts``: no
    device sync); without it the batch's masks are counted on their device (one host copy of T counts)."""
    if "masks" not in ctx.batch:
        return None
    if host_counts is not None:
        names = tuple(getattr(ctx.model, "task_names", ctx.task_names))
        idx = [names.index(t) for t in ctx.task_names] if names != ctx.task_names else list(range(len(names)))
        counts = host_counts[idx].tolist()
    else:
        counts = ctx.label_counts.tolist()
    if all(c > 0 for c in counts):
        return None
    return [i for i, c in enumerate(counts) if c > 0]


def _accumulate(p: torch.Tensor, g: torch.Tensor) -> None:
    g = g.detach()
    if p.grad is None:
        p.grad = g.clone()
    else:
        p.grad.add_(g)


_BATCHED_VJP_OK = True


def _batched_vjp(outputs: tuple[torch.Tensor, ...], inputs: list[nn.Parameter],
                 cotangents: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """``[T, *p.shape]`` per input: VJPs of ``outputs`` for T stacked cotangents, batched if possible."""
    global _BATCHED_VJP_OK
    if _BATCHED_VJP_OK:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*is_grads_batched.*")
                warnings.filterwarnings("ignore", message=".*fall back.*")
                grads = torch.autograd.grad(outputs, inputs, cotangents, retain_graph=True, allow_unused=True,
                                            is_grads_batched=True)
            return [torch.zeros((cotangents[0].shape[0], *p.shape), dtype=p.dtype, device=p.device)
                    if g is None else g for p, g in zip(inputs, grads)]
        except RuntimeError:
            _BATCHED_VJP_OK = False  # some modules (e.g. certain RNN kernels) have no batching rule
    T = cotangents[0].shape[0]
    per_task = []
    for t in range(T):
        g = torch.autograd.grad(outputs, inputs, tuple(c[t] for c in cotangents), retain_graph=True,
                                allow_unused=True)
        per_task.append([torch.zeros_like(p) if x is None else x for p, x in zip(inputs, g)])
    return [torch.stack([pt[i] for pt in per_task]) for i in range(len(inputs))]


class MTLOptimizer:
    """Base class of every MTL optimizer (weighting or gradient method).

    ``requires`` names what the method needs from the architecture, checked before training starts:
    ``"shared_grads"`` (declared shared parameters) or ``"features"`` (a shared representation). A method whose
    needs depend on its options may set ``self.requires`` per instance in ``__init__``.
    """

    Options: Any = None
    requires: ClassVar[frozenset[Requirement]] = frozenset()
    # Per-task state: attribute name ("attr", or "attr.key" for an entry of a dict attribute) -> how many leading
    # axes index tasks (1: [T, ...], 2: [T, T, ...]); plain tensors only (a learnable nn.Parameter, stepped by the
    # torch optimizer, keeps its shape: index it with ``self.active`` instead). In a step where some tasks are
    # absent, :meth:`only` narrows these to the present tasks and writes them back after, so absent tasks' state
    # neither moves nor leaks in.
    task_state: ClassVar[dict[str, int]] = {}

    def __init__(self, task_names: tuple[str, ...], options: Any = None) -> None:
        self.task_names = tuple(task_names)
        self.active: list[int] | None = None  # during a step with absent tasks: the present tasks' indices
        self.options = options
        self.last_weights: torch.Tensor | None = None
        self.warnings: list[str] = []  # stored in the run record
        self._warned: set[str] = set()

    def warn_once(self, key: str, message: str) -> None:
        """Warn once per run (e.g. a solver that did not converge); the message lands in the run record."""
        if key in self._warned:
            return
        self._warned.add(key)
        self.warnings.append(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    @contextlib.contextmanager
    def only(self, index: list[int] | None) -> Iterator[None]:
        """Within the block the method sees only the tasks at ``index`` (None: all): ``task_names``, the
        ``task_state`` entries and ``active``; afterwards the state is written back and ``last_weights`` is
        widened to every task, 0 for the absent ones."""
        if index is None:
            yield
            return
        full_names, T = self.task_names, len(self.task_names)
        saved = {name: _get_state(self, name) for name in self.task_state}
        for name, axes in self.task_state.items():
            if saved[name] is not None:
                _set_state(self, name, _take(saved[name], index, axes))
        self.task_names, self.active = tuple(full_names[i] for i in index), list(index)
        try:
            yield
        finally:
            self.task_names, self.active = full_names, None
            for name, axes in self.task_state.items():
                sub, full = _get_state(self, name), saved[name]
                if sub is None:
                    continue
                if full is None:  # state created lazily in this step (e.g. an EMA buffer): the absent tasks get 0
                    shape = [T] * axes + list(sub.shape[axes:])
                    full = torch.zeros(shape, dtype=sub.dtype, device=sub.device)
                _set_state(self, name, _put(full, index, axes, sub))
            w = self.last_weights
            if w is not None and w.shape[0] == len(index):
                wide = torch.zeros(T, dtype=w.dtype, device=w.device)
                wide[torch.as_tensor(index, device=w.device)] = w
                self.last_weights = wide

    def parameters(self) -> list[nn.Parameter]:
        """Learnable parameters of the method itself (e.g. UW's log-variances); stepped with the model."""
        return []

    def to(self, device: torch.device | str) -> "MTLOptimizer":
        """Move the method's own parameters to the model's device (called before the torch optimizer is built).

        A parameter held in an attribute is replaced by a new Parameter on ``device`` (as ``nn.Module.to`` does
        for tensor subclasses); one held elsewhere is moved in place through ``.data``."""
        moved = set()
        for name, value in list(vars(self).items()):
            if isinstance(value, nn.Parameter) and value.device != torch.device(device):
                setattr(self, name, nn.Parameter(value.detach().to(device), requires_grad=value.requires_grad))
                moved.add(id(value))
        for p in self.parameters():
            if id(p) not in moved and p.device != torch.device(device):
                p.data = p.data.to(device)
        return self

    def step(self, ctx: StepContext) -> None:
        raise NotImplementedError

    def after_step(self, ctx: StepContext) -> None:
        """Called after the parameter update (e.g. FAMO's weight update)."""

    def end_epoch(self, epoch: int, train_losses: dict[str, float]) -> None:
        """Called after each epoch with the mean training loss per task (e.g. DWA)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _get_state(obj: Any, name: str) -> Any:
    attr, _, key = name.partition(".")
    value = getattr(obj, attr)
    return value.get(key) if key and value is not None else value


def _set_state(obj: Any, name: str, value: Any) -> None:
    attr, _, key = name.partition(".")
    if key:
        getattr(obj, attr)[key] = value
    else:
        setattr(obj, attr, value)


def _take(x: torch.Tensor, index: list[int], axes: int) -> torch.Tensor:
    idx = torch.as_tensor(index, device=x.device)
    x = x.detach()[idx]
    return x[:, idx] if axes == 2 else x


def _put(full: torch.Tensor, index: list[int], axes: int, sub: torch.Tensor) -> torch.Tensor:
    out = full.detach().clone()
    idx = torch.as_tensor(index, device=full.device)
    sub = sub.detach().to(out.dtype)
    if axes == 2:
        out[idx[:, None], idx] = sub
    else:
        out[idx] = sub
    return out


class JacobianMethod(MTLOptimizer):
    """Base class of methods that aggregate the per-task gradients of the shared parameters.

    Subclasses implement :meth:`aggregate`, a function of the Jacobian ``J`` (``[T, P]``; most methods only use
    the Gramian ``J J^T``) that returns the shared update and the task weights ``w`` it corresponds to (update =
    ``J^T w`` where that holds, else None). Because it is a plain function of ``J``, wrappers such as F-MTL call
    it on any Jacobian. By default each task head follows its own loss's gradient (weight 1), as in MGDA's and
    PCGrad's papers; :meth:`head_weights` changes that for methods whose papers weight the heads too.
    """

    requires = frozenset({"shared_grads"})

    def aggregate(self, J: torch.Tensor, losses: torch.Tensor,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def head_weights(self, weights: torch.Tensor | None) -> torch.Tensor | None:
        return None

    def step(self, ctx: StepContext) -> None:
        self.step_index, self.epoch = ctx.step, ctx.epoch  # lets aggregate() name the step in a warning
        J = ctx.jacobian()
        update, weights = self.aggregate(J, ctx.loss_values, ctx.generator)
        ctx.set_grads(update, self.head_weights(weights))
        self.last_weights = weights


def check_compatible(method: MTLOptimizer, model: nn.Module, method_name: str, arch_name: str) -> None:
    """One clear line when a method needs something the architecture does not offer."""
    if "shared_grads" in method.requires and not model.shared_parameters():
        raise MtlbenchError(f"optimizer '{method_name}' needs per-task gradients of shared parameters, but arch "
                            f"'{arch_name}' shares none (use a multi-task arch, or optimizer 'ew')")
    # features are computed by the shared parameters only, so an arch without shared parameters has none
    if "features" in method.requires and not model.shared_parameters():
        raise MtlbenchError(f"optimizer '{method_name}' needs a shared representation, but arch '{arch_name}' "
                            f"shares nothing (use a multi-task arch, or optimizer 'ew')")
