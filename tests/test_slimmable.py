"""The controllable slimmable arch (issue 11): slim layers, exact analytical FLOPs, the search's properties, the
sandwich rule and CIKD, BN recalibration, the evaluation grid in a run record, controllability, every MTL
optimizer, and the bad inputs (one line each)."""
from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtlbench import registry
from mtlbench.errors import MtlbenchError
from mtlbench.optim import StepContext, check_compatible
from mtlbench.registry import build_options
from mtlbench.results.controllable import controllability
from mtlbench.vision import slim
from mtlbench.vision.slim_search import Config, check_preference, preference_grid, search

from test_vision_archs import build_image_arch, tiny_scenes  # noqa: F401  (fixture)

TINY = {"encoder": "segnet", "depth": 2, "width": 4}


@pytest.fixture(scope="module")
def three(tiny_scenes):  # noqa: F811
    return tiny_scenes.select_tasks(("seg", "depth", "normal"))


@pytest.fixture(scope="module")
def model(three):
    torch.manual_seed(0)
    return build_image_arch("slimmable", three, **TINY)


def _batch(data, n=4):
    return {k: v[:n] for k, v in data.splits["train"].tensors.items()}


# ------------------------------------------------------------------------------------------------- layers
def test_slim_conv_and_linear_are_prefix_slices():
    torch.manual_seed(0)
    conv = slim.SlimConv2d(6, 8, 3, padding=1)
    x = torch.randn(2, 4, 5, 5)
    ref = F.conv2d(x, conv.weight[:5, :4], conv.bias[:5], padding=1)
    torch.testing.assert_close(conv(x, 5), ref, rtol=0, atol=0)
    assert conv.macs((x, 5), conv(x, 5)) == 5 * 5 * 5 * 4 * 9 * 2  # H W c_out c_in k^2, times the 2 samples
    lin = slim.SlimLinear(6, 8)
    y = torch.randn(3, 2)
    torch.testing.assert_close(lin(y, 3), y @ lin.weight[:3, :2].T + lin.bias[:3], rtol=0, atol=0)


def test_slim_bn_updates_only_its_prefix_and_averages_when_recalibrating():
    bn = slim.SlimBatchNorm2d(8)
    x = torch.randn(16, 3, 4, 4) * 3 + 2
    bn.train()
    bn.stats = "off"
    bn(x)
    assert torch.equal(bn.running_mean, torch.zeros(8))          # sub-network pass: statistics untouched
    bn.reset_running_stats()
    bn.stats = "average"
    a, b = x[:8], x[8:]
    bn(a), bn(b)
    expect = (a.mean((0, 2, 3)) + b.mean((0, 2, 3))) / 2         # the plain average of the two batches' means
    torch.testing.assert_close(bn.running_mean[:3], expect, rtol=1e-5, atol=1e-6)
    assert torch.equal(bn.running_mean[3:], torch.zeros(5)) and torch.equal(bn.running_var[3:], torch.ones(5))


@pytest.mark.parametrize("w,c", [(0.25, 2), (0.5, 4), (0.75, 6), (1.0, 8), (0.01, 1)])
def test_channels(w, c):
    assert slim.channels(8, w) == c


# -------------------------------------------------------------------------------------------------- FLOPs
def test_flops_table_is_exact_for_every_configuration(model, three):
    table = model.flops_table()
    rng = random.Random(0)
    for _ in range(6):
        cfg = Config(rng.choice(model.widths), tuple(rng.choice(model.widths) for _ in model.task_names))
        with model.use(cfg):
            assert model.flops()["flops"] == table.flops(cfg)


def test_flops_hand_count_of_the_narrowest_configuration(three):
    """SegNet depth 2, width 4 at 16x16, every width 0.25 (1 and 2 channels), decoders of 4 channels at 0.25
    (1 channel), 2 layers, then 1x1 to the task's outputs: count every conv by hand."""
    torch.manual_seed(0)
    m = build_image_arch("slimmable", three, **TINY)
    P, Q = 16 * 16, 8 * 8     # pixels at level 0 and 1
    c0, c1 = 1, 2             # channels(4, .25), channels(8, .25)
    enc = (P * c0 * 3 * 9 + P * c0 * c0 * 9                   # level 0: 3 -> c0, c0 -> c0
           + Q * c1 * c0 * 9 + 2 * Q * c1 * c1 * 9            # level 1: c0 -> c1, 2x c1 -> c1
           + Q * c0 * c1 * 9 + 2 * Q * c0 * c0 * 9            # decoder level 1: c1 -> c0, 2x c0 -> c0
           + P * c0 * c0 * 9 + P * c0 * c0 * 9)               # decoder level 0: c0 -> c0, c0 -> c0
    h = 1                                                     # decoder hidden channels(4, .25)
    dec = {t.name: P * (h * c0 * 9 + h * h * 9 + t.output_dim * h) for t in three.tasks}
    assert m.flops_table().flops(m.narrow) == 2 * (enc + sum(dec.values()))


