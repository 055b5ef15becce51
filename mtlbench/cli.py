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

from pathlib import Path

from mtlbench import registry, sweep
from mtlbench.errors import MtlbenchError, RunFailed, unknown

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


# every `run` setting: (type, default). Flags override the --config file, which overrides these defaults.
RUN_SETTINGS: dict[str, tuple[type, Any]] = {
    "dataset": (list, ["ecommerce"]), "tasks": (list, None), "arch": (list, ["shared_bottom"]),
    "optimizer": (list, ["ew"]), "seeds": (list, [0]), "epochs": (int, None), "batch_size": (int, None),
    "lr": (float, None), "weight_decay": (float, 1e-6), "patience": (int, 3), "embed_dim": (int, None),
    "selection": (str, "mean_primary"), "device": (str, "auto"), "arch_options": (dict, {}),
    "optimizer_options": (dict, {}), "dataset_options": (dict, {}), "results_dir": (str, DEFAULT_RESULTS_DIR),
    "data_dir": (str, None), "plugins": (list, []), "jobs": (int, None), "threads": (int, None), "executor": (str, "local"),
    "ray_address": (str, None), "force": (bool, False), "quiet": (bool, False), "log": (list, []),
    "dry_run": (bool, False), "ablate": (list, []),
}


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mtlbench", description="Multi-task learning benchmarks: runs, methods, datasets.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    r = sub.add_parser("run", help="train and evaluate one run or a sweep, store the records")
    r.add_argument("--config", help="a YAML or JSON file of run settings (flags override it)")
    r.add_argument("--dataset", help="dataset name(s), comma-separated (default: the embedded 'ecommerce')")
    r.add_argument("--tasks", help="comma-separated tasks (default: all of the dataset's); several task sets "
                   "separated by ';'")
    r.add_argument("--arch", help="architecture name(s), comma-separated (default: shared_bottom)")
    r.add_argument("--optimizer", help="MTL optimizer name(s), comma-separated (default: ew)")
    r.add_argument("--seed", type=int, help="one seed (default 0)")
    r.add_argument("--seeds", help=sweep.SEEDS_HELP)
    r.add_argument("--epochs", type=int, help="maximum epochs (default: the dataset's suggestion)")
    r.add_argument("--batch-size", type=int)
    r.add_argument("--lr", type=float)
    r.add_argument("--weight-decay", type=float, help="default 1e-6")
    r.add_argument("--patience", type=int, help="early stopping on validation (default 3; 0: never stop early)")
    r.add_argument("--embed-dim", type=int, help="embedding width shared by all archs: every categorical field's embedding and the dense "
                   "projection (default: the dataset's suggestion, shown by `list -v`, else 16)")
    r.add_argument("--selection", help="model selection on validation: mean_primary (default: mean primary "
                   "metric over tasks) or val_loss")
    r.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    r.add_argument("-A", "--arch-option", action="append", metavar="KEY=VALUE", help="architecture option")
    r.add_argument("-O", "--optimizer-option", action="append", metavar="KEY=VALUE", help="optimizer option")
    r.add_argument("-D", "--dataset-option", action="append", metavar="KEY=VALUE", help="dataset option")
    r.add_argument("--results-dir", help=f"where records go (default: {DEFAULT_RESULTS_DIR})")
    r.add_argument("--data-dir", help=f"data directory (default: ${DATA_DIR_ENV})")
    r.add_argument("--plugin", action="append", metavar="FILE_OR_MODULE", help="load a plugin first")
    r.add_argument("--jobs", type=int, help="parallel runs in a sweep (default: one per core)")
    r.add_argument("--threads", type=int, help="torch threads per run (default: the cores divided among the "
                   "parallel runs); results can differ in the last digits between thread counts")
    r.add_argument("--executor", help="local (default: processes on this machine) or ray")
    r.add_argument("--ray-address", help="a Ray cluster to join (default: start a local one)")
    r.add_argument("--log", help="mirror metrics to mlflow and/or tensorboard (comma-separated; optional extras)")
    r.add_argument("--force", action="store_true", default=None, help="rerun runs that already finished")
    r.add_argument("--quiet", action="store_true", default=None, help="no progress output")
    r.add_argument("--ablate", metavar="SWITCHES",
                   help="comma-separated on/off arch options (e.g. feature_gate,self_gate): the full model plus one "
                   "run per switch flipped, crossed with the rest of the grid")
    r.add_argument("--dry-run", action="store_true", default=None,
                   help="list the expanded runs and which are already done; train nothing")
    lb = sub.add_parser("leaderboard", help="regenerate tables, statistics and plots from stored records")
    lb.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR, help="where the run records are")
    lb.add_argument("--out", default=os.path.join("results", "leaderboard"), help="output directory")
    lb.add_argument("--flat-delta-m", action="store_true", help="Δm%% over every task metric, not just primary")
    lb.add_argument("--baseline", help="ARCH or ARCH:OPTIMIZER every method is also tested against (default: the "
                    "single-task baseline of the Δm%% column)")
    lb.add_argument("--format", default="md,csv,tex,json,html", help="comma-separated: md, csv, tex, json, html")
    cmp_ = sub.add_parser("compare", help="two methods on one dataset: per-task differences, CIs, p-values")
    cmp_.add_argument("a", help="ARCH or ARCH:OPTIMIZER (e.g. home:ew)")
    cmp_.add_argument("b", help="ARCH or ARCH:OPTIMIZER")
    cmp_.add_argument("--dataset", help="dataset name (needed when the methods share several)")
    cmp_.add_argument("--tasks", help="task set, comma-separated (needed when there are several)")
    cmp_.add_argument("--split", default="test", help="split to compare on (default test)")
    cmp_.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR)
    ls = sub.add_parser("list", help="list datasets, archs, optimizers and metrics")
    ls.add_argument("--verbose", "-v", action="store_true", help="also show every option and its default")
    ls.add_argument("--plugin", action="append", metavar="FILE_OR_MODULE")
    return p


