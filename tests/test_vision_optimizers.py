"""Every registered MTL optimizer trains the image archs: two steps on tiny scenes, finite and moving weights,
per-task gradients through the batched backward of the shared trunk."""
from __future__ import annotations

import pytest
import torch

from mtlbench import registry
from mtlbench.optim import StepContext, check_compatible
from mtlbench.registry import build_options

from test_vision_archs import build_image_arch, tiny_scenes  # noqa: F401  (fixture)

OPTIMIZERS = registry.names("optimizer")
ARCHS = ["shared_bottom", "mtan", "mmoe", "cross_stitch", "taskexpert", "ple"]


def _method(name, tasks, **o):
    e = registry.get("optimizer", name)
    return e.obj(tuple(tasks), build_options(e.options_class, e.resolve_options(o)))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_optimizer_trains_image_arch(opt, arch, tiny_scenes):  # noqa: F811
    data = tiny_scenes.select_tasks(("seg", "depth", "normal"))
    torch.manual_seed(0)
    model = build_image_arch(arch, data, width=2, depth=2)
    method = _method(opt, model.loss_tasks())
    check_compatible(method, model, opt, arch)
    params = list(model.parameters()) + list(method.parameters())
    torch_opt = torch.optim.Adam(params, lr=1e-2)
    before = [p.detach().clone() for p in model.shared_parameters()]
    gen = torch.Generator().manual_seed(0)
    for step in range(2):
        batch = {k: v[4 * step:4 * step + 4] for k, v in data.splits["train"].tensors.items()}

        def fwd(b=batch):
            out = model(b)
            return out, model.task_losses(out.outputs, b)

        out, losses = fwd()
        torch_opt.zero_grad(set_to_none=True)
        ctx = StepContext(model, batch, out, losses, fwd, gen, step, 1)
        method.step(ctx)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        torch_opt.step()
        method.after_step(ctx)
    method.end_epoch(1, {t: 1.0 for t in model.loss_tasks()})
    moved = any(not torch.equal(a, p.detach()) for a, p in zip(before, model.shared_parameters()))
    assert moved
