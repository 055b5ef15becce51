"""Image archs: every registered image arch on tiny scenes: shapes, the shared/task partition, per-task gradients
through the declared features, declared layouts, analytical FLOPs; and the image-specific bad inputs."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mtlbench import registry
from mtlbench.errors import MtlbenchError
from mtlbench.registry import build_options
from mtlbench.spec import build_spec
from mtlbench.vision import nets

IMAGE_ARCHS = sorted(n for n in registry.names("arch") if "image" in registry.variants(n))
ENCODERS = [{"encoder": "segnet", "depth": 2, "width": 4}, {"encoder": "resnet", "depth": 2, "width": 4},
            {"encoder": "vit", "patch": 4, "depth": 2, "vit_dim": 8, "vit_heads": 2}]


@pytest.fixture(scope="module")
def tiny_scenes(tmp_path_factory):
    import os

    os.environ.setdefault("MTLBENCH_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    e = registry.get("dataset", "scenes")
    return e.obj(build_options(e.options_class, e.resolve_options(
        {"resolution": 16, "train": 8, "val": 4, "test": 4}))).load(0)


def build_image_arch(name, data, **options):
    e = registry.get("arch", name, modality="image")
    return e.obj(data.schema, data.tasks, 8, build_options(e.options_class, e.resolve_options(options)))


def _batch(data, n=6):
    return {k: v[:n] for k, v in data.splits["train"].tensors.items()}


def test_image_archs_registered():
    assert {"single", "shared_bottom"} <= set(IMAGE_ARCHS)


@pytest.mark.parametrize("enc", ENCODERS, ids=[e["encoder"] for e in ENCODERS])
@pytest.mark.parametrize("arch", IMAGE_ARCHS)
def test_contract(arch, enc, tiny_scenes):
    if enc["encoder"] not in registry.get("arch", arch, modality="image").obj.encoders:
        pytest.skip(f"{arch} is not defined on {enc['encoder']}")
    check_contract(arch, tiny_scenes, **enc)


def check_contract(arch, data, **options):
    torch.manual_seed(0)
    model = build_image_arch(arch, data, **options)
    model.train()
    batch = _batch(data)
    out = model(batch)
    for t, o in zip(data.tasks, out.outputs):
        assert o.shape == (6, t.output_dim, 16, 16) and torch.isfinite(o).all()
    # partition
    shared = {id(p) for p in model.shared_parameters()}
    per_task = [{id(p) for p in ps} for ps in model.task_parameters().values()]
    union = set(shared)
    for s in per_task:
        assert not (s & union)
        union |= s
    assert union == {id(p) for p in model.parameters()}
    assert bool(shared) == (arch != "single")
    # declared layouts match the feature tensors
    layouts = model.feature_layouts()
    assert len(layouts) == len(out.features)
    for f, lay in zip(out.features, layouts):
        assert f.shape[lay.batch_axis] == 6
        axes = {lay.batch_axis, lay.channel_axis, *lay.position_axes}
        assert axes == set(range(f.dim())), (f.shape, lay)
    # per-task gradients of the shared parameters via the features equal direct autograd
    losses = model.task_losses(out.outputs, batch)
    params = model.shared_parameters()
    for loss in losses if params else []:
        direct = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        fg = torch.autograd.grad(loss, out.features, retain_graph=True, allow_unused=True)
        fg = [torch.zeros_like(f) if g is None else g for f, g in zip(out.features, fg)]
        via = torch.autograd.grad(out.features, params, fg, retain_graph=True, allow_unused=True)
        for d, v in zip(direct, via):
            d = torch.zeros(1) if d is None else d
            v = torch.zeros(1) if v is None else v
            torch.testing.assert_close(d, v, rtol=1e-4, atol=1e-6)
    tp = model.task_parameters()
    for i, loss in enumerate(losses):
        for j, name in enumerate(model.task_names):
            if i != j and tp[name]:
                grads = torch.autograd.grad(loss, tp[name], retain_graph=True, allow_unused=True)
                assert all(g is None or float(g.abs().max()) == 0.0 for g in grads)
    f = model.flops()
    assert f["macs"] == f["shared_macs"] + sum(f["task_macs"].values()) > 0


@pytest.mark.parametrize("options", [{"shared_gate": False}, {"levels": 1}, {"levels": 3, "shared_experts": 2},
                                     {"levels": 4, "shared_gate": False, "task_experts": 2}], ids=str)
def test_ple_variants_contract(options, tiny_scenes):
    """PLE's shared/task split holds for the paper's form at every depth and for LibMTL's form (no shared gate)."""
    check_contract("ple", tiny_scenes, encoder="segnet", depth=2, width=4, **options)