# ------------------------------------------------------------------------------------------------- search
def test_search_properties_budget_exact_monotone_and_fast(model):
    table = model.flops_table()
    rng = np.random.default_rng(0)
    T = len(model.task_names)
    times = []
    for rule in ("log_compute", "widest_encoder"):
        for _ in range(150):
            r = rng.dirichlet(np.ones(T))
            if rng.random() < 0.3:
                r = np.round(r * 4) / 4  # ties
                if r.sum() == 0:
                    continue
                r = r / r.sum()
            budget = rng.uniform(table.minimum, table.full * 1.05)
            t0 = time.perf_counter()
            cfg = search(table, budget, r, rule)
            times.append(time.perf_counter() - t0)
            assert table.flops(cfg) <= budget
            for i in range(T):
                for j in range(T):
                    if r[i] > r[j] + 1e-6:
                        assert cfg.decoders[i] >= cfg.decoders[j], (r, cfg)
                    elif abs(r[i] - r[j]) <= 1e-6:
                        assert cfg.decoders[i] == cfg.decoders[j], (r, cfg)
            # nothing cheaper was left on the table: no single widening of a part that keeps the order fits
    assert search(table, table.full, [1 / 3] * 3) == model.full
    assert search(table, table.minimum, [1, 0, 0]) == model.narrow
    assert float(np.median(times)) < 0.05  # interactive: milliseconds per request (generous for a loaded CI box)


def test_preference_grid():
    g3 = preference_grid(3)
    assert len(g3) == 15 and all(abs(sum(r) - 1) < 1e-12 for r in g3)
    g5 = preference_grid(5)
    assert len(g5) == 6 and g5[0][0] == 0.7 and g5[-1] == (0.2,) * 5


# -------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("pref,match", [
    ([0.5, 0.6, -0.1], "non-negative"),
    ([0.5, 0.2, 0.2], "sums to 0.9"),
    ([0.5, 0.5], "has 2 values"),
])
def test_bad_preference_is_one_line(model, pref, match):
    with pytest.raises(MtlbenchError, match=match) as e:
        model.configure(0.5, pref)
    assert "\n" not in str(e.value) and "seg, depth, normal" in str(e.value)


def test_budget_below_the_narrowest_names_the_minimum(model):
    table = model.flops_table()
    with pytest.raises(MtlbenchError, match=f"below the narrowest.*give at least {table.minimum:,}"):
        model.configure(0.5 * table.minimum / table.full, [1 / 3] * 3)


def test_unknown_width_is_one_line(model, three):
    with pytest.raises(MtlbenchError, match=r"unknown encoder width 0.3: .* 0.25, 0.5, 0.75, 1"):
        with model.use(Config(0.3, (1.0, 1.0, 1.0))):
            pass
    e = registry.get("arch", "slimmable", modality="image")
    with pytest.raises(MtlbenchError, match=r"width multipliers must be in \(0, 1\], got 1.5"):
        e.resolve_options({"widths": [0.5, 1.5]})
    with pytest.raises(MtlbenchError, match="segnet encoder only"):
        e.resolve_options({"encoder": "resnet"})


