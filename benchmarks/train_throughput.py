"""Training throughput of mtlbench's ``mmoe`` against a typical open-source MMoE, measured in the same run.

This is a measurement script, not a test: it asserts nothing about speed and is not collected by pytest. It
prints one table row per embedding width. The goal: mtlbench trains at least 3x as many samples per second as
the reference (ratio >= 3.0 in the table).

What is measured
    Training samples per second on CPU: data loading + forward + backward + Adam step, end to end, for the same
    model on the same synthetic data. Each repetition starts a new shuffled pass over the rows (so the per-pass
    cost of shuffling is counted in every repetition) and times its first ``--batches`` batches, or keeps going
    (into further passes) for ``--seconds``. Samples/s is the median over ``--reps`` repetitions. The two sides
    are interleaved (ref, mtlbench, ref, mtlbench, ...) so that noise on the machine hits both. A few un-timed
    warm-up batches run first on each side.

The data
    AliExpress-shaped and synthetic, from a seeded ``torch.Generator``: 16 categorical fields with the vocabulary
    sizes in ``VOCAB_SIZES`` (3 to 20,000; ids drawn with a skew towards small ids, as real id frequencies are),
    63 dense float features, two binary tasks ``ctr`` and ``ctcvr`` (ctcvr = click and conversion, defined on
    every row as in AliExpress, so every label mask is true). ``--rows`` rows (60,000 by default).

The model (identical on both sides, same parameter count; the script checks that, and also loads the reference's
weights into the mtlbench model and compares the outputs in eval mode)
    every categorical field embedded to ``embed_dim``; the 63 dense features projected by one
    ``Linear(63, embed_dim)`` to one more field; the 17 fields concatenated; 8 experts of 512-256 with
    ``Linear -> BatchNorm1d -> ReLU -> Dropout(0.2)`` per layer; per task a ``Linear + softmax`` gate over the
    experts on the concatenated input and a 128-64 tower (same layer pattern) then ``Linear(1)``; loss is
    BCE-with-logits summed over the two tasks; Adam, lr 1e-3; batches of 2048.

Why the reference looks the way it does
    It is written the way MTReclib, torch-rechub and DeepCTR-Torch write theirs (the code here is our own): a
    ``torch.utils.data.Dataset`` over numpy arrays whose ``__getitem__`` returns one sample, a
    ``DataLoader(batch_size=2048, shuffle=True)`` with the default collate and ``num_workers=0``; one
    ``nn.Embedding`` per field; the experts an ``nn.ModuleList`` of ``nn.Sequential`` MLPs called in a Python
    loop and stacked; each gate ``nn.Sequential(Linear, Softmax)`` mixed in with ``torch.bmm``; towers
    ``nn.Sequential``; the stock ``torch.optim.Adam``. Nothing in it is deliberately slow: it is the common
    pattern, written cleanly.

    mtlbench's side uses mtlbench's own pieces: ``Split`` + ``BatchLoader`` (batches are slices of pre-built
    tensors), the registered ``mmoe`` arch (one embedding table with offsets, an ``ExpertBank`` evaluating all
    experts with batched matmuls) and ``task_loss``.

Reading the numbers
    Run it on an otherwise idle machine and check the load average printed under the table. With other
    processes on the cores, torch's intra-op threads oversubscribe them and every parallel op pays for thread
    hand-offs; the reference, which runs several times as many (smaller) ops per step, slows down far more than
    mtlbench, so a busy machine inflates the ratio. ``--threads 1`` is the least noise-sensitive comparison.

How to run (from the repository root)
    .venv/bin/python benchmarks/train_throughput.py              # defaults, well under 3 minutes on 2 cores
    .venv/bin/python benchmarks/train_throughput.py --quick      # ~30 s smoke run
    .venv/bin/python benchmarks/train_throughput.py --embed-dims 16 --threads 1 --reps 5
    .venv/bin/python benchmarks/train_throughput.py --help
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mtlbench.data import CategoricalField, FeatureSchema, Split, TaskSpec
from mtlbench.loader import BatchLoader
from mtlbench.objectives import task_loss
from mtlbench.registry import build_options, get

# AliExpress has 16 categorical fields; these sizes are a plausible mix from tiny (gender-like) to large (id-like).
VOCAB_SIZES = (3, 4, 7, 10, 12, 20, 31, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
N_DENSE = 63
TASK_NAMES = ("ctr", "ctcvr")

N_EXPERTS = 8
EXPERT_UNITS = (512, 256)
TOWER_UNITS = (128, 64)
DROPOUT = 0.2
LR = 1e-3
GOAL = 3.0


# ------------------------------------------------------------------------------------------------------- data

def make_data(rows: int, seed: int) -> dict[str, torch.Tensor]:
    """Synthetic AliExpress-shaped rows: skewed categorical ids, Gaussian dense features, funnel labels."""
    g = torch.Generator().manual_seed(seed)
    vocab = torch.tensor(VOCAB_SIZES, dtype=torch.float64)
    u = torch.rand(rows, len(VOCAB_SIZES), generator=g, dtype=torch.float64)
    categorical = (u.pow(3) * vocab).long().clamp_(max=torch.tensor(VOCAB_SIZES) - 1)
    dense = torch.randn(rows, N_DENSE, generator=g)
    w_click = torch.randn(N_DENSE, generator=g) / N_DENSE ** 0.5
    w_conv = torch.randn(N_DENSE, generator=g) / N_DENSE ** 0.5
    field_effect = (categorical[:, 0].float() - 1.0) * 0.3  # a little signal from one categorical field
    click = torch.rand(rows, generator=g) < torch.sigmoid(dense @ w_click + field_effect - 2.5)
    conv = torch.rand(rows, generator=g) < torch.sigmoid(dense @ w_conv - 1.0)
    labels = torch.stack([click, click & conv], dim=1).float()
    masks = torch.ones(rows, len(TASK_NAMES), dtype=torch.bool)
    return {"categorical": categorical, "dense": dense, "labels": labels, "masks": masks}


# -------------------------------------------------------------------------------------------- the reference

class RecDataset(Dataset):
    """One sample per ``__getitem__``, from numpy arrays, as the common recommendation libraries do it."""

    def __init__(self, categorical: np.ndarray, dense: np.ndarray, labels: np.ndarray) -> None:
        self.categorical, self.dense, self.labels = categorical, dense, labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int):
        return self.categorical[index], self.dense[index], self.labels[index]


def mlp_block(in_dim: int, units: tuple[int, ...], dropout: float, out_dim: int | None = None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for u in units:
        layers += [nn.Linear(in_dim, u), nn.BatchNorm1d(u), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = u
    if out_dim is not None:
        layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class ReferenceMMoE(nn.Module):
    """MMoE as typically written: per-field embeddings, a ModuleList of expert MLPs, Linear+Softmax gates."""

    def __init__(self, vocab_sizes: tuple[int, ...], n_dense: int, embed_dim: int, n_tasks: int,
                 n_experts: int, expert_units: tuple[int, ...], tower_units: tuple[int, ...],
                 dropout: float) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(v, embed_dim) for v in vocab_sizes)
        for emb in self.embeddings:
            nn.init.normal_(emb.weight, std=1e-2)
        self.dense_layer = nn.Linear(n_dense, embed_dim)
        in_dim = (len(vocab_sizes) + 1) * embed_dim
        self.experts = nn.ModuleList(mlp_block(in_dim, expert_units, dropout) for _ in range(n_experts))
        self.gates = nn.ModuleList(nn.Sequential(nn.Linear(in_dim, n_experts), nn.Softmax(dim=1))
                                   for _ in range(n_tasks))
        self.towers = nn.ModuleList(mlp_block(expert_units[-1], tower_units, dropout, out_dim=1)
                                    for _ in range(n_tasks))

    def forward(self, categorical: torch.Tensor, dense: torch.Tensor) -> list[torch.Tensor]:
        fields = [emb(categorical[:, i]) for i, emb in enumerate(self.embeddings)]
        fields.append(self.dense_layer(dense))
        x = torch.stack(fields, dim=1).flatten(1)                             # [B, 17 * d]
        expert_out = torch.stack([expert(x) for expert in self.experts], 1)   # [B, n_experts, 256]
        outputs = []
        for gate, tower in zip(self.gates, self.towers):
            g = gate(x).unsqueeze(1)                                          # [B, 1, n_experts]
            outputs.append(tower(torch.bmm(g, expert_out).squeeze(1)))        # [B, 1]
        return outputs


# ------------------------------------------------------------------------------------------------- two sides

class Side:
    """One model + optimizer + batch stream; ``step()`` trains on the next batch and returns its row count."""

    name: str
    model: nn.Module

    def new_pass(self) -> None:
        raise NotImplementedError

    def step(self) -> int:
        raise NotImplementedError


class ReferenceSide(Side):
    name = "reference"

    def __init__(self, data: dict[str, torch.Tensor], embed_dim: int, batch_size: int, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = ReferenceMMoE(VOCAB_SIZES, N_DENSE, embed_dim, len(TASK_NAMES), N_EXPERTS, EXPERT_UNITS,
                                   TOWER_UNITS, DROPOUT)
        self.model.train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR)
        dataset = RecDataset(data["categorical"].numpy(), data["dense"].numpy(), data["labels"].numpy())
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                 generator=torch.Generator().manual_seed(seed))
        self.it: Iterator = iter(())

    def new_pass(self) -> None:
        self.it = iter(self.loader)

    def step(self) -> int:
        try:
            categorical, dense, labels = next(self.it)
        except StopIteration:
            self.new_pass()
            categorical, dense, labels = next(self.it)
        outputs = self.model(categorical, dense)
        loss = sum(F.binary_cross_entropy_with_logits(o.squeeze(1), labels[:, i]) for i, o in enumerate(outputs))
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return labels.shape[0]


class MtlbenchSide(Side):
    name = "mtlbench"

    def __init__(self, data: dict[str, torch.Tensor], embed_dim: int, batch_size: int, seed: int) -> None:
        schema = FeatureSchema(categorical=tuple(CategoricalField(f"c{i}", v) for i, v in enumerate(VOCAB_SIZES)),
                               dense=tuple(f"d{i}" for i in range(N_DENSE)))
        self.tasks = tuple(TaskSpec(t, "binary", ("auc", "logloss")) for t in TASK_NAMES)
        entry = get("arch", "mmoe")
        options = build_options(entry.options_class, entry.resolve_options(
            {"n_experts": N_EXPERTS, "expert_units": list(EXPERT_UNITS), "tower_units": list(TOWER_UNITS),
             "dropout": DROPOUT, "batch_norm": True}))
        torch.manual_seed(seed)
        self.model = entry.obj(schema, self.tasks, embed_dim, options)
        self.model.train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR)
        self.loader = BatchLoader(Split(dict(data)), batch_size, shuffle=True,
                                  generator=torch.Generator().manual_seed(seed))
        self.it: Iterator = iter(())

    def new_pass(self) -> None:
        self.it = iter(self.loader)

    def step(self) -> int:
        try:
            batch = next(self.it)
        except StopIteration:
            self.new_pass()
            batch = next(self.it)
        out = self.model(batch)
        loss = sum(task_loss(t, out.outputs[i], batch["labels"][:, i], batch["masks"][:, i])
                   for i, t in enumerate(self.tasks))
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return batch["labels"].shape[0]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------- equivalence check

def check_equivalence(ref: ReferenceMMoE, ours: nn.Module, data: dict[str, torch.Tensor]) -> str:
    """Copy the reference's weights into the mtlbench model and compare eval-mode outputs on a few rows.

    Relies on mtlbench internals (ExpertBank's stacked weights, the MLP's Sequential); if those changed, the
    check is reported as skipped rather than failing the measurement."""
    try:
        with torch.no_grad():
            inp = ours.shared["input"]
            inp.embedding.weight.copy_(torch.cat([e.weight for e in ref.embeddings]))
            inp.dense.load_state_dict(ref.dense_layer.state_dict())
            bank = ours.shared["experts"]
            linear_idx = [i for i, m in enumerate(ref.experts[0]) if isinstance(m, nn.Linear)]
            for layer, li in enumerate(linear_idx):
                bank.weights[layer].copy_(torch.stack([e[li].weight.t() for e in ref.experts]))
                bank.biases[layer].copy_(torch.stack([e[li].bias for e in ref.experts]).unsqueeze(1))
                norm = bank.norms[layer].norm
                bns = [e[li + 1] for e in ref.experts]
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(norm, key).copy_(torch.cat([getattr(bn, key) for bn in bns]))
            for i, t in enumerate(TASK_NAMES):
                ours.heads[t]["gate"].load_state_dict(ref.gates[i][0].state_dict())
                ours.heads[t]["tower"].net.load_state_dict(ref.towers[i].state_dict())
            ref.eval(), ours.eval()
            rows = slice(0, 256)
            batch = {k: v[rows] for k, v in data.items()}
            a = ref(batch["categorical"], batch["dense"])
            b = ours(batch).outputs
            diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
        return f"max |logit difference| {diff:.2e} with the reference's weights loaded into mtlbench's model"
    except Exception as exc:  # internals moved: say so, keep measuring
        return f"skipped ({type(exc).__name__}: {exc})"


# --------------------------------------------------------------------------------------------------- timing

def timed_rep(side: Side, batches: int, seconds: float | None) -> tuple[float, int, float]:
    """Start a new pass and train ``batches`` batches (or for ``seconds``); returns samples/s, samples, time."""
    t0 = time.perf_counter()
    side.new_pass()
    samples, done = 0, 0
    while True:
        samples += side.step()
        done += 1
        elapsed = time.perf_counter() - t0
        if (seconds is not None and elapsed >= seconds) or (seconds is None and done >= batches):
            return samples / elapsed, samples, elapsed


def warm_up(side: Side, batches: int) -> None:
    side.new_pass()
    for _ in range(batches):
        side.step()


def _load() -> str:
    """The 1-minute load average: other processes on the cores skew the numbers (see the docstring)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=60_000, help="synthetic rows (default 60000)")
    p.add_argument("--embed-dims", default="16,128", help="comma-separated embedding widths (default 16,128)")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=2, help="un-timed batches per side and width (default 2)")
    p.add_argument("--batches", type=int, default=None,
                   help="timed batches per repetition (default: 10 for width <= 32, 5 above)")
    p.add_argument("--seconds", type=float, default=None,
                   help="time each repetition for this many seconds instead of a batch count")
    p.add_argument("--reps", type=int, default=3, help="repetitions per side (median reported; default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 20000 rows, 1 warm-up, 2 batches, 3 reps")
    p.add_argument("--no-check", action="store_true", help="skip the weight-copy equivalence check")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.warmup = min(args.rows, 20_000), 1
        args.batches = args.batches or 2
    if args.reps < 3:
        p.error("--reps must be at least 3 (the median of fewer is not robust)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dims = [int(d) for d in args.embed_dims.split(",") if d.strip()]

    load_start = _load()
    data = make_data(args.rows, args.seed)
    rates_pos = ", ".join(f"{r:.3f}" for r in data["labels"].mean(0).tolist())
    print(f"mmoe training throughput: {args.rows:,} rows, {len(VOCAB_SIZES)} categorical fields "
          f"(vocab {min(VOCAB_SIZES)}..{max(VOCAB_SIZES)}, {sum(VOCAB_SIZES):,} ids), {N_DENSE} dense, "
          f"tasks {'/'.join(TASK_NAMES)} (positive rates {rates_pos})")
    print(f"batch {args.batch_size}, {N_EXPERTS} experts {'-'.join(map(str, EXPERT_UNITS))}, towers "
          f"{'-'.join(map(str, TOWER_UNITS))}-1, dropout {DROPOUT}, Adam lr {LR}; median of {args.reps} "
          f"interleaved repetitions", flush=True)

    results = []
    for d in dims:
        batches = args.batches or (10 if d <= 32 else 5)
        ref = ReferenceSide(data, d, args.batch_size, args.seed)
        ours = MtlbenchSide(data, d, args.batch_size, args.seed)
        if not args.no_check:
            # on throw-away copies, so the timed models start from their own initialisation
            ref_check = ReferenceSide(data, d, args.batch_size, args.seed).model
            ours_check = MtlbenchSide(data, d, args.batch_size, args.seed).model
            print(f"  embed {d}: {check_equivalence(ref_check, ours_check, data)}", flush=True)
            del ref_check, ours_check
        warm_up(ref, args.warmup)
        warm_up(ours, args.warmup)
        rates: dict[str, list[float]] = {"reference": [], "mtlbench": []}
        for _ in range(args.reps):
            for side in (ref, ours):
                rate, _, _ = timed_rep(side, batches, args.seconds)
                rates[side.name].append(rate)
        r_ref, r_ours = statistics.median(rates["reference"]), statistics.median(rates["mtlbench"])
        results.append((d, r_ref, r_ours, n_params(ref.model), n_params(ours.model)))
        what = f"{args.seconds:g} s" if args.seconds is not None else f"{batches} batches"
        print(f"  embed {d}: per-repetition samples/s ({what} each): reference "
              f"{', '.join(f'{r:,.0f}' for r in rates['reference'])}; mtlbench "
              f"{', '.join(f'{r:,.0f}' for r in rates['mtlbench'])}", flush=True)

    print()
    head = (f"{'embed':>5}  {'reference/s':>11}  {'mtlbench/s':>10}  {'ratio':>6}  {'ref params':>11}  "
            f"{'mtl params':>11}")
    print(head)
    print("-" * len(head))
    for d, r_ref, r_ours, p_ref, p_ours in results:
        flag = "" if p_ref == p_ours else "  (parameter counts differ!)"
        print(f"{d:>5}  {r_ref:>11,.0f}  {r_ours:>10,.0f}  {r_ours / r_ref:>5.2f}x  {p_ref:>11,}  {p_ours:>11,}{flag}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {load_start} at start, {_load()} at end; goal: mtlbench >= {GOAL:g}x the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
