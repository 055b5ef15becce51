"""Controllable slimmable multi-task network (Aich, Schulter, Roy-Chowdhury, Chandraker, Suh, "Efficient
Controllable Multi-Task Architectures", ICCV 2023, arXiv 2308.11744). No official code is public (checked: the
paper's page and GitHub); this follows the paper's abstract and Fig. 2 and says where we had to choose.

One network whose shared encoder and task decoders each run at a width multiplier from ``widths`` (default
{0.25, 0.5, 0.75, 1.0}); after training, a user's (compute budget, task preference) is turned into widths by
:func:`mtlbench.vision.slim_search.search` without retraining: preferred tasks get wider decoders, the encoder's
width sets the overall cost.

- Layers: prefix channel slicing (``mtlbench.vision.slim``); the encoder is the suite's SegNet (the only encoder
  defined slimmable here), each dense decoder ``decoder_layers`` 3x3 conv-BN-ReLU of ``decoder_width`` channels
  (0: the encoder's output channels) and a 1x1 prediction conv, each classification decoder pooled
  Linear-ReLU-Linear. Only the prediction layer's outputs and the image's channels are never sliced.
- Normalisation: BN with *per-configuration recalibration* (US-Nets, Yu & Huang ICCV 2019), not switchable BN
  (impossible with independent widths): training passes use batch statistics; the running statistics follow the
  SuperNet pass only, so the selected full-width model evaluates as usual; each configuration of the evaluation
  grid is evaluated after its statistics are recomputed as the plain average over ``calib_batches`` training
  batches (``calib_batches=0``: no recalibration, the ablation showing why it is needed).
- Training, the sandwich rule (slimmable nets / US-Nets, as the paper trains "the SuperNet collaboratively with the
  SubNets"): every step runs the widest configuration, the narrowest (``narrowest``) and ``n_random``
  configurations drawn uniformly (encoder and every decoder independently) from the width set; each task's loss is
  the sum of its losses over these configurations, so every MTL optimizer sees T losses as usual (and the record's
  training-loss curves are these sums).
- CIKD (configuration-invariant knowledge distillation): each narrower encoder's output matches the widest
  encoder's output on the same channels (prefix), teacher without gradient, with ``cikd_weight`` (beta; 0 turns it
  off): ``beta * sum_k mean_{b,h,w} || n(z_k) - n(z_full[:, :C_k]) ||^2`` with ``n`` the L2 normalisation over
  channels at each position (an assumption: the paper's exact distance could not be read; normalising makes the
  loss scale-free across widths). It touches shared parameters only and is added to the update *outside* the MTL
  aggregation (``ArchOutput.aux``): with EW this is exactly the paper's summed objective; with a loss-weighting
  method (UW, DWA, FAMO...) the task losses are re-weighted and CIKD is not; with a gradient method (MGDA,
  PCGrad, CAGrad, Nash-MTL, UPGrad...) the per-task gradients are those of the sandwich-summed task losses and CIKD's
  gradient is added to their aggregate unchanged. Methods needing an extra forward (FAMO, F-MTL, GradNorm) reuse
  the step's configurations (keyed on the batch object).
- Representation-level options (MGDA-UB ``mgda rep=true``, ``imtl rep=true``, GradNorm on ``features``, Rep-MTL):
  in training the arch exposes one feature tensor per configuration of the step, K = 1 + ``narrowest`` +
  ``n_random`` of them (the widest first, then the narrowest, then the random ones), with different channel counts
  and one declared ``[B, C, H, W]`` layout each. Tensor k feeds only configuration k's decoders, so ``dL_t/dz_k``
  is sub-network k's own gradient, and the sandwich-summed losses reach the shared parameters only through these K
  tensors (tested). Hence MGDA-UB and IMTL's ``rep`` build their Gramian over the K tensors flattened together,
  i.e. the sum of the sub-networks' representation Gramians, and MGDA-UB's bound
  ``|sum_t a_t g_t| <= |d(z_1..z_K)/d theta| |sum_t a_t dL_t/dz|`` holds as on one network (it bounds the update of
  the sandwich objective; tested: alpha is the min-norm point of that sum); GradNorm's feature-gradient norm is the
  norm over the K tensors. Rep-MTL computes its regularisers on each sub-network's own tensor (channel affinities
  never mix widths) and, by its rule for several tensors, averages them over the K while the task losses are
  summed over the K: each sub-network's regulariser weighs ``lambda / K`` against its losses (pass ``K * lambda``
  to match a one-network run); its ``feature_indices`` select configurations (0 the widest, 1 the narrowest when
  ``narrowest``; the random ones change every step). Every registered optimizer and each of these options runs
  with the sandwich rule (tests); we found no option whose maths the sandwich breaks, so none is refused. Where it
  is an approximation it is the method's own (MGDA-UB's bound, IMTL's feature gradients), not the sandwich's; the
  one choice that is ours is CIKD outside the aggregation (above). Loss transforms (Rep-MTL's ``log_losses``,
  DB-MTL's logs, IMTL-L's scales) apply to each task's sandwich-summed loss, not to each sub-network's.
- ``fixed_budget`` > 0: a *static* (dedicated) model for the comparison users ask about: the configuration the
  search picks for the uniform preference at that fraction of the full model's FLOPs is trained alone (no
  sandwich, no CIKD, no recalibration), i.e. an ordinary hard-sharing network of exactly those FLOPs.

Model selection: the full-width configuration's validation metrics (the record's metrics are the SuperNet's).
After training, ``evaluate_grid`` (called once by the training loop) evaluates the preference x budget grid on
the validation and test splits and stores it under ``arch_info.controllable`` (see ``docs`` in
:mod:`mtlbench.results.controllable` for controllability).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from mtlbench import register_arch
from mtlbench.arch import ArchOutput
from mtlbench.errors import MtlbenchError
from mtlbench.registry import option_field
from mtlbench.vision import slim
from mtlbench.vision.arch import ImageArch, map_layout
from mtlbench.vision.nets import EncoderOptions, count_macs
from mtlbench.vision.slim_search import (GRID_BUDGETS, RULES, Config, FlopsTable, check_widths, preference_grid,
                                         search)


@register_arch("slimmable")
class SlimmableMTL(ImageArch):
    """Controllable slimmable multi-task network (Aich et al., ICCV 2023): slimmable SegNet encoder and decoders,
    sandwich-rule training with CIKD, budget/preference search, evaluation grid."""

    encoders = ("segnet",)
    eval_batch_size = 256

    @dataclass
    class Options(EncoderOptions):
        widths: tuple[float, ...] = option_field((0.25, 0.5, 0.75, 1.0), "width multipliers of encoder and decoders")
        decoder_width: int = option_field(0, "decoder channels at width 1 (0: the encoder's output channels)",
                                          minimum=0)
        decoder_layers: int = option_field(2, "3x3 conv-BN-ReLU layers per dense decoder", minimum=1)
        n_random: int = option_field(2, "sandwich rule: random configurations per step", minimum=0)
        narrowest: bool = option_field(True, "sandwich rule: train the narrowest configuration every step")
        cikd_weight: float = option_field(1.0, "CIKD weight beta (0: off)", minimum=0.0)
        calib_batches: int = option_field(8, "BN recalibration batches per evaluated configuration (0: none)",
                                          minimum=0)
        search_rule: str = option_field("log_compute", "search rule: log_compute or widest_encoder")
        fixed_budget: float = option_field(0.0, "> 0: a static model at this fraction of the full FLOPs",
                                           minimum=0.0, maximum=1.0)
        grid: bool = option_field(True, "evaluate the preference x budget grid after training")
        grid_step: float = option_field(0.25, "simplex-lattice step of the grid's preferences (T <= 3)",
                                        minimum=0.0, open_minimum=True, maximum=1.0)
        grid_dominant: float = option_field(0.7, "the dominant weight of the grid's preferences for T > 3",
                                            minimum=0.0, open_minimum=True, maximum=1.0)

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.encoder != "segnet":
                raise ValueError(f"the slimmable arch is defined on the segnet encoder only, got {self.encoder!r}")
            try:
                check_widths(self.widths)
            except MtlbenchError as exc:
                raise ValueError(str(exc)) from None
            if self.search_rule not in RULES:
                raise ValueError(f"search_rule must be one of {', '.join(RULES)}, got {self.search_rule!r}")

    def __init__(self, schema, tasks, embed_dim, options=None):
        super().__init__(schema, tasks, embed_dim, options)
        o = self.o
        self.widths = tuple(float(w) for w in o.widths)
        self.shared["input"] = self.input_stage()
        self.shared["encoder"] = enc = slim.SlimSegNet(self.image.channels, o.width, o.depth)
        hidden = o.decoder_width or enc.out_channels
        for t in self.tasks:
            self.heads[t.name]["decoder"] = (
                slim.SlimDenseDecoder(enc.out_channels, hidden, t.output_dim, o.decoder_layers) if t.dense
                else slim.SlimClassDecoder(enc.out_channels, o.head_width or hidden, t.output_dim))
        T = len(self.tasks)
        self.full = Config.uniform(self.widths[-1], T)
        self.narrow = Config.uniform(self.widths[0], T)
        self._table: FlopsTable | None = None
        self.fixed: Config | None = None
        if o.fixed_budget > 0:
            table = self.flops_table()
            self.fixed = search(table, o.fixed_budget * table.full, [1.0 / T] * T, o.search_rule)
        self.active = self.fixed or self.full
        self._gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, (1,))))  # follows the run's seed
        self._last: tuple[Any, list[Config]] | None = None
        self._extra: tuple[Any, list[list[torch.Tensor]]] | None = None

    # -- configurations --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def use(self, config: Config) -> Iterator[None]:
        """Evaluate (eval mode) at ``config`` inside the block."""
        table = self.flops_table()
        table.flops(config)  # one line for an unknown width or a wrong number of decoders
        old, self.active = self.active, config
        try:
            yield
        finally:
            self.active = old

    def configure(self, budget: float, preference: list[float] | tuple[float, ...]) -> Config:
        """The configuration for ``budget`` (a fraction of the full model's FLOPs in (0, 1]) and ``preference``,
        made active for evaluation; see :func:`mtlbench.vision.slim_search.search`."""
        table = self.flops_table()
        if not (isinstance(budget, (int, float)) and 0 < budget <= 1):
            raise MtlbenchError(f"budget must be a fraction of the full model's FLOPs in (0, 1], got {budget!r}")
        self.active = search(table, budget * table.full, preference, self.o.search_rule)
        return self.active

    def _sample(self) -> Config:
        idx = torch.randint(0, len(self.widths), (1 + len(self.tasks),), generator=self._gen).tolist()  # host RNG
        return Config(self.widths[idx[0]], tuple(self.widths[i] for i in idx[1:]))

    def _configs(self, batch: dict[str, torch.Tensor]) -> list[Config]:
        if not self.training or self.fixed is not None:
            return [self.active]
        if self._last is not None and self._last[0] is batch:
            return self._last[1]  # an extra forward of the same step (FAMO, F-MTL, GradNorm): same sub-networks
        cfgs = [self.full] + ([self.narrow] if self.o.narrowest else []) + [self._sample()
                                                                           for _ in range(self.o.n_random)]
        self._last = (batch, cfgs)
        return cfgs

    def _stats(self, k: int) -> str:
        """BN running statistics: the first configuration of a training step (the SuperNet, or the fixed one)
        updates them; the sandwich's sub-networks use batch statistics only."""
        return "ema" if k == 0 else "off"

    # -- the contract ----------------------------------------------------------------------------------------
    def forward(self, batch):
        self._cfgs = self._configs(batch)
        out = super().forward(batch)
        aux = None
        if self.training and self.o.cikd_weight > 0 and len(out.features) > 1:
            teacher = out.features[0].detach()
            kd = [(F.normalize(z, dim=1) - F.normalize(teacher[:, :z.shape[1]], dim=1)).pow(2).sum(1).mean()
                  for z in out.features[1:]]
            aux = self.o.cikd_weight * torch.stack(kd).sum()
        return ArchOutput(out.outputs, out.features, aux)

    def encode(self, batch):
        x = self.shared["input"](batch)
        feats = []
        for k, c in enumerate(self._cfgs):
            with slim.stats_mode(self.shared, self._stats(k)) if self.training else contextlib.nullcontext():
                feats.append(self.shared["encoder"](x, c.encoder))
        return tuple(feats)

    def decode(self, features, batch):
        per_cfg = []
        for k, (z, c) in enumerate(zip(features, self._cfgs)):
            outs = []
            for i, t in enumerate(self.task_names):
                dec = self.heads[t]["decoder"]
                with slim.stats_mode(dec, self._stats(k)) if self.training else contextlib.nullcontext():
                    outs.append(dec(z, c.decoders[i]))
            per_cfg.append(outs)
        self._extra = (per_cfg[0][0] if per_cfg[0] else None, per_cfg[1:])
        return per_cfg[0]

    def task_losses(self, outputs, batch):
        """Each task's loss summed over the step's configurations (the sandwich rule)."""
        losses = super().task_losses(outputs, batch)
        if self._extra is not None and outputs and self._extra[0] is outputs[0]:
            for outs in self._extra[1]:
                losses = [a + b for a, b in zip(losses, super().task_losses(outs, batch))]
        return losses

    def feature_layouts(self):
        """One ``[B, C, H, W]`` map per configuration of the pass: the sandwich's in training, one in eval."""
        n = 1 if not self.training or self.fixed is not None else 1 + int(self.o.narrowest) + self.o.n_random
        return tuple(map_layout() for _ in range(n))

    # -- FLOPs -----------------------------------------------------------------------------------------------
    def flops_table(self) -> FlopsTable:
        """Exact analytical FLOPs per sample of the encoder at every width and of each decoder at every (encoder,
        decoder) width pair: |W|^2 forwards of one sample through :func:`count_macs`, once per model."""
        if self._table is not None:
            return self._table
        import numpy as np

        E, T = len(self.widths), len(self.tasks)
        enc, dec = np.zeros(E, dtype=np.int64), np.zeros((T, E, E), dtype=np.int64)
        C, H, W = self.image.shape
        device = next(self.parameters()).device
        dtype = torch.uint8 if self.image.dtype == "uint8" else torch.float32
        batch = {"images": torch.zeros(1, C, H, W, dtype=dtype, device=device),
                 "masks": torch.ones(1, T, dtype=torch.bool, device=device)}
        groups = {"shared": self.shared, **{f"task:{t}": self.heads[t] for t in self.task_names}}
        old = getattr(self, "active", self.full)
        try:
            for i, e in enumerate(self.widths):
                for j, d in enumerate(self.widths):
                    self.active = Config(e, (d,) * T)
                    counts = count_macs(self, lambda: self(batch), groups)
                    enc[i] = 2 * counts["shared"]
                    for t, name in enumerate(self.task_names):
                        dec[t, i, j] = 2 * counts[f"task:{name}"]
        finally:
            self.active = old
        self._table = FlopsTable(self.task_names, self.widths, enc, dec)
        return self._table

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        table = self.flops_table()
        info["slimmable"] = {"widths": list(self.widths), "flops_table": table.to_dict(),
                             "fixed_config": None if self.fixed is None else self.fixed.to_dict(self.task_names),
                             "fixed_flops": None if self.fixed is None else table.flops(self.fixed),
                             "normalisation": "BN, running statistics of the SuperNet pass; per-configuration "
                                              "recalibration for the evaluation grid"}
        return info

    # -- the evaluation grid ---------------------------------------------------------------------------------
    def recalibrate(self, config: Config, batches: list[dict[str, torch.Tensor]]) -> None:
        """Recompute every BN's running statistics at ``config`` as the plain average over ``batches``."""
        for m in slim.slim_norms(self):
            m.reset_running_stats()
        was = self.training
        self.train()
        try:
            with torch.no_grad(), slim.stats_mode(self, "average"):
                for b in batches:
                    z = self.shared["encoder"](self.shared["input"](b), config.encoder)
                    for i, t in enumerate(self.task_names):
                        self.heads[t]["decoder"](z, config.decoders[i])
        finally:
            self.train(was)

    def evaluate_grid(self, data: Any, device: str, evaluate: Callable[..., dict], batch_size: int
                      ) -> dict[str, Any]:
        """The preference x budget grid after training (once per run): for each grid point the searched
        configuration, its exact FLOPs, whether it is within the budget, and its validation and test metrics
        (each distinct configuration evaluated once, after BN recalibration); plus, per encoder width used, the
        reference configuration with every decoder at the narrowest width (controllability's baseline)."""
        if self.fixed is not None or not self.o.grid:
            return {}
        from mtlbench.loader import BatchLoader
        from mtlbench.results.controllable import controllability

        table = self.flops_table()
        T = len(self.tasks)
        prefs = preference_grid(T, self.o.grid_step, self.o.grid_dominant)
        uniform = tuple(1.0 / T for _ in range(T))
        if not any(max(abs(a - b) for a, b in zip(p, uniform)) < 1e-9 for p in prefs):
            prefs.append(uniform)  # the static models' preference: compared at equal configurations
        grid, configs, index = [], [], {}
        t0 = time.perf_counter()
        n_search = 0
        for b in GRID_BUDGETS:
            for r in prefs:
                c = search(table, b * table.full, r, self.o.search_rule)
                n_search += 1
                if c not in index:
                    index[c] = len(configs)
                    configs.append(c)
                f = table.flops(c)
                grid.append({"budget": b, "budget_flops": b * table.full, "preference": list(r), "config": index[c],
                             "flops": f, "within_budget": bool(f <= b * table.full)})
        search_ms = 1000 * (time.perf_counter() - t0) / n_search
        refs = {}
        for c in list(configs):
            ref = Config(c.encoder, (self.widths[0],) * T)
            if ref not in index:
                index[ref] = len(configs)
                configs.append(ref)
            refs[f"{c.encoder:g}"] = index[ref]
        calib = []
        if self.o.calib_batches:
            for i, b in enumerate(BatchLoader(data.splits["train"], batch_size, device=device)):
                if i >= self.o.calib_batches:
                    break
                calib.append(b)
        saved = slim.save_stats(self)
        val, test = data.splits["val"].to(device), data.splits["test"].to(device)
        rows = []
        try:
            for c in configs:
                if calib:
                    self.recalibrate(c, calib)
                with self.use(c):
                    rows.append({**c.to_dict(self.task_names), "flops": table.flops(c),
                                 "metrics": {"val": evaluate(self, data, val, device),
                                             "test": evaluate(self, data, test, device)}})
        finally:
            slim.load_stats(self, saved)
        primary = {t.name: t.primary_metric for t in self.tasks}
        from mtlbench.metrics import metric as metric_spec

        directions = {t.name: metric_spec(t.primary_metric).direction for t in self.tasks}
        section = {"tasks": list(self.task_names), "widths": list(self.widths), "search_rule": self.o.search_rule,
                   "calib_batches": self.o.calib_batches, "full_flops": table.full, "min_flops": table.minimum,
                   "budgets": list(GRID_BUDGETS), "preferences": [list(r) for r in prefs], "configs": rows,
                   "grid": grid, "references": refs, "search_ms_per_request": search_ms,
                   "primary_metrics": primary, "directions": directions}
        section["controllability"] = controllability(section, split="test")
        return {"controllable": section}