def test_non_slimmable_arch_asked_for_a_budget_is_one_line(capsys):
    from mtlbench.cli import main

    assert main(["search", "--dataset", "scenes", "--arch", "shared_bottom", "--budget", "0.5",
                 "--preference", "0.5,0.25,0.25", "--tasks", "seg,depth,normal", "-D", "resolution=16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not controllable" in err and "slimmable" in err


# --------------------------------------------------------------------------------------- training step
def test_sandwich_losses_sum_the_configurations_and_cikd_is_an_aux_loss(three):
    torch.manual_seed(0)
    m = build_image_arch("slimmable", three, **TINY)
    m.train()
    batch = _batch(three)
    out = m(batch)
    cfgs = m._cfgs
    assert len(out.features) == 4 and cfgs[0] == m.full and cfgs[1] == m.narrow
    assert [f.shape[1] for f in out.features[:2]] == [4, 1]
    losses = m.task_losses(out.outputs, batch)
    # the same sub-networks run one by one with batch statistics give the same summed losses
    from mtlbench.vision.dense import dense_loss

    z_in = m.shared["input"](batch)
    for i, t in enumerate(three.tasks):
        total = 0.0
        for c in cfgs:
            z = m.shared["encoder"](z_in, c.encoder)
            total = total + dense_loss(t, m.heads[t.name]["decoder"](z, c.decoders[i]), batch, i)
        torch.testing.assert_close(losses[i], total, rtol=1e-5, atol=1e-6)
    # CIKD: a loss of the narrower encoders only (teacher without gradient), none on the heads
    assert out.aux is not None and float(out.aux.detach()) > 0
    g = torch.autograd.grad(out.aux, out.features, retain_graph=True, allow_unused=True)
    assert g[0] is None and all(x is not None for x in g[1:])
    heads = [p for ps in m.task_parameters().values() for p in ps]
    assert all(x is None for x in torch.autograd.grad(out.aux, heads, allow_unused=True, retain_graph=True))
    # an extra forward of the same step (FAMO, F-MTL) reuses its configurations
    m(batch)
    assert m._cfgs == cfgs
    off = build_image_arch("slimmable", three, cikd_weight=0.0, **TINY)
    off.train()
    assert off(batch).aux is None


def test_static_model_trains_its_one_configuration(three):
    m = build_image_arch("slimmable", three, fixed_budget=0.5, **TINY)
    table = m.flops_table()
    assert m.fixed == search(table, 0.5 * table.full, [1 / 3] * 3)
    m.train()
    out = m(_batch(three))
    assert len(out.features) == 1 and out.aux is None
    assert m.flops()["flops"] == table.flops(m.fixed) <= 0.5 * table.full


OPTIMIZERS = registry.names("optimizer")
# the options that read the shared representation (ctx.feature_grads(), the declared feature layouts) or otherwise
# change what a method sees: with the sandwich rule there is one feature tensor per configuration, of different
# channel widths (defaults of gradnorm and rep_mtl already read it; they are covered by the loop over OPTIMIZERS)
REP_OPTIONS = [("mgda", {"rep": True}), ("mgda", {"rep": True, "weight_heads": True}),
               ("mgda", {"rep": True, "normalization": "loss+"}), ("imtl", {"rep": True}),
               ("imtl", {"rep": True, "mode": "grad"}), ("gradnorm", {"grad_source": "shared_params"}),
               ("rep_mtl", {"feature_indices": [0, 1]}), ("rep_mtl", {"log_losses": True}),
               ("rep_mtl", {"csa": False})]


def _method(m, opt, options):
    e = registry.get("optimizer", opt)
    method = e.obj(tuple(m.loss_tasks()), build_options(e.options_class, e.resolve_options(options)))
    check_compatible(method, m, opt, "slimmable")
    return method


@pytest.mark.parametrize("opt,options", [(o, {}) for o in OPTIMIZERS] + REP_OPTIONS,
                         ids=[o for o in OPTIMIZERS] + [f"{o}-{','.join(f'{k}={v}' for k, v in x.items())}"
                                                        for o, x in REP_OPTIONS])
def test_every_optimizer_steps_the_slimmable_arch(opt, options, three):
    torch.manual_seed(0)
    m = build_image_arch("slimmable", three, n_random=1, **TINY)
    method = _method(m, opt, options)
    params = list(m.parameters()) + list(method.parameters())
    adam = torch.optim.Adam(params, lr=1e-3)
    before = [p.detach().clone() for p in m.shared_parameters()]
    gen = torch.Generator().manual_seed(0)
    m.train()
    for step in range(2):
        batch = _batch(three)  # a new batch object per step, as the loader gives: new random configurations

        def fwd(b=batch):
            o = m(b)
            return o, m.task_losses(o.outputs, b)
        out, losses = fwd()
        # several feature tensors of different widths (full, narrowest, one random) reach the method
        assert len(out.features) == 3 and out.features[0].shape[1] == 4 and out.features[1].shape[1] == 1
        adam.zero_grad(set_to_none=True)
        ctx = StepContext(m, batch, out, losses, fwd, gen, step, 1)
        method.step(ctx)
        ctx.apply_aux()
        assert ctx._aux_done[0]
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.shared_parameters())
        adam.step()
        method.after_step(ctx)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, m.shared_parameters()))