def _read_config(path: str) -> dict[str, Any]:
    import json

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise MtlbenchError(f"config file '{path}' cannot be read: {exc.strerror or exc}") from exc
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise MtlbenchError(f"config file '{path}' does not parse: {' '.join(str(exc).split())}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MtlbenchError(f"config file '{path}' must hold a mapping of settings, got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        k = str(key).replace("-", "_")
        if k == "seed":
            k, value = "seeds", [value]
        if k not in RUN_SETTINGS:
            raise unknown(f"setting in config file '{path}'", key, RUN_SETTINGS)
        out[k] = _check_type(k, value, f"config file '{path}'")
    return out


def _check_type(key: str, value: Any, where: str) -> Any:
    tp = RUN_SETTINGS[key][0]
    if value is None:
        return None
    if tp is list:
        if key == "seeds" and isinstance(value, (str, int)):
            return sweep.parse_seeds(str(value))
        if key == "tasks" and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return [value]  # one task set
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise MtlbenchError(f"{where}: '{key}' must be a list or a comma-separated string, got {value!r}")
        return value
    if tp is dict and not isinstance(value, dict):
        raise MtlbenchError(f"{where}: '{key}' must be a mapping, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise MtlbenchError(f"{where}: '{key}' must be an integer, got {value!r}")
    if tp is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise MtlbenchError(f"{where}: '{key}' must be a number, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise MtlbenchError(f"{where}: '{key}' must be a string, got {value!r}")
    if tp is bool and not isinstance(value, bool):
        raise MtlbenchError(f"{where}: '{key}' must be true or false, got {value!r}")
    return value


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the config file, then the flags given on the command line."""
    settings = {k: (list(d) if isinstance(d, list) else dict(d) if isinstance(d, dict) else d)
                for k, (_, d) in RUN_SETTINGS.items()}
    if args.config:
        settings.update(_read_config(args.config))
    flags: dict[str, Any] = {}
    for name in ("dataset", "arch", "optimizer", "ablate"):
        if getattr(args, name) is not None:
            flags[name] = _csv(getattr(args, name)) or [""]
    if args.tasks is not None:
        flags["tasks"] = [_csv(t) or [] for t in args.tasks.split(";")]
    if args.seed is not None and args.seeds is not None:
        raise MtlbenchError("give either --seed or --seeds, not both")
    if args.seed is not None:
        flags["seeds"] = [args.seed]
    if args.seeds is not None:
        flags["seeds"] = sweep.parse_seeds(args.seeds)
    for name in ("epochs", "batch_size", "lr", "weight_decay", "patience", "embed_dim", "selection", "device",
                 "results_dir", "data_dir", "jobs", "threads", "executor", "ray_address", "force", "quiet", "dry_run"):
        if getattr(args, name) is not None:
            flags[name] = getattr(args, name)
    for flag, key in (("arch_option", "arch_options"), ("optimizer_option", "optimizer_options"),
                      ("dataset_option", "dataset_options")):
        given = _key_values(getattr(args, flag), "--" + flag.replace("_", "-"))
        if given:
            flags[key] = {**settings[key], **given}
    if args.plugin:
        flags["plugins"] = settings["plugins"] + args.plugin
    if args.log is not None:
        flags["log"] = _csv(args.log) or []
    settings.update(flags)
    if settings["executor"] not in ("local", "ray"):
        raise unknown("executor", settings["executor"], ("local", "ray"))
    for key in ("jobs", "threads"):
        if settings[key] is not None and settings[key] < 1:
            raise MtlbenchError(f"--{key} must be at least 1, got {settings[key]}")
    return settings


def _options_for(options: dict[str, Any], name: str, all_names: list[str]) -> dict[str, Any]:
    """Options given per name ({home: {...}, mmoe: {...}}) or for all (a flat mapping)."""
    if options and all(isinstance(v, dict) for v in options.values()) and set(options) <= set(all_names) | set(
            registry.names("arch")) | set(registry.names("optimizer")) | set(registry.names("dataset")):
        return dict(options.get(name, {}))
    return dict(options)


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
        if kind == "arch":  # an image variant of a tabular arch (same name) is listed after it
            entries = [v for e in entries for v in sorted(registry.variants(e.name).values(),
                                                          key=lambda v: v.modality != e.modality)]
        width = max((len(e.name) for e in entries), default=0)
        for e in entries:
            extra = ""
            if kind == "dataset":
                from mtlbench.data import offered_tasks

                offered = list(offered_tasks(e.obj, registry.build_options(e.options_class, e.resolve_options({}))))
                if offered:
                    shown = offered if len(offered) <= 12 else offered[:10] + [f"... ({len(offered)} in all)"]
                    extra = f"  [tasks: {', '.join(shown)}]"
            if kind == "dataset" and getattr(e.obj, "modality", "tabular") != "tabular":
                extra += f"  [{e.obj.modality}s]"
            if kind == "arch" and e.modality != "tabular":
                extra = f"  [{e.modality}s]"
            if kind == "metric":
                extra = f"  [{'higher' if e.obj.direction == 'max' else 'lower'} is better]"
            origin = "" if e.builtin else f"  (plugin: {e.module})"
            print(f"  {e.name:<{width}}  {e.description}{extra}{origin}")
            if args.verbose and kind == "dataset":
                for line in _dataset_hints(e):
                    print(f"  {'':<{width}}    {line}")
            if args.verbose and e.options_class is not None:
                for f in dataclasses.fields(e.options_class):
                    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
                    print(f"  {'':<{width}}    {f.name} = {default!r}")
        print()
    return 0


def _dataset_hints(e: registry.Entry) -> list[str]:
    """`list -v` lines of a dataset: its task sets and the training settings it suggests (embed_dim included)."""
    from mtlbench.data import offered_task_sets
    from mtlbench.spec import DEFAULT_TRAINING

    out = []
    opts = registry.build_options(e.options_class, e.resolve_options({}))
    for name, members in offered_task_sets(e.obj, opts).items():
        out.append(f"task set {name}: {', '.join(members)}")
    suggested = {**DEFAULT_TRAINING, **(getattr(e.obj, "default_training", {}) or {})}
    out.append("suggested training: " + ", ".join(f"{k} {v}" for k, v in suggested.items())
               + " (flags win; embed_dim is the input layer's width: each categorical embedding and the dense "
                 "projection)")
    return out


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
    from mtlbench.results.store import ensure_writable, finished_record
    from mtlbench.train import run

    st = _settings(args)
    _load_plugins(st["plugins"])
    if not st["dry_run"]:  # a dry run only reads the store
        ensure_writable(st["results_dir"])
    data_dir = st["data_dir"] or os.environ.get(DATA_DIR_ENV)

    switches = _check_ablation(st["ablate"], st["arch"])

    def build(dataset: str, tasks: list[str] | None, arch: str, optimizer: str, seed: int, flip: str | None):
        arch_options = _options_for(st["arch_options"], arch, st["arch"])
        if flip is not None and flip in switches[arch]:
            arch_options[flip] = not switches[arch][flip] if flip not in arch_options else not arch_options[flip]
        return build_spec(dataset=dataset, tasks=tasks, arch=arch, optimizer=optimizer, seed=seed,
                          epochs=st["epochs"], batch_size=st["batch_size"], lr=st["lr"],
                          weight_decay=st["weight_decay"], patience=st["patience"], embed_dim=st["embed_dim"],
                          device=st["device"], selection=st["selection"],
                          dataset_options=_options_for(st["dataset_options"], dataset, st["dataset"]),
                          arch_options=arch_options,
                          optimizer_options=_options_for(st["optimizer_options"], optimizer, st["optimizer"]))

    specs = sweep.expand({"dataset": st["dataset"], "tasks": st["tasks"] or [None], "arch": st["arch"],
                          "optimizer": st["optimizer"], "seed": st["seeds"], "flip": [None, *st["ablate"]]}, build)
    if st["dry_run"]:
        return _dry_run(specs, st["results_dir"], st["force"])
    quiet = st["quiet"]
    if len(specs) == 1 and st["executor"] == "local" and (st["jobs"] or 1) == 1:
        spec = specs[0]
        done = None if st["force"] else finished_record(st["results_dir"], spec.run_id)
        if done is not None:
            print(f"already done: {spec.label()}; record: {done[0]} (use --force to rerun)")
            return 0
        log = None if quiet else (lambda msg: print(msg, file=sys.stderr))
        if st["threads"]:
            import torch

            torch.set_num_threads(st["threads"])
        if not quiet:
            print(f"run {spec.run_id}: {spec.label()} on {spec.device}", file=sys.stderr)
        path, record = run(spec, st["results_dir"], data_dir=data_dir,
                           progress=not quiet and sys.stderr.isatty(), log=log, track=st["log"])
        print_summary(record, str(path))
        return 0
    jobs = st["jobs"] or min(len(specs), sweep._threads_per_job(1))
    if not quiet:
        print(f"sweep: {len(specs)} runs, executor {st['executor']}"
              + (f", {jobs} parallel" if st["executor"] == "local" else ""), file=sys.stderr)
    result = sweep.run_sweep(specs, st["results_dir"], data_dir=data_dir, jobs=jobs, executor=st["executor"],
                             ray_address=st["ray_address"], plugins=st["plugins"], force=st["force"],
                             threads=st["threads"], track=st["log"],
                             progress=not quiet and sys.stderr.isatty())
    print(result.summary())
    return 1 if result.failed else 0


def _check_ablation(names: list[str], archs: list[str]) -> dict[str, dict[str, bool]]:
    """Per arch, its on/off options and their defaults; each ablated name must be a switch of some listed arch."""
    import dataclasses

    switches: dict[str, dict[str, bool]] = {}
    for arch in archs:
        cls = registry.get("arch", arch).options_class
        fields = dataclasses.fields(cls) if cls is not None else ()
        switches[arch] = {f.name: f.default for f in fields if isinstance(f.default, bool)}
    valid = sorted({n for sw in switches.values() for n in sw})
    for name in names:
        if not any(name in sw for sw in switches.values()):
            raise unknown(f"switch to ablate for arch {', '.join(archs)}", name, valid)
    return switches


def _dry_run(specs: list, results_dir: str, force: bool) -> int:
    """One line per expanded run (done / to run, run id, label) and a count: what the sweep would do."""
    from mtlbench.results.store import finished_record

    todo = 0
    for spec in specs:
        done = not force and finished_record(results_dir, spec.run_id) is not None
        todo += not done
        entry = registry.get("arch", spec.arch)
        defaults = registry.resolve_options(entry.options_class, {}, f"arch '{spec.arch}'")
        changed = ", ".join(f"{k}={v}" for k, v in sorted(spec.arch_options.items()) if defaults.get(k) != v)
        print(f"{'done  ' if done else 'to run'}  {spec.run_id}  {spec.label()}" + (f"  [{changed}]" if changed else ""))
    print(f"dry run: {len(specs)} runs, {len(specs) - todo} already done, {todo} to run; records in {results_dir}")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from mtlbench.results.report import summary_lines, write_leaderboard

    formats = tuple(_csv(args.format) or [])
    bad = [f for f in formats if f not in ("md", "csv", "tex", "json", "html")]
    if bad or not formats:
        raise unknown("format", (bad or [""])[0], ("md", "csv", "tex", "json", "html"))
    if not Path(args.results_dir).is_dir():
        raise MtlbenchError(f"results directory '{args.results_dir}' does not exist")
    tables: list = []
    written = write_leaderboard(args.results_dir, args.out, flat_delta_m=args.flat_delta_m, formats=formats,
                                tables_out=tables, baseline=args.baseline)
    for line in summary_lines(tables):
        print(line)
    for fmt, path in written.items():
        print(f"{fmt}: {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from mtlbench.results.compare import compare

    print(compare(args.results_dir, args.a, args.b, dataset=args.dataset, tasks=_csv(args.tasks),
                  split=args.split))
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
        return {"run": cmd_run, "list": cmd_list, "leaderboard": cmd_leaderboard,
                "compare": cmd_compare}[args.command](args)
    except RunFailed as exc:
        print(f"mtlbench: run failed: {_one_line(exc)} (recorded as failed)", file=sys.stderr)
        return 1
    except MtlbenchError as exc:
        print(f"mtlbench: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mtlbench: interrupted; nothing was recorded for the unfinished run", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`mtlbench list | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
