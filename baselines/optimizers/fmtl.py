"""F-MTL: "Improving Multi-task Learning via Seeking Task-based Flat Regions", Phan, Tran, Tran, Tran, Truong,
Lei, Ho, Phung, Le, arXiv 2211.13723 (v1-v4; ICLR 2024 submission). v5 appeared at ICCV 2025 as "Beyond Losses
Reweighting: Empowering Multi-Task Learning via the Generalization Perspective". Official code:
github.com/VietHoang1512/FS-MTL.

Algorithm 1 of the paper, one training step with T tasks, parameters ``theta^t = [theta_sh, theta_head^t]``:

1. at ``theta``: per-task gradients ``g_t = d L_t / d theta_sh`` (the Jacobian ``J``) and ``d L_t / d head_t``;
2. for each task t, a SAM ascent step of the shared parameters and of *that task's own* head, each normalised
   separately (Eqs. 7 and 11): ``eps_sh^t = rho g_t / ||g_t||``, ``eps_head^t = rho_head h_t / ||h_t||``;
   with ``adaptive`` (ASAM, Kwon et al. 2021, as in the official code) ``eps = rho T^2 g / ||T g||`` with
   ``T = |w| + eta`` elementwise;
3. the task's gradient at its perturbed point (one extra forward and backward per task): the SAM gradient
   ``g_t^SAM`` (shared) and ``h_t^SAM`` (its head); the parameters are then restored exactly;
4. the *flat direction* ``f_t = g_t^SAM - g_t``; the chosen gradient aggregator is applied separately to the
   loss gradients ``J`` and to the flat gradients ``F`` and the two results are added:
   ``update_sh = agg(J) + agg(F)``;
5. every head follows its own SAM gradient ``h_t^SAM`` (weight 1).

Defaults: ``rho = 2.0`` and ``adaptive = True`` are the official code's settings for every benchmark (NYUv2 and
CityScapes argparse defaults, CelebA config, Multi-MNIST ``run.sh``; only the Multi-MNIST argparse default is
rho 0.05 non-adaptive, overridden by its run script). ``rho_head`` defaults to ``rho`` (the code uses one ``--rho``
for both parts, with separate normalisation as in Algorithm 1). ``eta = 0``: the official code scales by ``|w|``
without ASAM's ``eta`` (ASAM itself uses 0.01; set ``eta`` to reproduce it). The norm guard 1e-12 is the code's.
``aggregator = "ew"`` (the sum of task gradients) is mtlbench's default; the paper evaluates MGDA, PCGrad, CAGrad,
IMTL, Nash-MTL and FairGrad. Any registered :class:`~mtlbench.optim.JacobianMethod` can be named; two separate
instances are built (one for J, one for F) so stateful aggregators keep separate states.

Switches for ablations: ``mode = "direct"`` aggregates the raw SAM gradients ``agg(J^SAM)`` instead (the paper's
"Ours (direct)" ablation, the official code's ``a-<method>``); ``perturb_heads = False`` perturbs the shared
parameters only (the heads' SAM gradients are then taken at the perturbed shared, unperturbed head point).

Assumptions where the paper leaves room:
- BatchNorm running statistics are frozen during the perturbed passes (the official code sets BN momentum to 0;
  we save every model buffer before them and restore it bitwise after, which also leaves ``num_batches_tracked``
  untouched); BN stays in training mode so the perturbed passes normalise with batch statistics, as SAM does.
- The extra forwards run through ``ctx.forward()`` on the same batch. Dropout masks (if an arch uses dropout) are
  redrawn from torch's global generator in each pass, as in the official code; the loop seeds it, so a run stays
  reproducible. The aggregators draw from ``ctx.generator``: first the loss aggregation, then the flat one.
- The flat aggregator is given the per-task sharpness ``L_t(theta + eps^t) - L_t(theta)`` as its "losses" (the
  flat gradient is, to first order, the gradient of that sharpness); aggregators that read only ``J`` ignore it.
- The aggregator's own head weighting (``head_weights``) is not used: heads follow their SAM gradient, as in
  Algorithm 1. ``last_weights`` logs the loss aggregation's task weights (None when the aggregator gives none);
  the flat aggregation's weights are kept in ``last_flat_weights``.
- Exact restoration: parameters are perturbed through ``param.data`` and copied back from clones (bitwise), so
  the step's autograd graph stays valid; gradients of parameters a task does not reach count as zero.

Cost per step: one forward and T per-task gradients (the Jacobian) plus T extra forwards and T full backwards.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

import torch

from mtlbench import MTLOptimizer, MtlbenchError, StepContext, option_field, register_optimizer
from mtlbench import registry
from mtlbench.optim import JacobianMethod

NORM_EPS = 1e-12  # the official code's guard in rho / (||g|| + 1e-12)


def sam_perturbation(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None], rho: float,
                     adaptive: bool = False, eta: float = 0.0) -> list[torch.Tensor]:
    """The SAM / ASAM ascent step for one group of parameters (normalised over the whole group).

    SAM: ``eps = rho g / ||g||``. ASAM (``adaptive``): ``eps = rho T^2 g / ||T g||`` with ``T = |w| + eta``.
    A missing gradient (None) counts as zero.
    """
    with torch.no_grad():
        gs = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
        if adaptive:
            scales = [p.detach().abs() + eta for p in params]
            scaled = [s * g for s, g in zip(scales, gs)]
        else:
            scales, scaled = None, gs
        if not scaled:
            return []
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
        factor = rho / (norm + NORM_EPS)
        if adaptive:
            assert scales is not None
            return [s * s * g * factor for s, g in zip(scales, gs)]
        return [g * factor for g in gs]


def fmtl_update(J: torch.Tensor, J_sam: torch.Tensor, loss_aggregator: JacobianMethod,
                flat_aggregator: JacobianMethod, losses: torch.Tensor, sharpness: torch.Tensor,
                generator: torch.Generator | None = None, mode: str = "decomposed",
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The shared update of F-MTL from the loss-gradient Jacobian ``J`` and the SAM-gradient Jacobian ``J_sam``
    (both ``[T, P]``): ``agg(J) + agg(J_sam - J)`` (``mode="decomposed"``, the paper's method) or ``agg(J_sam)``
    (``mode="direct"``, its ablation). Returns ``(update, loss weights, flat weights)``."""
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    if mode == "direct":
        update, w = loss_aggregator.aggregate(J_sam, losses + sharpness, generator)
        return update, w, None
    if mode != "decomposed":
        raise ValueError(f"mode must be 'decomposed' or 'direct', got {mode!r}")
    u_loss, w_loss = loss_aggregator.aggregate(J, losses, generator)
    u_flat, w_flat = flat_aggregator.aggregate(J_sam - J, sharpness, generator)
    return u_loss + u_flat, w_loss, w_flat


