"""Wall time of the merging benchmark: the expert zoo per task, and each merger on the cached zoo.

A measurement script (not collected by pytest). It reads what the merge records already hold, so it costs
nothing to rerun:

- zoo: each expert's wall time and training time, from the expert records the merge records point to (the
  expert is trained once, by the suite's training loop, and cached; every merge record lists its zoo);
- mergers: each merge run's ``merge_seconds`` (the merger itself: grid searches on validation, AdaMerging's
  steps), ``eval_seconds`` (the final val + test evaluation) and ``wall_seconds`` (everything but the zoo);
- the table from a cached zoo: the sum of the merge runs' wall times of one seed, against the goal of 15 minutes
  on 2 CPU cores for the full 8-task table.

Timings depend on the load of the machine: the records carry the thread count and environment; on a shared
machine read them as upper bounds.

``--table SEEDS`` runs (``--force``) the whole published table of the given configs from the cached zoo in ONE
process per seed (one bench: data, θ0, task vectors and the experts' evaluation are prepared once and shared by
every merger, AdaMerging variants included) and prints its end-to-end wall time; the records it stores are the
published ones. Run it alone on a quiet core (``taskset -c 1``, one thread, as the configs say).

    python benchmarks/merging_times.py --results-dir results/published/runs [--dataset text8] [--out FILE.md]
    python benchmarks/merging_times.py --table 0 --configs results/published/configs/text8_merging.yaml \
        results/published/configs/text8_adamerging_task.yaml ...
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

GOAL_SECONDS = 15 * 60


def load(results_dir: Path, dataset: str) -> tuple[list[dict], list[dict]]:
    """The ok merge records and the ok joint-training records of ``dataset``."""
    merges, joint = [], []
    for p in sorted(results_dir.glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except ValueError:
            continue
        if rec.get("status") != "ok" or rec.get("spec", {}).get("dataset") != dataset:
            continue
        (merges if rec["spec"].get("merger") else joint).append(rec)
    return merges, joint


def _label(rec: dict) -> str:
    spec = rec["spec"]
    if not spec.get("merger"):
        return f"joint {spec['optimizer']}" + (" (rep)" if spec["optimizer_options"].get("rep") else "")
    o = spec["merger_options"]
    extra = ""
    if spec["merger"] == "adamerging":
        extra = (f" {o['granularity']}-wise{'++' if o['ties'] else ''} ({o['steps']} steps x {o['batch_per_task']}"
                 f"/task, lr {o['lr']:g})")
    elif spec["merger"] == "consensus":
        extra = f" k={o['k']}"
    return f"{spec['merger']}{extra} [{spec['data_access']}{', task id' if spec['needs_task_id'] else ''}]"


def _pm(values: list[float]) -> str:
    """mean ± sample std in %, or the mean alone for one seed."""
    m = 100 * statistics.fmean(values)
    return f"{m:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{m:.1f}"


def accuracy_table(merges: list[dict], joint: list[dict]) -> list[str]:
    """Mean test accuracy and mean normalised accuracy (/ the same seed's experts) per method, mean ± std over
    seeds (sample std)."""
    experts = {r["spec"]["seed"]: r["merge"]["expert_accuracy"]["test"] for r in merges}
    rows: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for rec in merges + joint:
        test = {t: m["accuracy"] for t, m in rec["metrics"]["test"].items()}
        ref = experts.get(rec["spec"]["seed"])
        norm = statistics.fmean(test[t] / ref[t] for t in test) if ref else float("nan")
        rows[_label(rec)].append((statistics.fmean(test.values()), norm))
    out = ["## Test accuracy (%, mean over tasks, mean ± std over seeds; normalised = merged / same-seed expert)",
           "", "| method | seeds | mean accuracy | normalised |", "|---|---|---|---|"]
    for name, vals in sorted(rows.items(), key=lambda kv: -statistics.fmean(v[0] for v in kv[1])):
        out.append(f"| {name} | {len(vals)} | {_pm([v[0] for v in vals])} | {_pm([v[1] for v in vals])} |")
    return out + [""]


def report(records: list[dict], joint: list[dict] | None = None) -> str:
    if not records:
        return "no merge records found"
    lines = accuracy_table(records, joint or []) + ["## Expert zoo: wall time per task (s)", "", "| task | seeds | wall (mean) | training (mean) |",
             "|---|---|---|---|"]
    zoo: dict[str, dict[str, float]] = defaultdict(dict)
    for rec in records:
        for z in rec["merge"]["zoo"]:
            zoo[z["task"]][z["key"]] = (z["wall_seconds"], z["train_seconds"])
    for task, by_key in zoo.items():
        walls = [w for w, _ in by_key.values() if w is not None]
        trains = [t for _, t in by_key.values() if t is not None]
        lines.append(f"| {task} | {len(by_key)} | {statistics.fmean(walls):.1f} | {statistics.fmean(trains):.1f} |")
    lines += ["", "## Mergers on the cached zoo (s, mean over seeds)", "",
              "| merger | options | runs | merge | final eval | wall | val evaluations | reused | threads |",
              "|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for rec in records:
        opts = json.dumps(rec["spec"]["merger_options"], sort_keys=True)
        groups[(rec["spec"]["merger"], opts)].append(rec)
    for (name, opts), recs in sorted(groups.items()):
        c = [r["merge"]["cost"] for r in recs]
        short = ", ".join(f"{k}={v}" for k, v in json.loads(opts).items()
                          if k in ("granularity", "ties", "steps", "lr", "batch_per_task")
                          or (k == "k" and name == "consensus"))
        lines.append(f"| {name} | {short} | {len(recs)} | {statistics.fmean(x['merge_seconds'] for x in c):.1f} | "
                     f"{statistics.fmean(x['eval_seconds'] for x in c):.1f} | "
                     f"{statistics.fmean(r['wall_seconds'] for r in recs):.1f} | "
                     f"{statistics.fmean(x['val_evaluations'] for x in c):.0f} | "
                     f"{statistics.fmean(x.get('reused_evaluations', 0) for x in c):.1f} | {c[0].get('threads')} |")
    lines += ["", "## The full table from a cached zoo", "",
              "One bench per process (data, θ0, task vectors, the experts' evaluation: `bench`), then every merge run "
              "(`wall`, final evaluation included).", ""]
    per_seed: dict[int, dict] = defaultdict(lambda: {"benches": set(), "wall": 0.0, "runs": 0})
    for rec in records:
        seed = per_seed[rec["spec"]["seed"]]
        seed["benches"].add(rec["merge"]["cost"].get("bench_seconds"))
        seed["wall"] += rec["wall_seconds"]
        seed["runs"] += 1
    for seed, v in sorted(per_seed.items()):
        bench = sum(b for b in v["benches"] if b is not None)
        total = bench + v["wall"]
        verdict = "within" if total <= GOAL_SECONDS else "over"
        lines.append(f"- seed {seed}: {total / 60:.1f} min = {len(v['benches'])} bench(es) {bench:.0f} s + {v['runs']} "
                     f"merge runs {v['wall']:.0f} s ({verdict} the {GOAL_SECONDS // 60}-minute goal)")
    return "\n".join(lines)


def run_table(configs: list[str], seeds: str, results_dir: str | None) -> None:
    """Every merger of ``configs`` (which must share one recipe) on each seed's cached zoo, one bench per seed."""
    import os
    import sys
    import time

    import torch

    from mtlbench.cli import merge_plan, settings_of
    from mtlbench.merge_run import run_merges
    from mtlbench.results.store import ensure_writable

    plans = []
    for path in configs:
        argv = ["--config", path, "--seeds", seeds] + (["--results-dir", results_dir] if results_dir else [])
        st, training = settings_of(argv)
        plans.append((st, *merge_plan(st, training)))
    st, recipes, _ = plans[0]
    for path, (other, rec, _) in zip(configs, plans):
        if [r.run_id for r in rec] != [r.run_id for r in recipes] or other["results_dir"] != st["results_dir"]:
            raise SystemExit(f"{path}: another recipe or results directory than {configs[0]}; one table, one recipe")
    mergers: list = []
    for _, _, ms in plans:
        mergers += [m for m in ms if m not in mergers]
    ensure_writable(st["results_dir"])
    torch.set_num_threads(int(recipes[0].threads))
    data_dir = st["data_dir"] or os.environ.get("MTLBENCH_DATA_DIR")
    for recipe in recipes:
        t0 = time.perf_counter()
        done, _, failed = run_merges([recipe], mergers, st["results_dir"], data_dir=data_dir, force=True,
                                     zoo=st["zoo_dir"], log=lambda msg: print(msg, file=sys.stderr, flush=True))
        print(f"table seed {recipe.seed}: {len(mergers)} merge runs ({done} ok, {failed} failed) from the cached zoo "
              f"in {time.perf_counter() - t0:.1f} s, {torch.get_num_threads()} thread(s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results-dir", default=None, help="default: the configs' (report: results/published/runs)")
    ap.add_argument("--dataset", default="text8")
    ap.add_argument("--out", help="also write the report to this markdown file")
    ap.add_argument("--table", metavar="SEEDS", help="run the full table of --configs on these seeds (e.g. 0-2)")
    ap.add_argument("--configs", nargs="+", default=[], help="merge configs of one recipe (with --table)")
    args = ap.parse_args()
    if args.table is not None:
        if not args.configs:
            raise SystemExit("--table needs --configs")
        run_table(args.configs, args.table, args.results_dir)
        return
    args.results_dir = args.results_dir or "results/published/runs"
    text = report(*load(Path(args.results_dir), args.dataset))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
