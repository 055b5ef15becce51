"""Training speed of mtlbench's MMoE against the peers' own MMoE in their own training loops, in one run.

A measurement script, not a test (it asserts nothing about speed). Install the peers first:
``pip install -e '.[bench]'`` (torch-rechub, DeepCTR-Torch, FuxiCTR; they do not replace torch). A peer that is
not installed is skipped with one line.

The arms (interleaved: arm 1, arm 2, ..., arm 1, arm 2, ... for ``--reps`` repetitions; median step time)
    mtlbench            our real loop: ``mtlbench.train.train`` (BatchLoader slices, the registered ``mmoe``, the
                        ``ew`` step through StepContext, the lazy non-finite checks, Adam), timed by the loop's own
                        ``train_seconds`` (evaluation excluded)
    mtlbench bf16       the same loop with ``--precision bf16`` (autocast to bfloat16 in the forward passes;
                        float32 parameters, gradients, Adam state and losses), against the bfloat16 GEMM floor
    mtlbench before     the same loop without issue 13's exact CPU speed-ups (glibc's default allocator
                        thresholds, Adam's per-tensor loop): the before/after ratio of one run (CPU only)
Every arm and repetition runs in its own fresh process (interleaved), so a process-wide setting of one arm (the
allocator thresholds mtlbench's loop sets) never helps or hurts another; the GEMM floor is timed in the parent with
those thresholds set (no page faults: the best case for the matmuls alone).
    torch-rechub        ``torch_rechub.models.multi_task.MMOE`` trained by its ``MTLTrainer.train_one_epoch`` on
                        the DataLoader of its ``DataGenerator.generate_dataloader`` (its defaults: one sample per
                        ``__getitem__``, ``num_workers=0``, Adam lr 1e-3 weight decay 1e-5, tqdm, ``.item()`` per step)
    DeepCTR-Torch       ``deepctr_torch.models.MMOE`` trained by its ``compile("adam", ...)`` + ``fit`` (its defaults:
                        TensorDataset + DataLoader, L2 on embeddings 1e-5, ``.item()`` per step)
    rechub model, our loader   (the third arm) torch-rechub's MMOE fed by our BatchLoader with a plain Adam step:
                        how much of the gap comes from loading and how much from the model code
    FuxiCTR             its MMoE lives in its model_zoo, not in the PyPI package; said so in one line
The GEMM floor: the same model's matmuls (forward, and the two backward GEMMs of each) timed alone on random
tensors of the same shapes; no step of this model can be faster.

The model, the same on every arm: AliExpress-shaped synthetic data (benchmarks/train_throughput.py:
16 categorical fields, 63 dense features, two binary tasks), embedding ``--embed-dim`` (16), 8 experts 512-256,
towers 128-64, dropout 0.2, BatchNorm in experts and towers, linear-softmax gates, Adam lr 1e-3, batch 2048. One
difference the peers' APIs impose: they feed the 63 dense values raw into the concatenated input (319 inputs at
embedding 16), mtlbench projects them to one more embedding field (272 inputs); the table prints each arm's
parameter count.

Goals (issue 13): mtlbench's step at least 3x faster than the fastest peer's real loop, or within 1.2x of the
GEMM floor (on 2 CPU cores this model is close to compute-bound).

``--quality`` adds what each arm learned: after its timed epoch (the same rows for every arm; each arm its own
initialisation, data order and optimizer defaults), the test AUC of both tasks on the same held-out rows.

    .venv/bin/python benchmarks/peer_throughput.py --threads 1 --steps 20 --reps 3
    .venv/bin/python benchmarks/peer_throughput.py --threads 1 --steps 100 --reps 1 --quality --no-before
    .venv/bin/python benchmarks/peer_throughput.py --quick          # a smoke run
    .venv/bin/python benchmarks/peer_throughput.py --device cuda    # on a GPU (benchmarks/gpu_check.py calls it)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import (DROPOUT, EXPERT_UNITS, LR, N_DENSE, N_EXPERTS, TASK_NAMES, TOWER_UNITS,  # noqa: E402
                              VOCAB_SIZES, make_data)

from mtlbench.data import CategoricalField, FeatureSchema, MultiTaskData, Split, TaskSpec  # noqa: E402
from mtlbench.loader import BatchLoader  # noqa: E402
from mtlbench.registry import build_options, get  # noqa: E402
from mtlbench.spec import build_spec  # noqa: E402
from mtlbench.train import Built, train  # noqa: E402

BATCH = 2048
TEST_ROWS = 50 * BATCH  # --quality: held-out rows, the same for every arm
SEED = [0]  # repetition r initialises every arm (and its data order) with seed r; the data stay the same


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ the arms

class Arm:
    """``run(rows)`` trains one pass over ``rows`` rows (after a warm-up pass) and returns seconds per step."""

    name: str
    params: int

    def run(self, data: dict[str, torch.Tensor]) -> float:
        raise NotImplementedError

    def predict(self, data: dict[str, torch.Tensor]) -> torch.Tensor:
        """Probabilities ``[N, tasks]`` of the trained model on ``data`` (evaluation mode, no gradients)."""
        self.model.eval()
        with torch.no_grad():
            return torch.cat([self._probs({k: v[i:i + BATCH].to(self.device) for k, v in data.items()}).float().cpu()
                              for i in range(0, len(data["labels"]), BATCH)])

    def _probs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(_columns(batch))


class Mtlbench(Arm):
    name = "mtlbench (its train loop)"
    precision = "fp32"

    def __init__(self, embed_dim: int, device: str, warm: dict[str, torch.Tensor]) -> None:
        self.device, self.embed_dim = device, embed_dim
        self.spec = build_spec(dataset="ecommerce", tasks=["ctr", "ctcvr"], arch="mmoe", optimizer="ew", epochs=1,
                               batch_size=BATCH, lr=LR, weight_decay=0.0, patience=0, embed_dim=embed_dim,
                               seed=SEED[0], device=device, precision=self.precision, arch_options={"n_experts": N_EXPERTS,
                                                            "expert_units": list(EXPERT_UNITS),
                                                            "tower_units": list(TOWER_UNITS), "dropout": DROPOUT,
                                                            "batch_norm": True})
        schema = FeatureSchema(categorical=tuple(CategoricalField(f"c{i}", v) for i, v in enumerate(VOCAB_SIZES)),
                               dense=tuple(f"d{i}" for i in range(N_DENSE)))
        self.schema = schema
        self.tasks = tuple(TaskSpec(t, "binary", ("auc", "logloss")) for t in TASK_NAMES)
        entry = get("arch", "mmoe")
        torch.manual_seed(SEED[0])
        self.model = entry.obj(schema, self.tasks, embed_dim,
                               build_options(entry.options_class, self.spec.arch_options)).to(device)
        self.method = get("optimizer", "ew").obj(TASK_NAMES, None)
        self.params = n_params(self.model)
        self.run(warm)

    def run(self, data: dict[str, torch.Tensor]) -> float:
        small = {k: v[:BATCH] for k, v in data.items()}
        mtd = MultiTaskData("bench", "1", self.schema, self.tasks,
                            {"train": Split(dict(data)), "val": Split(small), "test": Split(small)})
        body = train(self.spec, Built(mtd, self.model, self.method))
        return body["train_seconds"] / (len(data["labels"]) // BATCH)

    def _probs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from mtlbench.train import precision_context

        with precision_context(self.precision, self.device):
            return torch.sigmoid(torch.cat([o.float().reshape(-1, 1) for o in self.model(batch).outputs], 1))


class MtlbenchBf16(Mtlbench):
    """The same loop with ``--precision bf16``: forward passes under autocast to bfloat16 (float32 parameters,
    gradients, Adam state and losses). Its floor is the same matmuls in bfloat16."""

    name = "mtlbench --precision bf16"
    precision = "bf16"


class MtlbenchBefore(Mtlbench):
    """The same loop as it ran before issue 13's exact CPU speed-ups: glibc's default allocator (every large
    activation page-faulted afresh each step; its process never calls ``keep_freed_memory``) and Adam's per-tensor
    loop."""

    name = "mtlbench before (default malloc, per-tensor Adam)"

    def __init__(self, embed_dim: int, device: str, warm: dict[str, torch.Tensor]) -> None:
        import mtlbench.train as mt

        os.environ["MTLBENCH_KEEP_FREED_MEMORY"] = "0"  # its own process: glibc's defaults stay as they are
        mt.adam_foreach = lambda device: False
        super().__init__(embed_dim, device, warm)


def _rechub_features(embed_dim: int):
    from torch_rechub.basic.features import DenseFeature, SparseFeature

    return ([SparseFeature(f"c{i}", v, embed_dim=embed_dim) for i, v in enumerate(VOCAB_SIZES)]
            + [DenseFeature(f"d{j}") for j in range(N_DENSE)])


def _rechub_model(embed_dim: int):
    from torch_rechub.models.multi_task import MMOE

    torch.manual_seed(SEED[0])
    expert = {"dims": list(EXPERT_UNITS), "dropout": DROPOUT, "activation": "relu"}
    tower = {"dims": list(TOWER_UNITS), "dropout": DROPOUT, "activation": "relu"}
    return MMOE(_rechub_features(embed_dim), ["classification"] * len(TASK_NAMES), N_EXPERTS, expert,
                [tower] * len(TASK_NAMES))


def _columns(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    cols = {f"c{i}": data["categorical"][:, i] for i in range(len(VOCAB_SIZES))}
    cols.update({f"d{j}": data["dense"][:, j] for j in range(N_DENSE)})
    return cols


class Rechub(Arm):
    name = "torch-rechub (its loop)"

    def __init__(self, embed_dim: int, device: str, warm: dict[str, torch.Tensor]) -> None:
        from torch_rechub.trainers import MTLTrainer

        self.model = _rechub_model(embed_dim)
        self.params = n_params(self.model)
        self.trainer = MTLTrainer(self.model, ["classification"] * len(TASK_NAMES), n_epoch=1, device=device,
                                  model_path=os.devnull)
        self.device = device
        self.run(warm)

    def run(self, data: dict[str, torch.Tensor]) -> float:
        from torch_rechub.utils.data import DataGenerator

        x = {k: v.numpy() for k, v in _columns(data).items()}
        y = data["labels"].numpy()
        small_x = {k: v[:BATCH] for k, v in x.items()}
        loader, _, _ = DataGenerator(x, y).generate_dataloader(x_val=small_x, y_val=y[:BATCH], x_test=small_x,
                                                               y_test=y[:BATCH], batch_size=BATCH)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            t0 = time.perf_counter()
            self.trainer.train_one_epoch(loader)
            sync(self.device)
            return (time.perf_counter() - t0) / len(loader)


class DeepCTR(Arm):
    name = "DeepCTR-Torch (its fit)"

    def __init__(self, embed_dim: int, device: str, warm: dict[str, torch.Tensor]) -> None:
        from deepctr_torch.inputs import DenseFeat, SparseFeat
        from deepctr_torch.models import MMOE

        cols = ([SparseFeat(f"c{i}", v, embedding_dim=embed_dim) for i, v in enumerate(VOCAB_SIZES)]
                + [DenseFeat(f"d{j}", 1) for j in range(N_DENSE)])
        torch.manual_seed(SEED[0])
        self.model = MMOE(cols, num_experts=N_EXPERTS, expert_dnn_hidden_units=EXPERT_UNITS,
                          gate_dnn_hidden_units=(), tower_dnn_hidden_units=TOWER_UNITS, dnn_dropout=DROPOUT,
                          dnn_use_bn=True, task_types=("binary",) * len(TASK_NAMES), task_names=TASK_NAMES,
                          device=device)
        self.model.compile("adam", loss=["binary_crossentropy"] * len(TASK_NAMES))
        self.params = n_params(self.model)
        self.device = device
        self.run(warm)

    def run(self, data: dict[str, torch.Tensor]) -> float:
        x = {k: v.numpy() for k, v in _columns(data).items()}
        y = data["labels"].numpy()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            t0 = time.perf_counter()
            self.model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
            sync(self.device)
        return (time.perf_counter() - t0) / -(-len(y) // BATCH)

    def predict(self, data: dict[str, torch.Tensor]) -> torch.Tensor:
        x = {k: v.numpy() for k, v in _columns(data).items()}
        return torch.as_tensor(self.model.predict(x, batch_size=BATCH)).float().reshape(len(data["labels"]), -1)


class RechubOurLoader(Arm):
    name = "torch-rechub model, mtlbench loader"

    def __init__(self, embed_dim: int, device: str, warm: dict[str, torch.Tensor]) -> None:
        self.model = _rechub_model(embed_dim).to(device)
        self.params = n_params(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR)
        self.device = device
        self.run(warm)

    def run(self, data: dict[str, torch.Tensor]) -> float:
        loader = BatchLoader(Split(dict(data)), BATCH, shuffle=True, generator=torch.Generator().manual_seed(SEED[0]),
                             device=self.device)
        self.model.train()
        t0 = time.perf_counter()
        for batch in loader:
            probs = self.model(_columns(batch))
            loss = F.binary_cross_entropy(probs, batch["labels"], reduction="none").mean(0).sum()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        sync(self.device)
        return (time.perf_counter() - t0) / len(loader)


# ---------------------------------------------------------------------------------------------- GEMM floor

def gemm_shapes(embed_dim: int) -> list[tuple[int, int, int, int]]:
    """(batch of matrices, m, k, n) of every forward matmul of mtlbench's mmoe at this shape."""
    d_in = (len(VOCAB_SIZES) + 1) * embed_dim
    e1, e2 = EXPERT_UNITS
    shapes = [(1, BATCH, N_DENSE, embed_dim), (1, BATCH, d_in, N_EXPERTS * e1), (N_EXPERTS, BATCH, e1, e2)]
    for _ in TASK_NAMES:
        shapes += [(1, BATCH, d_in, N_EXPERTS), (1, BATCH, e2, TOWER_UNITS[0]),
                   (1, BATCH, TOWER_UNITS[0], TOWER_UNITS[1]), (1, BATCH, TOWER_UNITS[1], 1)]
    return shapes


