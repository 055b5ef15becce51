"""Device bugs fail CI without a GPU: every registered arch and optimizer trains and evaluates on a second device.

How: :mod:`mtlbench.simdevice` simulates an accelerator on CPU. Tensors moved to it hold real numbers but report
another device, and every aten op (forward, backward, the MTL method's step, the torch optimizer, evaluation
and the metrics) raises when it mixes them with plain CPU tensors, as CUDA does. So a tensor created without
``device=`` (``torch.zeros(T)`` in a method's state), predictions moved with ``.cpu()`` and indexed by masks
left on the device, or a host-side solver's result not moved back all fail here, while data-dependent code
(metrics, early stopping, solvers) still runs on real values. torch's ``FakeTensorMode`` with a fake ``cuda``
device was tried first: it holds no values (metrics and solvers cannot run) and, on a CPU-only torch, its
autograd fails on fake ``cuda`` tensors before reaching our code.

The lists come from the registry, so a new arch or optimizer is covered without editing this file: every arch
(each of its tabular / image variants, on small e-commerce / scenes data) with ``ew``, and every optimizer on
``mmoe`` (the arch every optimizer supports), each through the real training loop (``train``; optimizers for 2
epochs, so epoch-end hooks and selection run) and the final evaluation. The same device counts device-to-host
copies, which shows that the training step itself makes none.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mtlbench.registry import get, names
from mtlbench.simdevice import HOST_READS, DeviceMismatch, SimTensor, simulated_device
from mtlbench.spec import build_spec
from mtlbench.train import build, train

from conftest import arch_variants, small_modality, small_modality_data

# modalities the simulation cannot drive, and why (they are covered on a real GPU by benchmarks/gpu_check.py)
NOT_SIMULATED = {"text": "transformers' model.train() checks the model's device type and refuses 'meta', the "
                         "device the simulation reports"}
ARCHS = arch_variants()
pytestmark = pytest.mark.usefixtures("module_cache_dir")


def _spec(arch: str, optimizer: str, modality: str = "tabular", epochs: int = 2):
    if modality in NOT_SIMULATED:
        pytest.skip(NOT_SIMULATED[modality])
    dataset, options, tasks, batch, _ = small_modality(modality)
    spec = build_spec(dataset=dataset, tasks=tasks, arch=arch, optimizer=optimizer, epochs=epochs, batch_size=batch,
                      patience=0, embed_dim=4, device="cpu", dataset_options=options)
    return dataclasses.replace(spec, device="meta")


def _train_on_second_device(arch: str, optimizer: str, modality: str = "tabular", epochs: int = 2) -> dict:
    spec = _spec(arch, optimizer, modality, epochs)
    with simulated_device():
        built = build(spec, data=small_modality_data(modality))
        assert all(isinstance(p, SimTensor) for p in built.model.parameters())
        return train(spec, built)


def _check(body: dict, modality: str = "tabular") -> None:
    tasks = small_modality_data(modality).task_names
    for split in ("train", "val", "test"):
        assert set(body["metrics"][split]) == set(tasks)
    values = [v for split in body["metrics"].values() for m in split.values() for v in m.values()]
    assert values and all(isinstance(v, float) and math.isfinite(v) for v in values)


@pytest.mark.parametrize("arch,modality", ARCHS)
def test_every_arch_trains_and_evaluates_on_a_second_device(arch, modality):
    _check(_train_on_second_device(arch, "ew", modality, epochs=1), modality)


@pytest.mark.parametrize("optimizer", names("optimizer"))
def test_every_optimizer_steps_on_a_second_device(optimizer):
    _check(_train_on_second_device("mmoe", optimizer))


def test_the_simulated_device_catches_mixing():
    """The harness itself: mixing raises (as CUDA would), allowed cases (CPU scalars, copies) do not."""
    with simulated_device() as dev:
        x = torch.ones(3).to(dev)
        assert x.device == dev and isinstance(x, SimTensor)
        with pytest.raises(DeviceMismatch, match="aten.add"):
            x + torch.ones(3)
        with pytest.raises(DeviceMismatch, match="aten.index"):
            x.cpu()[torch.ones(3, dtype=torch.bool, device=dev)]
        assert float((x * torch.tensor(2.0)).sum()) == 6.0  # a CPU 0-dim tensor is allowed, as in CUDA
        assert isinstance(torch.zeros(2, device=dev), SimTensor)
        assert not isinstance(x.cpu(), SimTensor)
        y = torch.zeros(3)
        y.copy_(x)  # a cross-device copy is allowed
        assert y.tolist() == [1.0, 1.0, 1.0]


def _structure(x):
    if isinstance(x, dict):
        return {k: _structure(v) for k, v in x.items() if k not in ("seconds", "train_seconds",
                                                                   "train_samples_per_s")}
    if isinstance(x, list):
        return [_structure(v) for v in x]
    return type(x).__name__


def test_the_simulated_run_matches_the_cpu_run():
    """The run's body has the same structure on both devices and the same numbers up to float32 rounding: the
    simulated device computes on CPU, but through the dispatcher's decompositions, which may round differently
    (float32 eps 1.2e-7 per op, carried through 8 Adam steps: 1e-4 relative is generous and still far below any
    difference between methods)."""
    sim = _train_on_second_device("mmoe", "pcgrad")
    cpu_spec = dataclasses.replace(_spec("mmoe", "pcgrad"), device="cpu")
    cpu = train(cpu_spec, build(cpu_spec, data=small_modality_data("tabular")))
    assert _structure(sim) == _structure(cpu)
    for split, tasks in cpu["metrics"].items():
        for task, values in tasks.items():
            for name, v in values.items():
                assert sim["metrics"][split][task][name] == pytest.approx(v, rel=1e-4), (split, task, name)


def _host_reads_of_training(batch_size: int) -> int:
    spec = dataclasses.replace(_spec("mmoe", "ew", epochs=1), batch_size=batch_size)
    with simulated_device():
        built = build(spec, data=small_modality_data("tabular"))
        HOST_READS.clear()
        train(spec, built)
        return len(HOST_READS)


def test_the_training_step_makes_no_host_sync():
    """Halving the batch size doubles the steps (4 -> 8) and leaves everything else (evaluation, the epoch-end
    checks) unchanged, so any device-to-host copy made per step shows up as a difference."""
    assert _host_reads_of_training(300) == _host_reads_of_training(150)


NAN_AT_STEP_3 = """
class NanAtStep3(MMoE):
    def task_losses(self, outputs, batch):
        self.calls = getattr(self, "calls", 0) + self.training
        losses = super().task_losses(outputs, batch)
        return [l * float("nan") if self.training and self.calls >= 3 and i == 1 else l
                for i, l in enumerate(losses)]