def _aggregator_entry(name: str) -> registry.Entry:
    """The registry entry of a gradient aggregator; one line if the name is unknown or not a JacobianMethod."""
    entry = registry.get("optimizer", name)  # unknown name: MtlbenchError listing the valid ones
    if not (isinstance(entry.obj, type) and issubclass(entry.obj, JacobianMethod)):
        jac = [e.name for e in registry.entries("optimizer")
               if isinstance(e.obj, type) and issubclass(e.obj, JacobianMethod)]
        raise MtlbenchError(f"aggregator '{name}' is not a gradient aggregator (a JacobianMethod working on "
                            f"per-task gradients); valid: {', '.join(jac)}")
    return entry


def _write_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    g = g.detach()
    if p.grad is None:
        p.grad = g.clone()
    else:
        p.grad.add_(g)


@register_optimizer("fmtl")
class FMTL(MTLOptimizer):
    """F-MTL (Phan et al., arXiv 2211.13723): per-task SAM; aggregate loss and flat gradients separately, add."""

    requires = frozenset({"shared_grads"})

    @dataclass
    class Options:
        aggregator: str = option_field("ew", "gradient aggregator (a registered JacobianMethod) applied to the "
                                             "loss and to the flat gradients")
        aggregator_options: dict[str, Any] = option_field({}, "options of the aggregator, e.g. {\"reduction\": "
                                                              "\"mean\"} for pcgrad")
        rho: float = option_field(2.0, "SAM radius of the shared parameters (official code: 2, adaptive)")
        rho_head: float | None = option_field(None, "SAM radius of the task heads (unset: rho)")
        adaptive: bool = option_field(True, "ASAM scaling |w| + eta of the perturbation (official code: on)")
        eta: float = option_field(0.0, "ASAM's eta (official F-MTL code: 0; ASAM paper: 0.01)")
        perturb_heads: bool = option_field(True, "perturb each task's own head too (Algorithm 1)")
        mode: Literal["decomposed", "direct"] = option_field(
            "decomposed", "decomposed: agg(J) + agg(J_sam - J) (the paper); direct: agg(J_sam) (its ablation)")

        def __post_init__(self) -> None:
            if not self.rho > 0:
                raise ValueError(f"rho must be > 0, got {self.rho}")
            if self.rho_head is not None and not self.rho_head > 0:
                raise ValueError(f"rho_head must be > 0 (or unset: same as rho), got {self.rho_head}")
            if not self.eta >= 0:
                raise ValueError(f"eta must be >= 0, got {self.eta}")
            if self.mode not in ("decomposed", "direct"):
                raise ValueError(f"mode must be 'decomposed' or 'direct', got {self.mode!r}")
            try:
                entry = _aggregator_entry(self.aggregator)
                entry.resolve_options(dict(self.aggregator_options))
            except MtlbenchError as exc:
                raise ValueError(f"bad aggregator: {exc}") from exc

    def __init__(self, task_names: tuple[str, ...], options: Any = None) -> None:
        super().__init__(task_names, options if options is not None else self.Options())
        o = self.options
        try:
            entry = _aggregator_entry(o.aggregator)
            resolved = entry.resolve_options(dict(o.aggregator_options))
        except MtlbenchError as exc:
            raise MtlbenchError(f"optimizer 'fmtl': bad aggregator: {exc}") from exc
        # two independent instances: stateful aggregators keep one state for J and one for the flat gradients
        self.loss_aggregator: JacobianMethod = entry.obj(self.task_names,
                                                         registry.build_options(entry.options_class, resolved))
        self.flat_aggregator: JacobianMethod = entry.obj(self.task_names,
                                                         registry.build_options(entry.options_class, resolved))
        for role, agg in (("loss-gradient", self.loss_aggregator), ("flat-gradient", self.flat_aggregator)):
            agg.warn_once = self._forward_warning(role)  # type: ignore[method-assign]
        self.last_flat_weights: torch.Tensor | None = None
        self.last_sharpness: torch.Tensor | None = None

    def _forward_warning(self, role: str):
        def warn(key: str, message: str) -> None:
            self.warn_once(f"{role}:{key}", f"fmtl ({role} aggregation with '{self.options.aggregator}'): "
                                            f"{message}")
        return warn

    def parameters(self):
        return self.loss_aggregator.parameters() + self.flat_aggregator.parameters()

    # -- the step -------------------------------------------------------------------------------------------
    def step(self, ctx: StepContext) -> None:
        o = self.options
        rho_head = o.rho if o.rho_head is None else o.rho_head
        T = ctx.n_tasks
        shared = ctx.shared_params
        J = ctx.jacobian().detach()
        clean_losses = ctx.loss_values
        head_grads = list(ctx.head_grads()) if o.perturb_heads else None
        sizes = [p.numel() for p in shared]

        J_sam = torch.empty_like(J)
        head_sam: list[list[torch.Tensor]] = []
        perturbed = torch.empty_like(clean_losses)
        shared_orig = [p.detach().clone() for p in shared]
        buffers = [(b, b.detach().clone()) for b in ctx.model.buffers()]
        try:
            for t in range(T):
                heads = ctx.task_params[t]
                eps_sh = sam_perturbation(shared, [r.view_as(p) for r, p in zip(J[t].split(sizes), shared)],
                                          o.rho, o.adaptive, o.eta)
                eps_head = (sam_perturbation(heads, head_grads[t], rho_head, o.adaptive, o.eta)
                            if head_grads is not None else [])
                head_orig = [p.detach().clone() for p in heads] if eps_head else []
                try:
                    with torch.no_grad():
                        for p, e in zip(shared, eps_sh):
                            p.data.add_(e)
                        for p, e in zip(heads, eps_head):
                            p.data.add_(e)
                    with torch.enable_grad():
                        _, losses = ctx.forward()
                        grads = torch.autograd.grad(losses[t], [*shared, *heads], allow_unused=True)
                finally:  # exact restoration, whatever happened in the pass
                    with torch.no_grad():
                        for p, p0 in zip(shared, shared_orig):
                            p.data.copy_(p0)
                        for p, p0 in zip(heads, head_orig):
                            p.data.copy_(p0)
                perturbed[t] = losses[t].detach()
                g_sh = [torch.zeros_like(p) if g is None else g for p, g in zip(shared, grads[:len(shared)])]
                J_sam[t] = torch.cat([g.reshape(-1) for g in g_sh])
                head_sam.append([torch.zeros_like(p) if g is None else g
                                 for p, g in zip(heads, grads[len(shared):])])
        finally:
            with torch.no_grad():
                for b, b0 in buffers:
                    b.data.copy_(b0)

        sharpness = perturbed - clean_losses
        update, w_loss, w_flat = fmtl_update(J, J_sam, self.loss_aggregator, self.flat_aggregator,
                                             clean_losses, sharpness, ctx.generator, o.mode)
        offset = 0
        for p, n in zip(shared, sizes):
            _write_grad(p, update[offset:offset + n].view_as(p))
            offset += n
        for heads, grads in zip(ctx.task_params, head_sam):
            for p, g in zip(heads, grads):
                _write_grad(p, g)
        self.last_weights = None if w_loss is None else w_loss.detach()
        self.last_flat_weights = None if w_flat is None else w_flat.detach()
        self.last_sharpness = sharpness

    # -- hooks and state: forwarded to both aggregator instances ------------------------------------------------
    @contextlib.contextmanager
    def only(self, index: list[int] | None) -> Iterator[None]:
        """Absent tasks (issue 16) are left out of both aggregators' steps and state too."""
        with super().only(index), self.loss_aggregator.only(index), self.flat_aggregator.only(index):
            yield

    def after_step(self, ctx: StepContext) -> None:
        self.loss_aggregator.after_step(ctx)
        self.flat_aggregator.after_step(ctx)

    def end_epoch(self, epoch: int, train_losses: dict[str, float]) -> None:
        self.loss_aggregator.end_epoch(epoch, train_losses)
        self.flat_aggregator.end_epoch(epoch, train_losses)

    def state_dict(self) -> dict[str, Any]:
        return {"loss_aggregator": self.loss_aggregator.state_dict(),
                "flat_aggregator": self.flat_aggregator.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_aggregator.load_state_dict(state.get("loss_aggregator", {}))
        self.flat_aggregator.load_state_dict(state.get("flat_aggregator", {}))