def test_ple_split_follows_the_paper(tiny_scenes):
    """levels=3 with the shared gate: level-1 task gates and level-1/2 task experts are shared; task t owns its
    level-2 gate and its level-3 experts and gate. Without the shared gate every task part is the task's."""
    m = build_image_arch("ple", tiny_scenes, encoder="segnet", depth=2, width=4, levels=3)
    assert set(m.shared["levels"][0]) == {"shared_experts", "task_experts", "shared_gate", "task_gates"}
    assert set(m.shared["levels"][1]) == {"shared_experts", "task_experts", "shared_gate"}
    assert set(m.shared["levels"][2]) == {"shared_experts"}
    own = m.heads["seg"]["levels"]
    assert set(own) == {"1", "2"} and set(own["1"]) == {"gate"} and set(own["2"]) == {"gate", "experts"}
    T = len(m.task_names)
    assert m.shared["levels"][0]["shared_gate"].out_features == 1 + T  # over ALL experts of the level
    m = build_image_arch("ple", tiny_scenes, encoder="segnet", depth=2, width=4, levels=3, shared_gate=False)
    assert all(set(m.shared["levels"][j]) == {"shared_experts"} for j in range(3))
    assert m.describe()["stages_per_level"] == [2, 1, 1]
    with pytest.raises(MtlbenchError, match=r"levels must be at most 4 \(the stages of a segnet encoder of depth 2\), "
                                            r"got 5"):
        _spec(arch="ple", arch_options={"depth": 2, "levels": 5})


def test_flops_hand_count():
    """SegNet depth 1 width 2 on 1x4x4 plus one depth head, counted by hand."""
    from mtlbench.data import FeatureSchema, ImageSpec, TaskSpec

    schema = FeatureSchema(image=ImageSpec(1, 4, 4))
    task = TaskSpec("depth", "depth", ("abs_err",), target="depth")
    e = registry.get("arch", "shared_bottom", modality="image")
    model = e.obj(schema, (task,), 8, build_options(e.options_class, e.resolve_options(
        {"encoder": "segnet", "width": 2, "depth": 1})))
    f = model.flops()
    hw = 16
    enc = hw * 2 * 1 * 9 + hw * 2 * 2 * 9      # enc_block 1->2, enc_conv 2->2
    dec = hw * 2 * 2 * 9 + hw * 2 * 2 * 9      # dec_block 2->2, dec_conv 2->2
    head = hw * 2 * 2 * 9 + hw * 1 * 2         # 3x3 conv 2->2, 1x1 conv 2->1
    assert f["shared_macs"] == enc + dec and f["task_macs"] == {"depth": head} and f["flops"] == 2 * f["macs"]


def test_attention_flops_counted():
    vit = nets.ViT(3, (8, 8), 4, 8, 1, 2, 2.0)
    counts = nets.count_macs(vit, lambda: vit(torch.zeros(1, 3, 8, 8)), {"all": vit})
    N, D = 4, 8
    embed = N * D * 3 * 16
    block = N * D * 3 * D + 2 * N * N * D + N * D * D + N * D * 16 + N * 16 * D
    assert counts["all"] == embed + block


def _spec(**kw):
    args = dict(dataset="scenes", tasks=None, arch="shared_bottom", optimizer="ew", device="cpu")
    args.update(kw)
    return build_spec(**args)


@pytest.mark.parametrize("kw,match", [
    (dict(arch="home"), r"arch 'home' works on tabular data only, not on image data \(archs for image data: .*"
                        r"shared_bottom"),
    (dict(dataset_options={"resolution": 20}), r"cannot take 20x20 images: height and width must be multiples "
                                               r"of 8 \(3 levels of 2x2 pooling\)"),
    (dict(dataset_options={"resolution": 20}, arch_options={"encoder": "vit", "patch": 8}), r"multiples of 8 \(8x8 "
                                                                                           r"patches\)"),
    (dict(arch_options={"encoder": "unet"}), r"encoder must be one of segnet, resnet, vit, lenet, got 'unet'"),
])
def test_bad_input_one_line(kw, match):
    with pytest.raises(MtlbenchError, match=match) as info:
        _spec(**kw)
    assert "\n" not in str(info.value)


def test_image_arch_on_tabular_data_is_one_line(monkeypatch):
    from mtlbench.vision.arch import ImageArch

    class OnlyImages(ImageArch):
        """Test-only image arch."""

    monkeypatch.setitem(registry._REGISTRY["arch"], "only_images",
                        registry.Entry("arch", "only_images", OnlyImages, "x", "tests", "image"))
    with pytest.raises(MtlbenchError, match=r"arch 'only_images' works on image data only, not on tabular data "
                                            r"\(archs for tabular data: .*mmoe"):
        build_spec(dataset="ecommerce", tasks=None, arch="only_images", optimizer="ew", device="cpu")