def _alone(m, batch, config):
    """One sub-network run alone (training mode, batch statistics, buffers untouched): its encoder output (through an
    identity node, as the arch exposes it) and its task losses."""
    from mtlbench.vision.arch import ImageArch

    with slim.stats_mode(m, "off"):
        z = m.shared["encoder"](m.shared["input"](batch), config.encoder)
        z = z.view_as(z)
        outs = [m.heads[t]["decoder"](z, config.decoders[i]) for i, t in enumerate(m.task_names)]
    return z, ImageArch.task_losses(m, outs, batch)


def _sandwich_step(three, opt, options):
    torch.manual_seed(0)
    m = build_image_arch("slimmable", three, n_random=1, **TINY)
    method = _method(m, opt, options)
    m.train()
    batch = _batch(three)
    with slim.stats_mode(m, "off"):
        out = m(batch)
    losses = m.task_losses(out.outputs, batch)
    ctx = StepContext(m, batch, out, losses, lambda: None, torch.Generator().manual_seed(0), 0, 1)
    alone = [_alone(m, batch, c) for c in m._cfgs]
    return m, method, batch, out, ctx, alone


def test_representation_gradients_are_each_sub_network_s_own(three):
    """What MGDA-UB, IMTL (rep) and GradNorm (features) read under the sandwich rule: per task, one gradient per
    configuration's feature tensor, equal to that sub-network's own dL_t/dz (so their Gramian is the sum over the
    sub-networks of each one's Gramian); and the task losses reach the shared parameters only through these tensors,
    the premise of MGDA-UB's bound |sum_t a_t g_t| <= |d(z_1..z_K)/d theta| |sum_t a_t dL_t/dz|."""
    m, method, batch, out, ctx, alone = _sandwich_step(three, "ew", {})
    fg = ctx.feature_grads()
    K = len(m._cfgs)
    assert len(alone) == K == 3 and len({f.shape[1] for f in out.features}) > 1
    for t in range(len(m.task_names)):
        for k, (z, ls) in enumerate(alone):
            (own,) = torch.autograd.grad(ls[t], z, retain_graph=True)
            torch.testing.assert_close(fg[t][k], own, rtol=1e-4, atol=1e-7)
    direct = torch.stack([torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for p, g in zip(
        ctx.shared_params, torch.autograd.grad(l, ctx.shared_params, retain_graph=True, allow_unused=True))])
        for l in ctx.losses])
    torch.testing.assert_close(ctx.jacobian(), direct, rtol=1e-4, atol=1e-7)


def test_mgda_ub_on_the_sandwich_is_the_min_norm_point_of_the_summed_gramian(three):
    """MGDA-UB (mgda rep=true): alpha is the min-norm weights of sum_k G_k (G_k the Gramian of sub-network k's
    feature gradients), the shared update is sum_t alpha_t g_t plus CIKD's gradient, each head follows its own
    loss."""
    m, method, batch, out, ctx, alone = _sandwich_step(three, "mgda", {"rep": True})
    T = len(m.task_names)
    G = torch.zeros(T, T, dtype=torch.float64)
    for z, ls in alone:
        Zk = torch.stack([torch.autograd.grad(l, z, retain_graph=True)[0].reshape(-1) for l in ls]).double()
        G += Zk @ Zk.T
    alpha = method.weights(G, ctx.loss_values)
    J = ctx.jacobian()
    aux = torch.autograd.grad(out.aux, ctx.shared_params, retain_graph=True, allow_unused=True)
    aux = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                     for p, g in zip(ctx.shared_params, aux)])
    heads = [torch.autograd.grad(l, ps, retain_graph=True, allow_unused=True)
             for l, ps in zip(ctx.losses, ctx.task_params)]
    method.step(ctx)
    ctx.apply_aux()
    torch.testing.assert_close(method.last_weights.double().cpu(), alpha, rtol=1e-4, atol=1e-6)
    got = torch.cat([p.grad.reshape(-1) for p in ctx.shared_params])
    want = alpha.float() @ J + aux
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))
    for ps, gs in zip(ctx.task_params, heads):
        for p, g in zip(ps, gs):
            if g is not None:
                torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)


