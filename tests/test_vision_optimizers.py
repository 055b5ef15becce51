"""Every registered MTL optimizer trains every registered image arch: two steps on tiny scenes, finite gradients
and moving weights, per-task gradients through the batched backward of the shared trunk.

Both lists come from the registry (issue 14: a newly registered optimizer or image arch is checked without editing
this file); the image archs are ``IMAGE_ARCHS`` of tests/test_vision_archs.py, the one definition of the image
archs the tests share. An arch that shares nothing (``single``) is checked against the methods' declared needs:
a method that needs shared gradients or features is refused in one line, any other trains the task networks."""
from __future__ import annotations

import pytest
import torch

from mtlbench import registry
from mtlbench.errors import MtlbenchError
from mtlbench.optim import StepContext, check_compatible

from conftest import make_method
from test_vision_archs import IMAGE_ARCHS, build_image_arch, tiny_scenes  # noqa: F401  (fixture)

OPTIMIZERS = registry.names("optimizer")


def test_lists_come_from_the_registry():
    assert {"cgc", "omoe", "mtan", "cross_stitch", "shared_bottom"} <= set(IMAGE_ARCHS)
    assert IMAGE_ARCHS == sorted(n for n in registry.names("arch") if "image" in registry.variants(n))


@pytest.mark.parametrize("arch", IMAGE_ARCHS)
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_optimizer_trains_image_arch(opt, arch, tiny_scenes):  # noqa: F811
    data = tiny_scenes.select_tasks(("seg", "depth", "normal"))
    torch.manual_seed(0)
    model = build_image_arch(arch, data, width=2, depth=2)
    method = make_method(opt, model.loss_tasks())
    shared = model.shared_parameters()
    if not shared and method.requires & {"shared_grads", "features"}:
        with pytest.raises(MtlbenchError) as info:
            check_compatible(method, model, opt, arch)
        msg = str(info.value)
        assert "\n" not in msg and f"'{opt}'" in msg and f"'{arch}'" in msg
        return
    check_compatible(method, model, opt, arch)
    params = list(model.parameters()) + list(method.parameters())
    torch_opt = torch.optim.Adam(params, lr=1e-2)
    watched = shared or list(model.parameters())  # nothing shared: the task networks must train
    before = [p.detach().clone() for p in watched]
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step in range(2):
        batch = {k: v[4 * step:4 * step + 4] for k, v in data.splits["train"].tensors.items()}

        def fwd(b=batch):
            out = model(b)
            return out, model.task_losses(out.outputs, b)

        out, losses = fwd()
        torch_opt.zero_grad(set_to_none=True)
        ctx = StepContext(model, batch, out, losses, fwd, gen, step, 1)
        method.step(ctx)
        ctx.apply_aux()  # as the trainer does: an arch's auxiliary loss (slimmable's CIKD) if the step did not add it
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        torch_opt.step()
        method.after_step(ctx)
    method.end_epoch(1, {t: 1.0 for t in model.loss_tasks()})
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, watched))
