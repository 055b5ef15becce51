"""How far a reduced AdaMerging budget is from the official recipe, on one seed of the text8 zoo.

The official recipe (EnnengYang/AdaMerging ``main_*_adamerging.py``) is 500 Adam steps at lr 1e-3 of 32 unlabelled
inputs per task; it does not fit the published table's CPU budget (measured step time x 500 x 4 variants x 3
seeds). This script runs, on the cached zoo of ``--config``'s recipe and one seed, the official recipe with
the coefficients kept after steps ``--checkpoints`` (default 20, 100, 500), and any number of reduced recipes
(``--reduced STEPS:BATCH:LR``), and prints the test mean accuracy and normalised accuracy (/ the same seed's
experts) of each, plus the step time. Same evaluator, same adaptation split and generator seed as a merge run.

    python benchmarks/adamerging_budget.py --config results/published/configs/text8_merging.yaml --seed 0 \\
        --granularity task --reduced 20:16:0.01 [--out FILE.md]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from mtlbench import registry
from mtlbench.baselines.merging.adamerging import AdaMerging, merged_delta
from mtlbench.cli import merge_plan, settings_of
from mtlbench.merge_run import prepare


class Checkpointed(AdaMerging):
    """AdaMerging that keeps its coefficients after the given steps (and the wall time to reach them)."""

    def __init__(self, options, checkpoints: set[int]) -> None:
        super().__init__(options)
        self.checkpoints, self.saved, self.started = checkpoints, {}, time.perf_counter()

    def after_step(self, step: int, coef: torch.Tensor) -> None:
        if step in self.checkpoints or step == self.options.steps:
            self.saved[step] = (coef.clone(), time.perf_counter() - self.started)


def run(bench, seed: int, options: dict, checkpoints: set[int], log) -> list[dict]:
    entry = registry.get("merger", "adamerging")
    m = Checkpointed(registry.build_options(entry.options_class, options), checkpoints)
    ctx = bench.context(m.access, "adamerging", seed, log)
    torch.manual_seed(seed)
    m.started = time.perf_counter()
    m.merge(bench.tv, ctx)
    matrix, sizes = m.vectors(bench.tv), bench.tv.sizes if m.options.granularity == "layer" else None
    rows = []
    for step, (coef, seconds) in sorted(m.saved.items()):
        with torch.no_grad():
            acc = bench.accuracy(merged_delta(coef, matrix, sizes), "test")
        ref = bench.expert_acc["test"]
        rows.append({"steps": step, "batch_per_task": m.options.batch_per_task, "lr": m.options.lr,
                     "seconds": seconds, "mean_accuracy": statistics.fmean(acc.values()),
                     "normalized": statistics.fmean(acc[t] / ref[t] for t in acc),
                     "coefficients_mean": coef.mean().item(), "test_accuracy": acc})
        log(f"{options}: step {step}: test mean {rows[-1]['mean_accuracy']:.4f} ({seconds:.0f} s)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="results/published/configs/text8_merging.yaml")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--granularity", choices=("task", "layer"), default="task")
    ap.add_argument("--ties", action="store_true", help="AdaMerging++")
    ap.add_argument("--checkpoints", default="20,100,500")
    ap.add_argument("--official-steps", type=int, default=500)
    ap.add_argument("--reduced", nargs="*", default=[], metavar="STEPS:BATCH:LR")
    ap.add_argument("--out", help="also write the table (markdown) and the rows (.json next to it)")
    args = ap.parse_args()
    st, training = settings_of(["--config", args.config, "--seeds", f"{args.seed}-{args.seed}"])
    recipes, _ = merge_plan(st, training)
    torch.set_num_threads(int(recipes[0].threads))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    bench = prepare(recipes[0], st["data_dir"] or os.environ.get("MTLBENCH_DATA_DIR"), st["zoo_dir"],
                    train_missing=False, log=log)
    base = {"granularity": args.granularity, "ties": args.ties}
    rows = []
    for spec in args.reduced:
        steps, batch, lr = spec.split(":")
        rows += run(bench, args.seed, {**base, "steps": int(steps), "batch_per_task": int(batch), "lr": float(lr)},
                    set(), log)
    rows += run(bench, args.seed, {**base, "steps": args.official_steps},  # the official defaults otherwise
                {int(c) for c in args.checkpoints.split(",")}, log)
    name = f"AdaMerging{'++' if args.ties else ''} {args.granularity}-wise, seed {args.seed}"
    lines = [f"## {name}: reduced budgets vs the official recipe (500 steps x 32/task, lr 1e-3)", "",
             "| steps | inputs/task/step | lr | test mean accuracy | normalised | mean coefficient | wall (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['steps']} | {r['batch_per_task']} | {r['lr']:g} | {100 * r['mean_accuracy']:.2f} | "
                     f"{100 * r['normalized']:.2f} | {r['coefficients_mean']:.3f} | {r['seconds']:.0f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
