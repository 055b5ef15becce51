"""The CPU speed-ups of the training step change no number: multi-tensor Adam and the allocator thresholds
(``mtlbench.train.adam_foreach``, ``keep_freed_memory``) against torch's per-tensor Adam and glibc's defaults,
on a run with dropout, BatchNorm and weight decay. Equality, not closeness: both are claimed exact."""
from __future__ import annotations

import pytest

import mtlbench.train as mt
from mtlbench.spec import build_spec


def _record():
    spec = build_spec(dataset="ecommerce", tasks=["ctr", "cvr"], arch="mmoe", optimizer="uw", seed=3, epochs=2,
                      batch_size=256, patience=0, embed_dim=4, device="cpu", threads=1, weight_decay=1e-4,
                      dataset_options={"n_rows": 1500, "n_users": 100, "n_items": 80}, arch_options={"dropout": 0.2})
    return mt.run_to_record(spec)


def test_speedups_are_exact(monkeypatch):
    fast = _record()
    monkeypatch.setattr(mt, "adam_foreach", lambda device: False)
    monkeypatch.setenv("MTLBENCH_KEEP_FREED_MEMORY", "0")
    monkeypatch.setattr(mt, "_MALLOC_TUNED", False)
    mt.keep_freed_memory(False)
    try:
        plain = _record()
    finally:
        monkeypatch.delenv("MTLBENCH_KEEP_FREED_MEMORY")
        mt.keep_freed_memory()
    assert fast["status"] == plain["status"] == "ok"
    assert fast["metrics"] == plain["metrics"]
    assert [c["train_loss"] for c in fast["curves"]] == [c["train_loss"] for c in plain["curves"]]
    assert fast["optimizer_state"] == plain["optimizer_state"]


def test_adam_foreach_only_where_torch_would_not():
    assert mt.adam_foreach("cpu") is True
    assert mt.adam_foreach("cuda") is None  # torch's default there (foreach already)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_applies_on_linux():
    import os

    if os.environ.get("MTLBENCH_KEEP_FREED_MEMORY") == "0":
        pytest.skip("disabled by the environment")
    assert mt.keep_freed_memory() in (True, False)  # False on a non-glibc libc: a no-op, never an error
