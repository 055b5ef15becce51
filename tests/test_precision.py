"""`--precision bf16`: forward passes under torch.autocast to bfloat16, everything else float32.

Checked on the CPU (CI has no GPU; the CPU's autocast runs the same code path as CUDA's): the setting keeps
every fp32 run id, every registered arch (each variant) and every optimizer trains and evaluates in bf16 with
float32 parameters, gradients, losses and metrics, the matmuls really run in bfloat16, and a device without
bfloat16 is refused in one line before anything loads.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mtlbench.registry import names
from mtlbench.spec import build_spec
from mtlbench.train import build, train

from conftest import arch_variants, small_modality, small_modality_data

ARCHS = arch_variants()
pytestmark = pytest.mark.usefixtures("module_cache_dir")


def _spec(arch: str, optimizer: str, modality: str = "tabular", epochs: int = 1, precision: str = "bf16"):
    dataset, options, tasks, batch, _ = small_modality(modality)
    return build_spec(dataset=dataset, tasks=tasks, arch=arch, optimizer=optimizer, epochs=epochs,
                      batch_size=batch, patience=0, embed_dim=4, device="cpu", dataset_options=options,
                      precision=precision)


def _train_bf16(arch: str, optimizer: str, modality: str = "tabular", epochs: int = 1) -> dict:
    spec = _spec(arch, optimizer, modality, epochs)
    built = build(spec, data=small_modality_data(modality))
    seen: set[torch.dtype] = set()

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor):
            seen.add(output.dtype)

    handles = [m.register_forward_hook(hook) for m in built.model.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    grads: list[torch.dtype] = []
    original_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):  # the optimizer sees float32 parameters and gradients
        grads.extend(p.grad.dtype for g in self.param_groups for p in g["params"] if p.grad is not None)
        return original_step(self, *args, **kwargs)

    try:
        torch.optim.Adam.step = step
        body = train(spec, built)
    finally:
        torch.optim.Adam.step = original_step
        for h in handles:
            h.remove()
    if handles:
        assert torch.bfloat16 in seen, f"no Linear/Conv2d of {arch} ran in bfloat16: {seen}"
    assert all(p.dtype == torch.float32 for p in built.model.parameters())
    assert grads and set(grads) == {torch.float32}
    for split in ("train", "val", "test"):
        assert set(body["metrics"][split]) == set(spec.tasks)
        for m in body["metrics"][split].values():
            assert all(isinstance(v, float) and math.isfinite(v) for v in m.values()), m
    return body


def test_fp32_is_the_default_and_keeps_every_stored_run_id():
    fp32 = _spec("mmoe", "ew", precision=None)
    assert fp32.precision == "fp32" and "precision" not in fp32.canonical_json()
    bf16 = dataclasses.replace(fp32, precision="bf16")
    assert '"precision":"bf16"' in bf16.canonical_json() and bf16.run_id != fp32.run_id


@pytest.mark.parametrize("arch,modality", ARCHS)
def test_every_arch_trains_in_bf16(arch, modality):
    _train_bf16(arch, "ew", modality)


@pytest.mark.parametrize("optimizer", names("optimizer"))
def test_every_optimizer_steps_in_bf16(optimizer):
    _train_bf16("mmoe", optimizer, epochs=2)


def test_bf16_computes_something_else_than_fp32_and_close_to_it():
    """The forward really changes precision (the metrics move) and training is not broken by it: bfloat16 keeps
    8 bits of mantissa, so after one short epoch the logloss moves by far less than the 0.1 of a broken run."""
    fp32 = train(_spec("mmoe", "ew", precision="fp32"), build(_spec("mmoe", "ew", precision="fp32"),
                                                              data=small_modality_data("tabular")))
    bf16 = _train_bf16("mmoe", "ew")
    a, b = fp32["metrics"]["test"], bf16["metrics"]["test"]
    assert any(a[t]["logloss"] != b[t]["logloss"] for t in a)
    assert all(abs(a[t]["logloss"] - b[t]["logloss"]) < 0.05 for t in a), (a, b)


@pytest.mark.parametrize("capability,name", [((7, 0), "Tesla V100-SXM2-16GB")])
def test_bf16_on_a_gpu_without_it_is_one_line(monkeypatch, tmp_path, capsys, capability, name):
    from mtlbench.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.version, "hip", None)
    code = main(["run", "--arch", "mmoe", "--device", "cuda", "--precision", "bf16",
                 "--results-dir", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"precision 'bf16': {name} has no native bfloat16 (valid here: fp32)" in err


def test_an_unknown_precision_is_one_line(tmp_path, capsys):
    from mtlbench.cli import main

    code = main(["run", "--precision", "fp8", "--results-dir", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "'fp8'" in err and "bf16, fp32" in err, err


def test_bf16_with_a_merger_is_one_line(tmp_path, capsys):
    from mtlbench.cli import main

    code = main(["run", "--dataset", "text8", "--arch", "minilm", "--merger", "task_arithmetic", "--precision",
                 "bf16", "--results-dir", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--precision bf16" in err and "--merger" in err, err