def test_rep_mtl_on_the_sandwich_averages_each_sub_network_s_regularisers(three):
    """Rep-MTL: each configuration's saliency is its own sub-network's (its tensor feeds only its decoders), and
    the regularisers are the mean over the configurations of Rep-MTL's regularisers of each sub-network alone,
    while the task losses are summed over them (so lambda weighs each sub-network's regulariser 1/K)."""
    from mtlbench.baselines.optimizers.rep_mtl import rep_mtl_regularisers
    from mtlbench.vision.arch import map_layout

    m, method, batch, out, ctx, alone = _sandwich_step(three, "rep_mtl", {})
    assert len(m.feature_layouts()) == len(out.features)
    per = [rep_mtl_regularisers(ls, (z,), 4, layouts=[map_layout()]) for z, ls in alone]
    method.step(ctx)
    for key in ("tsr", "csa"):
        want = float(torch.stack([r[key].detach() for r in per]).mean())
        assert method.last_regularisers[key] == pytest.approx(want, rel=1e-4, abs=1e-6)


# ------------------------------------------------------------------------------------ grid and record
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny stored runs of one protocol: the controllable model, a static one at 50 %, and the single baseline."""
    from mtlbench.spec import build_spec
    from mtlbench.train import run

    d = tmp_path_factory.mktemp("runs")
    recs = {}
    for name, arch, opts in (("ctl", "slimmable", {**TINY, "calib_batches": 1}),
                             ("static", "slimmable", {**TINY, "fixed_budget": 0.5}), ("single", "single", TINY)):
        spec = build_spec(dataset="scenes", tasks=("seg", "depth", "normal"), arch=arch, optimizer="ew",
                          dataset_options={"resolution": 16, "train": 8, "val": 4, "test": 4}, epochs=1,
                          batch_size=4, arch_options=opts, device="cpu")
        recs[name] = run(spec, d)[1]
    return d, recs


def test_run_record_holds_the_grid_and_controllability(runs):
    rec = runs[1]["ctl"]
    sec = rec["arch_info"]["controllable"]
    assert len(sec["grid"]) == 4 * 16  # 4 budgets x (15 lattice points + uniform)
    assert all(p["within_budget"] and p["flops"] <= p["budget_flops"] for p in sec["grid"])
    for c in sec["configs"]:
        assert set(c["metrics"]) == {"val", "test"} and set(c["metrics"]["test"]) == {"seg", "depth", "normal"}
    assert set(sec["controllability"]["per_budget"]) == {"0.25", "0.5", "0.75", "1"}
    assert rec["flops"]["flops"] == sec["full_flops"]
    static = runs[1]["static"]
    assert "controllable" not in static["arch_info"]
    assert static["flops"]["flops"] == static["arch_info"]["slimmable"]["fixed_flops"] <= 0.5 * sec["full_flops"]


def test_leaderboard_has_the_controllable_table_and_figures(runs, tmp_path):
    from mtlbench.results.report import write_leaderboard

    write_leaderboard(runs[0], tmp_path)
    md = (tmp_path / "leaderboard.md").read_text()
    section = md[md.index("## Controllable models"):]
    head = next(line for line in section.splitlines() if line.startswith("| method |")).split(" | ")
    row = next(line for line in section.splitlines() if line.startswith("| slimmable(") and "fixed_budget=0.0" in line)
    cells = row.split(" | ")
    assert cells[1] == "1" and cells[-2] == "0.000"  # one seed, no budget violation
    assert "fixed_budget=0.5" in section and "| e 0.75 / d 0.5,0.5,0.5 |" in section
    figs = sorted(p.name for p in (tmp_path / "figures").glob("*controllable*"))
    assert len(figs) == 2 and any("pareto" in f for f in figs)
    import json

    doc = json.loads((tmp_path / "leaderboard.json").read_text())
    (ct,) = doc["controllable"]
    ((label, (summary,)),) = ct["methods"].items()
    assert summary["violations"] == 0.0 and -1 <= summary["spearman"] <= 1
    # per budget, Spearman's rho and Kendall's tau side by side ("ρ / τ"), the values of the JSON
    per = [(h, c) for h, c in zip(head, cells) if h.startswith("ρ / τ @")]
    assert [h for h, _ in per] == ["ρ / τ @25%", "ρ / τ @50%", "ρ / τ @75%", "ρ / τ @100%"]
    for (h, c), b in zip(per, ("0.25", "0.5", "0.75", "1")):
        rho, tau = summary["per_budget"][b], summary["per_budget_kendall"][b]
        assert c == " / ".join("n/a" if v is None else f"{v:.3f}" for v in (rho, tau))
    # the same tables in leaderboard.tex (rho and tau as maths, every special character escaped) and html
    tex = (tmp_path / "leaderboard.tex").read_text()
    assert tex.count("controllable models.") == 1 and tex.count("dedicated (static) models.") == 1
    assert "$\\rho$ / $\\tau$ @25\\%" in tex and "ρ" not in tex and "τ" not in tex
    assert all(f" & {c} & " in tex for _, c in per)  # one seed: no "±" to escape
    page = (tmp_path / "leaderboard.html").read_text()
    assert "<th>ρ / τ @50%</th>" in page and f"<td data-v=\"{per[1][1]}\">" in page
    # Δm% needs a non-zero single-task baseline on every metric (a 1-epoch tiny run may have delta1 = 0: n/a)
    assert summary["delta_full"] is None or math.isfinite(summary["delta_full"])
    assert ct["equal_flops"][0]["config"] == {"encoder": 0.75, "decoders": {"seg": 0.5, "depth": 0.5, "normal": 0.5}}
    assert label in ct["equal_flops"][0]["at"]


def _section(gains_of):
    """A synthetic grid whose configuration for preference r has task gains gains_of(r) over the reference."""
    prefs = preference_grid(3)
    configs = [{"encoder": 1.0, "decoders": {"a": .25, "b": .25, "c": .25},
                "metrics": {"test": {t: {"m": 1.0} for t in "abc"}}}]
    grid = []
    for b in (0.5, 1.0):
        for r in prefs:
            g = gains_of(r)
            configs.append({"encoder": 1.0, "decoders": {}, "metrics": {"test": {t: {"m": 1.0 + x}
                                                                                  for t, x in zip("abc", g)}}})
            grid.append({"budget": b, "preference": list(r), "config": len(configs) - 1, "within_budget": True})
    return {"tasks": list("abc"), "budgets": [0.5, 1.0], "grid": grid, "configs": configs,
            "references": {"1": 0}, "primary_metrics": {t: "m" for t in "abc"},
            "directions": {t: "max" for t in "abc"}}


def test_controllability_definition():
    assert controllability(_section(lambda r: r))["spearman"] == pytest.approx(1.0)
    assert controllability(_section(lambda r: r))["kendall"] == pytest.approx(1.0)
    assert controllability(_section(lambda r: [-x for x in r]))["spearman"] == pytest.approx(-1.0)
    flat = controllability(_section(lambda r: [0.1, 0.1, 0.1]))
    assert flat["spearman"] == 0.0 and flat["per_budget"]["0.5"]["n"] == 15
    # a lower-is-better metric flips the gain's sign
    sec = _section(lambda r: [-x for x in r])
    sec["directions"] = {t: "min" for t in "abc"}
    assert controllability(sec)["spearman"] == pytest.approx(1.0)


def test_raising_a_tasks_preference_never_narrows_its_decoder(model):
    """Across requests (not guaranteed by construction, unlike the order within one configuration): moving weight
    to task t, the others scaled down in proportion, at the same budget, never gives t a narrower decoder."""
    table = model.flops_table()
    rng = np.random.default_rng(1)
    T = len(model.task_names)
    for rule in ("log_compute", "widest_encoder"):
        for _ in range(300):
            r = rng.dirichlet(np.ones(T))
            b = rng.uniform(table.minimum, table.full)
            t = int(rng.integers(T))
            r2 = r * (1 - (r[t] + rng.uniform(0, 1 - r[t]))) / (1 - r[t])
            r2[t] = 1 - (r2.sum() - r2[t])
            assert search(table, b, r2, rule).decoders[t] >= search(table, b, r, rule).decoders[t]