"""


def test_a_nan_loss_mid_epoch_fails_the_run_naming_its_first_step():
    """The non-finite check is lazy (no sync per step) but still names the first bad step and task."""
    from mtlbench.errors import RunFailed

    namespace = {"MMoE": get("arch", "mmoe").obj}
    exec(NAN_AT_STEP_3, namespace)
    spec = dataclasses.replace(_spec("mmoe", "ew", epochs=1), batch_size=150, device="cpu")
    built = build(spec, data=small_modality_data("tabular"))
    state = built.model.state_dict()
    model = namespace["NanAtStep3"](small_modality_data("tabular").schema, built.data.tasks, spec.embed_dim, built.model.options)
    model.load_state_dict(state)
    with pytest.raises(RunFailed, match=r"non-finite loss in epoch 1, step 3, task\(s\) cvr$"):
        train(spec, dataclasses.replace(built, model=model))


def test_auto_picks_the_gpu_when_there_is_one(monkeypatch):
    """`--device auto` resolves to cuda when torch sees a GPU, else mps, else cpu (the choice logic; a real GPU
    run is benchmarks/gpu_check.py's part)."""
    from mtlbench.spec import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") in ("cpu", "mps")


def test_val_loss_selection_on_a_second_device():
    """The other selection criterion sums validation losses on the device."""
    spec = dataclasses.replace(_spec("mmoe", "ew"), selection="val_loss")
    with simulated_device():
        body = train(spec, build(spec, data=small_modality_data("tabular")))
    _check(body)
    assert all(math.isfinite(c["selection_score"]) for c in body["curves"])


@pytest.mark.parametrize("device,gpus,needle", [
    ("cuda", 0, "device 'cuda': no CUDA GPU is visible to torch"),
    ("cuda:7", 1, "device 'cuda:7': this machine has 1 CUDA GPU(s) (valid: cuda:0)"),
    ("mps", 0, "device 'mps': Apple's MPS backend is not available here (it needs Apple silicon"),
])
def test_a_device_this_machine_lacks_is_one_line(monkeypatch, tmp_path, capsys, device, gpus, needle):
    """Issue 13's bad inputs: `--device cuda` without a GPU, `cuda:7` on a one-GPU machine (simulated), `mps`
    without Apple silicon: one line naming the device and what is available, before anything loads."""
    from mtlbench.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    code = main(["run", "--arch", "mmoe", "--device", device, "--results-dir", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").glob("*.json"))