def test_dense_task_without_dense_decoder(monkeypatch):
    e = registry.get("arch", "shared_bottom", modality="image")
    monkeypatch.setattr(e.obj, "supports_dense", False)
    with pytest.raises(MtlbenchError, match=r"arch 'shared_bottom' has no dense decoder, but task\(s\) seg, depth of "
                                            r"dataset 'scenes' are per-pixel"):
        _spec(tasks=["seg", "depth"])


def test_cli_bad_arch_on_images_is_one_line():
    r = subprocess.run([sys.executable, "-m", "mtlbench.cli", "run", "--dataset", "scenes", "--arch", "dtrn",
                        "--dry-run"], capture_output=True, text=True)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "arch 'dtrn' works on tabular data only" in err[0] and "Traceback" not in r.stderr


def test_cross_stitch_units(tiny_scenes):
    """Initial alphas follow the paper (0.9 own, 0.1 split over the others); with identity alphas the columns are
    independent networks (task t's output does not move with column s's weights)."""
    data = tiny_scenes.select_tasks(("seg", "depth", "normal"))
    model = build_image_arch("cross_stitch", data, width=2, depth=2)
    a = model.shared["units"][0].alpha.detach()
    torch.testing.assert_close(a, torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]]))
    with torch.no_grad():
        for u in model.shared["units"]:
            u.alpha.copy_(torch.eye(3))
    model.eval()
    batch = _batch(data, 2)
    out = model(batch).outputs
    loss0 = out[0].sum()
    grads = torch.autograd.grad(loss0, list(model.shared["columns"][1].parameters()), allow_unused=True)
    assert all(g is None or float(g.abs().max()) == 0.0 for g in grads)


def test_mtan_attention_is_per_task(tiny_scenes):
    data = tiny_scenes.select_tasks(("seg", "depth"))
    model = build_image_arch("mtan", data, width=2, depth=2)
    tp = model.task_parameters()
    assert all(any(p is q for q in tp["seg"]) for p in model.heads["seg"]["enc_att"].parameters())
    assert len(model.heads["seg"]["enc_att"]) == 2 and len(model.heads["seg"]["dec_att"]) == 2
    assert [l.tasks for l in model.feature_layouts()] == [("seg",), ("depth",)]


LENET_ARCHS = [a for a in IMAGE_ARCHS if "lenet" in registry.get("arch", a, modality="image").obj.encoders]


@pytest.mark.parametrize("arch", LENET_ARCHS)
def test_lenet_encoder_keeps_position(arch):
    """The F-MTL LeNet (9x9 conv, 5x5 conv, fc 500 -> 50 on 36x36) gives a vector per image; heads read it
    without pooling, so two images that differ only by where a blob is get different outputs."""
    from mtlbench.data import FeatureSchema, ImageSpec, TaskSpec

    schema = FeatureSchema(extras=("images",), image=ImageSpec(1, 36, 36))
    tasks = tuple(TaskSpec(t, "multiclass", ("accuracy",), n_classes=10) for t in ("left", "right"))
    e = registry.get("arch", arch, modality="image")
    torch.manual_seed(0)
    model = e.obj(schema, tasks, 8, build_options(e.options_class, e.resolve_options({"encoder": "lenet"}))).eval()
    assert any(isinstance(m, torch.nn.Linear) and m.in_features == 500 for m in model.modules())  # 20 x 5 x 5
    images = torch.zeros(2, 1, 36, 36, dtype=torch.uint8)
    images[0, :, 2:12, 2:12] = 255
    images[1, :, 24:34, 24:34] = 255
    batch = {"images": images, "labels": torch.zeros(2, 2), "masks": torch.ones(2, 2, dtype=torch.bool)}
    out = model(batch)
    assert all(o.shape == (2, 10) for o in out.outputs)
    assert not torch.allclose(out.outputs[0][0], out.outputs[0][1])
    for f, lay in zip(out.features, model.feature_layouts()):
        assert {lay.batch_axis, lay.channel_axis, *lay.position_axes} == set(range(f.dim()))
    conv = 28 * 28 * 10 * 81 + 10 * 10 * 20 * 10 * 25  # per LeNet: conv1 on 36x36, conv2 on 14x14
    if arch == "shared_bottom":
        assert model.flops()["shared_macs"] == conv + 500 * 50


def test_lenet_refuses_dense_and_small_images():
    with pytest.raises(MtlbenchError, match=r"encoder 'lenet' has no dense decoder .* task\(s\) seg"):
        _spec(arch_options={"encoder": "lenet"})
    e = registry.get("arch", "shared_bottom", modality="image")
    with pytest.raises(MtlbenchError, match=r"cannot take 16x16 images: height and width must be at least 18"):
        e.obj.check_input("shared_bottom", "x", build_options(e.options_class, {"encoder": "lenet"}), (1, 16, 16), [])