def gemm_floor(embed_dim: int, device: str, reps: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Seconds for the forward matmuls and, per matmul, the two backward ones (dX = dY W^T, dW = X^T dY), in
    ``dtype``."""
    ops: list[Callable[[], torch.Tensor]] = []
    for b, m, k, n in gemm_shapes(embed_dim):
        x, w, dy = (torch.randn(b, *s, device=device, dtype=dtype) for s in ((m, k), (k, n), (m, n)))
        ops += [lambda x=x, w=w: torch.bmm(x, w), lambda dy=dy, w=w: torch.bmm(dy, w.transpose(1, 2)),
                lambda x=x, dy=dy: torch.bmm(x.transpose(1, 2), dy)]
    times = []
    for _ in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        for op in ops:
            op()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


# ---------------------------------------------------------------------------------------------------- main

ARMS = {"mtlbench": Mtlbench, "mtlbench bf16": MtlbenchBf16, "mtlbench before": MtlbenchBefore,
        "torch-rechub": Rechub, "DeepCTR-Torch": DeepCTR,
        "rechub+our loader": RechubOurLoader}
NEEDS = {"torch-rechub": "torch_rechub", "DeepCTR-Torch": "deepctr_torch", "rechub+our loader": "torch_rechub"}


def child(name: str, args: argparse.Namespace) -> None:
    """One arm, one repetition, in this fresh process: prints ``CHILD <seconds per step> <parameters>`` and, with
    ``--quality``, ``AUC <task 1> <task 2>`` on the held-out rows after the arm's epoch."""
    SEED[0] = args.rep
    torch.manual_seed(args.rep)
    np.random.seed(args.rep)  # the peers' loaders shuffle with torch's or numpy's global generator
    data = make_data((args.steps + 1) * BATCH + (TEST_ROWS if args.quality else 0), seed=0)
    warm = {k: v[:BATCH] for k, v in data.items()}
    timed = {k: v[BATCH:(args.steps + 1) * BATCH] for k, v in data.items()}
    arm = ARMS[name](args.embed_dim, args.device, warm)
    print(f"CHILD {arm.run(timed)!r} {arm.params}", flush=True)
    if args.quality:
        from mtlbench.metrics import auc

        test = {k: v[(args.steps + 1) * BATCH:] for k, v in data.items()}
        probs = arm.predict(test)
        print("AUC " + " ".join(repr(auc(test["labels"][:, j], probs[:, j])) for j in range(len(TASK_NAMES))),
              flush=True)


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f}" + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--embed-dim", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per arm and repetition")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="at most 3 steps, 1 repetition")
    ap.add_argument("--no-before", dest="before", action="store_false",
                    help="skip the 'mtlbench before' arm (the loop without issue 13's exact CPU speed-ups)")
    ap.add_argument("--quality", action="store_true",
                    help="also the test AUC of each arm after its one epoch over the timed rows (same rows, same "
                         "held-out set for every arm): the same model should learn the same thing")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rep", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.reps = min(args.steps, 3), 1
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args)
        return 0
    import importlib.util

    names = []
    for name in ARMS:
        if name == "mtlbench before" and (not args.before or not args.device.startswith("cpu")):
            continue
        if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
            print(f"{name}: not installed, skipped (pip install -e '.[bench]')")
            continue
        names.append(name)
    if importlib.util.find_spec("fuxictr") is not None:
        print("FuxiCTR: installed, but its MMoE is in its model_zoo (GitHub), not in the PyPI package: no arm")
    # every arm and repetition in a fresh process, interleaved: process-wide settings (the allocator thresholds
    # mtlbench's loop sets, torch's caches) never leak from one arm into another
    times: dict[str, list[float]] = {n: [] for n in names}
    params: dict[str, int] = {}
    aucs: dict[str, list[list[float]]] = {}
    base = [sys.executable, str(Path(__file__).resolve()), "--embed-dim", str(args.embed_dim), "--steps",
            str(args.steps), "--threads", str(args.threads), "--device", args.device] + (
        ["--quality"] if args.quality else [])
    for rep in range(args.reps):
        for name in names:
            r = subprocess.run(base + ["--child", name, "--rep", str(rep)], capture_output=True, text=True)
            line = next((x for x in r.stdout.splitlines() if x.startswith("CHILD ")), None)
            if r.returncode != 0 or line is None:
                print(f"{name}: failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
                return 1
            _, secs, n = line.split()
            times[name].append(float(secs))
            params[name] = int(n)
            got = next((x for x in r.stdout.splitlines() if x.startswith("AUC ")), None)
            if got is not None:
                aucs.setdefault(name, []).append([float(v) for v in got.split()[1:]])
    from mtlbench.train import keep_freed_memory

    keep_freed_memory()  # the floor without page faults: the best case for the matmuls alone
    floor = gemm_floor(args.embed_dim, args.device)
    floor_bf16 = gemm_floor(args.embed_dim, args.device, dtype=torch.bfloat16) if "mtlbench bf16" in names else None
    med = {n: statistics.median(t) for n, t in times.items()}
    peers = [med[n] for n in ("torch-rechub", "DeepCTR-Torch") if n in med]
    fastest_peer = min(peers) if peers else None
    print(f"\nMMoE, embedding {args.embed_dim}, batch {BATCH}, {args.steps} steps x {args.reps} reps (median; each "
          f"arm and repetition in its own process, interleaved), device {args.device}, {args.threads} thread(s), "
          f"torch {torch.__version__}")
    print("\n| arm | parameters | ms / step | samples / s | x GEMM floor | fastest peer's step / this step |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, t in med.items():
        vs = f"{fastest_peer / t:.2f}" if fastest_peer else "n/a"
        own = floor_bf16 if name == "mtlbench bf16" else floor  # each arm against the floor of its precision
        print(f"| {ARMS[name].name} | {params[name]:,} | {t * 1e3:.1f} | {BATCH / t:,.0f} | "
              f"{t / own:.2f} | {vs} |")
    print(f"| GEMM floor (mtlbench's matmuls alone) | | {floor * 1e3:.1f} | {BATCH / floor:,.0f} | 1.00 | |")
    if floor_bf16 is not None:
        print(f"| GEMM floor in bfloat16 (the bf16 arm's) | | {floor_bf16 * 1e3:.1f} | {BATCH / floor_bf16:,.0f} "
              f"| 1.00 | |")
    if aucs:
        print(f"\nTest AUC after one epoch over the {args.steps * BATCH:,} timed rows (plus the warm-up batch), on "
              f"{TEST_ROWS:,} held-out rows; mean over repetitions (repetition r: every arm initialised and shuffled with seed r), ± std:")
        print(f"\n| arm | {' | '.join(f'AUC {t}' for t in TASK_NAMES)} |\n|---|{'---:|' * len(TASK_NAMES)}")
        for name, runs in aucs.items():
            print(f"| {ARMS[name].name} | "
                  + " | ".join(_mean_std([r[j] for r in runs]) for j in range(len(TASK_NAMES))) + " |")
    ours = med["mtlbench"]
    if "mtlbench bf16" in med:
        print(f"--precision bf16: {med['mtlbench bf16'] * 1e3:.1f} ms / step, {ours / med['mtlbench bf16']:.2f}x the "
              f"fp32 loop, {fastest_peer / med['mtlbench bf16']:.2f}x the fastest peer" if fastest_peer else "")
    if "mtlbench before" in med:
        print(f"\nissue 13's exact CPU speed-ups (allocator thresholds, multi-tensor Adam): "
              f"{med['mtlbench before'] * 1e3:.1f} -> {ours * 1e3:.1f} ms / step ({med['mtlbench before'] / ours:.2f}x)")
    print(f"\ngoal: >= 3x the fastest peer's loop ({fastest_peer / ours:.2f}x)" if fastest_peer else
          "\ngoal: no peer installed, no ratio", f"or within 1.2x of the GEMM floor ({ours / floor:.2f}x)")
    if hasattr(os, "getloadavg"):
        print(f"load average: {' '.join(f'{v:.1f}' for v in os.getloadavg())} (other processes skew timings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
