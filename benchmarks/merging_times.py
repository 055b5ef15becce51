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

    python benchmarks/merging_times.py --results-dir results/published/runs [--dataset text8] [--out FILE.md]
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
    extra = f" {o['granularity']}-wise{'++' if o['ties'] else ''}" if spec["merger"] == "adamerging" else ""
    return f"{spec['merger']}{extra} [{spec['data_access']}{', task id' if spec['needs_task_id'] else ''}]"


def accuracy_table(merges: list[dict], joint: list[dict]) -> list[str]:
    """Mean test accuracy and mean normalised accuracy (/ the same seed's experts) per method, mean over seeds."""
    experts = {r["spec"]["seed"]: r["merge"]["expert_accuracy"]["test"] for r in merges}
    rows: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for rec in merges + joint:
        test = {t: m["accuracy"] for t, m in rec["metrics"]["test"].items()}
        ref = experts.get(rec["spec"]["seed"])
        norm = statistics.fmean(test[t] / ref[t] for t in test) if ref else float("nan")
        rows[_label(rec)].append((statistics.fmean(test.values()), norm))
    out = ["## Test accuracy (%, mean over tasks; normalised = merged / same-seed expert)", "",
           "| method | seeds | mean accuracy | normalised |", "|---|---|---|---|"]
    for name, vals in sorted(rows.items(), key=lambda kv: -statistics.fmean(v[0] for v in kv[1])):
        out.append(f"| {name} | {len(vals)} | {100 * statistics.fmean(v[0] for v in vals):.1f} | "
                   f"{100 * statistics.fmean(v[1] for v in vals):.1f} |")
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
              "| merger | options | runs | merge | final eval | wall | val evaluations | threads |",
              "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for rec in records:
        opts = json.dumps(rec["spec"]["merger_options"], sort_keys=True)
        groups[(rec["spec"]["merger"], opts)].append(rec)
    for (name, opts), recs in sorted(groups.items()):
        c = [r["merge"]["cost"] for r in recs]
        short = ", ".join(f"{k}={v}" for k, v in json.loads(opts).items()
                          if k in ("granularity", "ties", "steps", "lr", "batch_per_task"))
        lines.append(f"| {name} | {short} | {len(recs)} | {statistics.fmean(x['merge_seconds'] for x in c):.1f} | "
                     f"{statistics.fmean(x['eval_seconds'] for x in c):.1f} | "
                     f"{statistics.fmean(r['wall_seconds'] for r in recs):.1f} | "
                     f"{statistics.fmean(x['val_evaluations'] for x in c):.0f} | {c[0].get('threads')} |")
    per_seed: dict[int, float] = defaultdict(float)
    for rec in records:
        per_seed[rec["spec"]["seed"]] += rec["wall_seconds"]
    lines += ["", "## The full table from a cached zoo", ""]
    for seed, total in sorted(per_seed.items()):
        verdict = "within" if total <= GOAL_SECONDS else "over"
        lines.append(f"- seed {seed}: {total / 60:.1f} min for {sum(r['spec']['seed'] == seed for r in records)} "
                     f"merge runs ({verdict} the {GOAL_SECONDS // 60}-minute goal)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results-dir", default="results/published/runs")
    ap.add_argument("--dataset", default="text8")
    ap.add_argument("--out", help="also write the report to this markdown file")
    args = ap.parse_args()
    text = report(*load(Path(args.results_dir), args.dataset))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
