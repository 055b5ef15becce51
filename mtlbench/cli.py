"""The command line: `mtlbench run`, `mtlbench list`.

Every bad input ends in one line on stderr (``mtlbench: error: ...``) and a non-zero exit, never a traceback:
exit 2 for bad input, 1 for a run that failed (it is recorded as failed), 130 for Ctrl-C (nothing recorded).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import Any, NoReturn, Sequence

from mtlbench import registry
from mtlbench.errors import MtlbenchError, RunFailed

DEFAULT_RESULTS_DIR = os.path.join("results", "runs")
DATA_DIR_ENV = "MTLBENCH_DATA_DIR"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        self.exit(2, f"mtlbench: error: {message} (see 'mtlbench {self.prog.split()[-1]} --help')\n"
                  if " " in self.prog else f"mtlbench: error: {message} (see 'mtlbench --help')\n")


def _key_values(items: list[str] | None, flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise MtlbenchError(f"{flag} expects KEY=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        out[k.strip()] = registry.parse_value(v)
    return out


def _csv(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mtlbench", description="Multi-task learning benchmarks: runs, methods, datasets.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    r = sub.add_parser("run", help="train and evaluate one run, store its record")
    r.add_argument("--dataset", default="ecommerce", help="dataset name (default: the embedded 'ecommerce')")
    r.add_argument("--tasks", help="comma-separated tasks (default: all of the dataset's)")
    r.add_argument("--arch", default="shared_bottom", help="architecture name (default: shared_bottom)")
    r.add_argument("--optimizer", default="ew", help="MTL optimizer name (default: ew)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--epochs", type=int, help="maximum epochs (default: the dataset's suggestion)")
    r.add_argument("--batch-size", type=int)
    r.add_argument("--lr", type=float)
    r.add_argument("--weight-decay", type=float, default=1e-6)
    r.add_argument("--patience", type=int, default=3, help="early stopping on validation (0: never stop early)")
    r.add_argument("--embed-dim", type=int, default=16, help="embedding width shared by all archs")
    r.add_argument("--selection", default="mean_primary", help="model selection on validation: "
                   "mean_primary (mean primary metric over tasks) or val_loss")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    r.add_argument("-A", "--arch-option", action="append", metavar="KEY=VALUE", help="architecture option")
    r.add_argument("-O", "--optimizer-option", action="append", metavar="KEY=VALUE", help="optimizer option")
    r.add_argument("-D", "--dataset-option", action="append", metavar="KEY=VALUE", help="dataset option")
    r.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR)
    r.add_argument("--data-dir", default=None, help=f"data directory (default: ${DATA_DIR_ENV})")
    r.add_argument("--plugin", action="append", metavar="FILE_OR_MODULE", help="load a plugin first")
    r.add_argument("--force", action="store_true", help="rerun even if this exact run already finished")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    ls = sub.add_parser("list", help="list datasets, archs, optimizers and metrics")
    ls.add_argument("--verbose", "-v", action="store_true", help="also show every option and its default")
    ls.add_argument("--plugin", action="append", metavar="FILE_OR_MODULE")
    return p


def _load_plugins(targets: list[str] | None) -> None:
    registry.load_builtins()
    for t in targets or []:
        registry.load_plugin(t)


def cmd_list(args: argparse.Namespace) -> int:
    _load_plugins(args.plugin)
    titles = {"dataset": "Datasets", "arch": "Architectures", "optimizer": "Optimizers", "metric": "Metrics"}
    for kind in ("dataset", "arch", "optimizer", "metric"):
        print(titles[kind])
        entries = registry.entries(kind)
        width = max((len(e.name) for e in entries), default=0)
        for e in entries:
            extra = ""
            if kind == "dataset" and e.obj.task_names():
                extra = f"  [tasks: {', '.join(e.obj.task_names())}]"
            if kind == "metric":
                extra = f"  [{'higher' if e.obj.direction == 'max' else 'lower'} is better]"
            origin = "" if e.builtin else f"  (plugin: {e.module})"
            print(f"  {e.name:<{width}}  {e.description}{extra}{origin}")
            if args.verbose and e.options_class is not None:
                for f in dataclasses.fields(e.options_class):
                    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
                    print(f"  {'':<{width}}    {f.name} = {default!r}")
        print()
    return 0


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.4f}"


def print_summary(record: dict[str, Any], path: str) -> None:
    spec = record["spec"]
    tasks = spec["tasks"]
    metric_names: list[str] = []
    for t in record["dataset"]["tasks"]:
        for m in t["metrics"]:
            if m not in metric_names:
                metric_names.append(m)
    cols = [f"{split} {m}" for split in ("val", "test") for m in metric_names]
    width = max(len(t) for t in tasks + ["task"])
    print(f"{'task':<{width}}  " + "  ".join(f"{c:>12}" for c in cols))
    for t in tasks:
        row = []
        for split in ("val", "test"):
            for m in metric_names:
                row.append(f"{_fmt(record['metrics'][split][t].get(m)):>12}")
        print(f"{t:<{width}}  " + "  ".join(row))
    sps = record.get("train_samples_per_s")
    print(f"selected epoch {record['selected_epoch']} of {record['epochs_run']} (on validation); "
          f"{record['wall_seconds']:.1f} s wall, {sps:,.0f} train samples/s" if sps else "")
    print(f"record: {path}")


def cmd_run(args: argparse.Namespace) -> int:
    from mtlbench.spec import build_spec
    from mtlbench.store import ensure_writable, finished_record
    from mtlbench.train import run

    _load_plugins(args.plugin)
    tasks = _csv(args.tasks)
    spec = build_spec(dataset=args.dataset, tasks=tasks, arch=args.arch, optimizer=args.optimizer, seed=args.seed,
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      patience=args.patience, embed_dim=args.embed_dim, device=args.device,
                      selection=args.selection,
                      dataset_options=_key_values(args.dataset_option, "--dataset-option"),
                      arch_options=_key_values(args.arch_option, "--arch-option"),
                      optimizer_options=_key_values(args.optimizer_option, "--optimizer-option"))
    ensure_writable(args.results_dir)
    done = None if args.force else finished_record(args.results_dir, spec.run_id)
    if done is not None:
        print(f"already done: {spec.label()}; record: {done[0]} (use --force to rerun)")
        return 0
    quiet = args.quiet
    log = None if quiet else (lambda msg: print(msg, file=sys.stderr))
    if not quiet:
        print(f"run {spec.run_id}: {spec.label()} on {spec.device}", file=sys.stderr)
    data_dir = args.data_dir or os.environ.get(DATA_DIR_ENV)
    path, record = run(spec, args.results_dir, data_dir=data_dir, progress=not quiet and sys.stderr.isatty(),
                       log=log)
    print_summary(record, str(path))
    return 0


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return {"run": cmd_run, "list": cmd_list}[args.command](args)
    except RunFailed as exc:
        print(f"mtlbench: run failed: {_one_line(exc)} (recorded as failed)", file=sys.stderr)
        return 1
    except MtlbenchError as exc:
        print(f"mtlbench: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mtlbench: interrupted; nothing was recorded for the unfinished run", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
