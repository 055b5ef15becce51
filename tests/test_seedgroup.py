"""`--vectorize-seeds`: seeds trained together give the records of separate runs, bit for bit, on the CPU.

The lists come from the registry: every tabular arch with ``ew`` (small e-commerce data), every image arch with ``ew``
(small scenes data) and every optimizer on ``mmoe``; each pair is
trained as two separate runs (``run_to_record``, one after the other) and as one group of two seeds with two
workers (so the seeds' steps really interleave across threads), and every stored number must be equal: the
metrics of every split, the per-epoch curves (losses, validation metrics, task weights), the selected epoch and
the method's state. Equality, not closeness: the group runs the same kernels on the same shapes with the same
thread count and the same random streams, so any difference is a bug (a generator shared between seeds, state
leaking across threads).
"""
from __future__ import annotations

import dataclasses
import functools
import threading

import pytest
import torch

from mtlbench import seedgroup
from mtlbench.cli import main
from mtlbench.registry import get, names, variants
from mtlbench.spec import build_spec
from mtlbench.train import run_to_record

SMALL = {"n_rows": 1000, "n_users": 100, "n_items": 80}
TABULAR_ARCHS = [a for a in names("arch") if "tabular" in variants(a)]
IMAGE_ARCHS = [a for a in names("arch") if "image" in variants(a)]
SCENES = {"resolution": 16, "train": 24, "val": 8, "test": 8}
SEEDS = (0, 1)


def _specs(arch: str, optimizer: str, epochs: int = 2, **arch_options) -> list:
    return [build_spec(dataset="ecommerce", tasks=["ctr", "cvr", "ctcvr"], arch=arch, optimizer=optimizer, seed=s,
                       epochs=epochs, batch_size=300, patience=0, embed_dim=4, device="cpu", threads=1,
                       dataset_options=SMALL, arch_options=arch_options) for s in SEEDS]


@functools.lru_cache(maxsize=None)
def _separate(arch: str, optimizer: str, epochs: int = 2, **arch_options) -> tuple:
    return tuple(run_to_record(s) for s in _specs(arch, optimizer, epochs, **arch_options))


def _grouped(specs: list, workers: int = 2) -> list:
    out: dict[int, dict] = {}
    records = {}

    def execute(spec, group):
        records[spec.seed] = run_to_record(spec, group=group)
        return {"status": records[spec.seed]["status"]}

    unfinished = seedgroup.run_group(specs, workers, execute, lambda spec, o: out.__setitem__(spec.seed, o))
    assert not unfinished and sorted(out) == sorted(s.seed for s in specs)
    return [records[s.seed] for s in specs]


SAME = ("run_id", "spec", "status", "metrics", "selected_epoch", "epochs_run", "selection_score", "optimizer_state",
        "optimizer_warnings", "parameters", "arch_info", "dataset")


def _untimed(x):
    """``x`` without timings (keys naming seconds or milliseconds, e.g. slimmable's search_ms_per_request)."""
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if "seconds" not in k and "_ms" not in k}
    return [_untimed(v) for v in x] if isinstance(x, list) else x


def _assert_same(separate: dict, grouped: dict) -> None:
    assert grouped["status"] == "ok", grouped.get("error")
    for key in SAME:
        assert _untimed(grouped.get(key)) == _untimed(separate.get(key)), key
    for a, b in zip(separate["curves"], grouped["curves"], strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert grouped["seed_group"]["seeds"] == list(SEEDS) and "seed_group" not in separate


@pytest.mark.parametrize("arch", TABULAR_ARCHS)
def test_every_arch_grouped_equals_separate(arch):
    specs = _specs(arch, "ew", epochs=1)
    for sep, grp in zip(_separate(arch, "ew", 1), _grouped(specs), strict=True):
        _assert_same(sep, grp)


@pytest.mark.parametrize("arch", IMAGE_ARCHS)
def test_every_image_arch_grouped_equals_separate(arch):
    specs = [build_spec(dataset="scenes", tasks=None, arch=arch, optimizer="ew", seed=s, epochs=1, batch_size=8,
                        patience=0, embed_dim=4, device="cpu", threads=1, dataset_options=SCENES) for s in SEEDS]
    for sep, grp in zip([run_to_record(s) for s in specs], _grouped(specs), strict=True):
        _assert_same(sep, grp)


@pytest.mark.parametrize("optimizer", names("optimizer"))
def test_every_optimizer_grouped_equals_separate(optimizer):
    specs = _specs("mmoe", optimizer)
    for sep, grp in zip(_separate("mmoe", optimizer), _grouped(specs), strict=True):
        _assert_same(sep, grp)


def test_bf16_seeds_grouped_equal_separate():
    """Autocast is per thread: each seed's thread runs its forward in bfloat16 exactly as its separate run."""
    specs = [dataclasses.replace(s, precision="bf16") for s in _specs("mmoe", "ew", epochs=1)]
    for sep, grp in zip([run_to_record(s) for s in specs], _grouped(specs), strict=True):
        _assert_same(sep, grp)


def test_dropout_draws_the_separate_runs_streams():
    """With dropout (mmoe's experts: mtlbench's dropout; its towers: nn.Dropout's) each seed draws what its
    separate run draws from the global generator, from its own thread's generator."""
    specs = _specs("mmoe", "ew", dropout=0.3)
    separate = _separate("mmoe", "ew", 2, dropout=0.3)
    assert separate[0]["metrics"] != _separate("mmoe", "ew", 2)[0]["metrics"]  # dropout did something
    for sep, grp in zip(separate, _grouped(specs, workers=1), strict=True):
        _assert_same(sep, grp)


def test_a_run_that_draws_from_the_global_generator_fails_with_a_line(monkeypatch):
    """A plugin drawing from torch's global generator during training would share one stream between the
    seeds: the group fails those runs, saying why, instead of storing numbers no separate run gives."""
    MMoE = get("arch", "mmoe").obj
    encode = MMoE.encode

    def noisy(self, batch):
        torch.rand(1)
        return encode(self, batch)

    monkeypatch.setattr(MMoE, "encode", noisy)
    for rec in _grouped(_specs("mmoe", "ew", epochs=1)):
        assert rec["status"] == "failed"
        assert "global random generator" in rec["error"]["reason"]


def test_the_gate_hands_cores_on_first_come_first_served():
    """Two slots, three threads: never more than two compute at once, and each gets its turns."""
    group = seedgroup.SeedGroup([0, 1, 2], workers=2)
    busy, peak, turns = [0], [0], {i: 0 for i in range(3)}
    lock = threading.Lock()

    def work(i):
        group.enter()
        try:
            for _ in range(50):
                group.pass_turn()
                with lock:
                    busy[0] += 1
                    peak[0] = max(peak[0], busy[0])
                turns[i] += 1
                with lock:
                    busy[0] -= 1
        finally:
            group.leave()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] <= 2 and all(v == 50 for v in turns.values())


def test_partition_by_everything_but_the_seed():
    a = _specs("mmoe", "ew")
    b = _specs("mmoe", "uw")
    groups = seedgroup.partition([a[0], b[0], a[1], b[1]])
    assert [[s.seed for s in g] for g in groups] == [[0, 1], [0, 1]]
    assert [g[0].optimizer for g in groups] == ["ew", "uw"]


def test_dropout_on_a_gpu_runs_seed_by_seed():
    spec = _specs("mmoe", "ew", dropout=0.2)[0]
    assert seedgroup.ungroupable(spec) is None  # on the CPU the streams match
    gpu = dataclasses.replace(spec, device="cuda")
    assert "dropout on cuda" in seedgroup.ungroupable(gpu)
    assert seedgroup.partition([gpu, dataclasses.replace(gpu, seed=1)]) == [[gpu], [dataclasses.replace(gpu, seed=1)]]
    assert seedgroup.ungroupable(dataclasses.replace(_specs("mmoe", "ew")[0], device="cuda")) is None


CLI_SMALL = ["-D", "n_rows=1500", "-D", "n_users=100", "-D", "n_items=80", "--epochs", "1", "--batch-size", "300",
             "--embed-dim", "4", "--quiet"]


def test_cli_writes_one_normal_record_per_seed_under_the_separate_ids(tmp_path):
    sep, vec = tmp_path / "sep", tmp_path / "vec"
    assert main(["run", "--arch", "mmoe", "--seeds", "0-2", *CLI_SMALL, "--results-dir", str(sep)]) == 0
    assert main(["run", "--arch", "mmoe", "--seeds", "0-2", "--vectorize-seeds", *CLI_SMALL,
                 "--results-dir", str(vec)]) == 0
    ids = sorted(p.name for p in sep.glob("*.json"))
    assert len(ids) == 3 and ids == sorted(p.name for p in vec.glob("*.json"))
    import json

    for name in ids:
        a, b = json.loads((sep / name).read_text()), json.loads((vec / name).read_text())
        assert a["metrics"] == b["metrics"] and b["seed_group"]["seeds"] == [0, 1, 2]
    # finished seeds are skipped, as in any sweep
    assert main(["run", "--arch", "mmoe", "--seeds", "0-2", "--vectorize-seeds", *CLI_SMALL,
                 "--results-dir", str(vec)]) == 0


@pytest.mark.parametrize("args,needle", [
    (["--merger", "ties"], "--vectorize-seeds trains seeds together; merges (--merger) are not training runs"),
    (["--executor", "ray"], "--vectorize-seeds trains a spec's seeds together in one process, on the local"),
])
def test_refusals_are_one_line(tmp_path, capsys, args, needle):
    code = main(["run", "--seeds", "0-1", "--vectorize-seeds", *args, *CLI_SMALL,
                 "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not list((tmp_path / "r").glob("*.json"))
