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
from pathlib import Path
from typing import Any, NoReturn, Sequence

from mtlbench import settings
from mtlbench.results import options as stat_options
from mtlbench.errors import MtlbenchError, RunFailed, unknown

# This module imports nothing heavy at start-up (torch, pandas and scipy are imported by the commands that need
# them), so `mtlbench --help` and bad flags answer at once; tests/test_cli.py checks that.
DEFAULT_RESULTS_DIR = settings.BY_NAME["results_dir"].default
DATA_DIR_ENV = "MTLBENCH_DATA_DIR"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        self.exit(2, f"mtlbench: error: {message} (see 'mtlbench {self.prog.split()[-1]} --help')\n"
                  if " " in self.prog else f"mtlbench: error: {message} (see 'mtlbench --help')\n")


def _csv(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mtlbench", description="Multi-task learning benchmarks: runs, methods, datasets.")
    p.add_argument("--plugin", action="append", dest="global_plugins", metavar="FILE_OR_MODULE",
                   help="load a plugin first (also accepted after the subcommand)")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    r = sub.add_parser("run", help="train and evaluate one run or a sweep, store the records",
                       description="Train and evaluate one run or a sweep (every list, seed range and task set "
                       "is a grid axis). Flags override the --config file, which overrides the defaults. "
                       "--epochs, --batch-size and --lr default to the dataset's suggestion: `mtlbench list -v` "
                       "shows each dataset's.")
    r.add_argument("--config", help="a YAML or JSON file of run settings (the same names as the flags, with _)")
    r.add_argument("--seed", help="one seed (default 0)")
    settings.add_flags(r)
    lb = sub.add_parser("leaderboard", help="regenerate tables, statistics and plots from stored records")
    lb.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR, help="where the run records are")
    lb.add_argument("--out", default=os.path.join("results", "leaderboard"), help="output directory")
    lb.add_argument("--flat-delta-m", action="store_true", help="Δm%% over every task metric, not just primary")
    lb.add_argument("--baseline", help="ARCH or ARCH:OPTIMIZER (options as ARCH(k=v)) every method is also tested "
                    "against (default: the single-task baseline of the Δm%% column)")
    lb.add_argument("--format", default="md,csv,tex,json,html", help="comma-separated: md, csv, tex, json, html "
                    "(figures are drawn only for md and html)")
    lb.add_argument("--no-plots", action="store_true", help="draw no figures (tables only)")
    stat_options.add_flags(lb)
    cmp_ = sub.add_parser("compare", help="two methods on one dataset: per-task differences, CIs, p-values")
    cmp_.add_argument("a", help="ARCH or ARCH:OPTIMIZER (e.g. home:ew; options as home(expert_norm=false):ew)")
    cmp_.add_argument("b", help="ARCH or ARCH:OPTIMIZER, named the same way")
    cmp_.add_argument("--dataset", help="dataset name (needed when the methods share several)")
    cmp_.add_argument("--tasks", help="task set, comma-separated (needed when there are several)")
    cmp_.add_argument("--split", default="test", help="split to compare on (default test)")
    cmp_.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR)
    stat_options.add_flags(cmp_, stat_options.COMPARE_FLAGS)
    se = sub.add_parser("search", help="a controllable arch's widths for a compute budget and a task preference",
                        description="The width configuration a controllable (slimmable) arch runs at for a FLOPs "
                        "budget and a task preference, with its exact analytical FLOPs; builds the untrained model "
                        "for the dataset's image size (the search needs FLOPs only).")
    se.add_argument("--dataset", default="scenes", help="an image dataset (default scenes)")
    se.add_argument("--tasks", help="comma-separated tasks (default: the dataset's)")
    se.add_argument("--arch", default="slimmable", help="a controllable arch (default slimmable)")
    se.add_argument("--budget", required=True, help="a fraction of the full model's FLOPs in (0, 1], or N%%")
    se.add_argument("--preference", required=True, help="one weight per task, comma-separated, summing to 1")
    se.add_argument("-A", "--arch-option", action="append", default=[], metavar="KEY=VALUE")
    se.add_argument("-D", "--dataset-option", action="append", default=[], metavar="KEY=VALUE")
    ls = sub.add_parser("list", help="list datasets, archs, optimizers and metrics")
    ls.add_argument("--verbose", "-v", action="store_true",
                    help="also show every option with its default, range and help text, and each dataset's "
                    "training defaults")
    ls.add_argument("--plugin", action="append", dest="plugins", metavar="FILE_OR_MODULE")
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
    return settings.from_config(data, f"config file '{path}'")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the config file, then the flags given on the command line (all checked the same way)."""
    st = settings.defaults()
    if args.config:
        st.update(_read_config(args.config))
    if args.seed is not None and args.seeds is not None:
        raise MtlbenchError("give either --seed or --seeds, not both")
    flags = settings.from_flags(args, st)
    if args.seed is not None:
        text = str(args.seed).strip()
        if not text.isdigit():
            raise MtlbenchError(f"--seed must be a non-negative integer, got {args.seed!r}")
        flags["seeds"] = [int(text)]
    st.update(flags)
    bad_log = [k for k in st["log"] if k not in settings.TRACKERS]
    if bad_log:
        raise unknown("tracker", bad_log[0], settings.TRACKERS)
    return st


def _options_for(options: dict[str, Any], name: str, all_names: list[str]) -> dict[str, Any]:
    """Options given per name ({home: {...}, mmoe: {...}}) or for all (a flat mapping)."""
    from mtlbench import registry

    if options and all(isinstance(v, dict) for v in options.values()) and set(options) <= set(all_names) | set(
            registry.names("arch")) | set(registry.names("optimizer")) | set(registry.names("dataset")) | set(
            registry.names("merger")):
        return dict(options.get(name, {}))
    return dict(options)


def _load_plugins(targets: list[str] | None) -> None:
    from mtlbench import registry

    registry.load_builtins()
    for t in targets or []:
        registry.load_plugin(t)


def _list_cache_key(plugins: list[str], verbose: bool) -> str | None:
    """A key for `mtlbench list`'s output: the content of every source file of mtlbench (engine, tasks,
    baselines; about 2 MB, hashed in milliseconds) and of each plugin file, the advertised entry-point plugins and their versions, the flags. None
    (do not cache) when a plugin is a module name, whose files are not known without importing it."""
    import hashlib
    import importlib.metadata
    import importlib.util

    parts: list[str] = [sys.version, str(verbose)]
    roots = []
    for pkg in ("mtlbench", "mtlbench.tasks", "mtlbench.baselines"):
        found = importlib.util.find_spec(pkg)
        if found is None or not found.submodule_search_locations:
            return None
        roots.extend(found.submodule_search_locations)
    for root in sorted(set(roots)):
        for path in sorted(Path(root).rglob("*.py")):
            parts.append(f"{path}:{hashlib.sha256(path.read_bytes()).hexdigest()}")
    for target in plugins:
        path = Path(target)
        if not path.is_file():
            return None
        parts.append(f"plugin {path.resolve()}:{hashlib.sha256(path.read_bytes()).hexdigest()}")
    for ep in importlib.metadata.entry_points(group="mtlbench.plugins"):
        dist = getattr(ep, "dist", None)
        parts.append(f"ep {ep.name}={ep.value} {getattr(dist, 'version', '')}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _list_cache_dir() -> Path:
    return Path(os.environ.get("MTLBENCH_CACHE_DIR") or Path.home() / ".cache" / "mtlbench") / "list"


def cmd_list(args: argparse.Namespace) -> int:
    """The registry's contents. The text is a pure function of the source files, so it is cached by their
    content: a repeated `mtlbench list` answers without importing torch or any method."""
    import io
    from contextlib import redirect_stdout

    plugins = (getattr(args, "global_plugins", None) or []) + (args.plugins or [])
    key = _list_cache_key(plugins, args.verbose)
    cached = _list_cache_dir() / f"{key}.txt" if key else None
    if cached is not None and cached.is_file():
        sys.stdout.write(cached.read_text())
        return 0
    buf = io.StringIO()
    with redirect_stdout(buf):
        _print_list(args.verbose, plugins)
    text = buf.getvalue()
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, cached)
        except OSError:
            pass  # a read-only home: list still works, just without the cache
    sys.stdout.write(text)
    return 0


def _print_list(verbose: bool, plugins: list[str]) -> None:
    from mtlbench import registry

    _load_plugins(plugins)
    titles = {"dataset": "Datasets", "arch": "Architectures", "optimizer": "Optimizers", "metric": "Metrics",
              "merger": "Mergers"}
    for kind in ("dataset", "arch", "optimizer", "merger", "metric"):
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
            if not verbose:
                continue
            pad = f"  {'':<{width}}    "
            if kind == "dataset":
                suggested = getattr(e.obj, "default_training", {}) or {}
                shown = ", ".join(f"{s.name} {settings.dataset_default(s.name, suggested)}"
                                  for s in settings.SETTINGS if s.default is settings.DATASET)
                print(f"{pad}training defaults: {shown}")
                from mtlbench.data import offered_task_sets

                aliases = offered_task_sets(e.obj, registry.build_options(e.options_class, e.resolve_options({})))
                for alias, tasks in sorted(aliases.items()):
                    print(f"{pad}task set {alias} = {','.join(tasks)}")
            if e.options_class is not None:
                fields = dataclasses.fields(e.options_class)
                rows = []
                for f in fields:
                    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
                    rows.append((f"{f.name} = {default!r}", registry.describe_option(f)))
                w = max(len(r[0]) for r in rows) if rows else 0
                for left, help_text in rows:
                    print(f"{pad}{left:<{w}}  {help_text}".rstrip())
        print()


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
    for w in record.get("warnings") or []:
        print(f"warning: {w}")
    print(f"record: {path}")


def cmd_run(args: argparse.Namespace) -> int:
    st = _settings(args)
    if st["vectorize_seeds"] and st["merger"]:  # settings alone: answered before torch is imported
        raise MtlbenchError("--vectorize-seeds trains seeds together; merges (--merger) are not training runs: "
                            "drop one of the two")
    if st["precision"] != "fp32" and st["merger"]:
        raise MtlbenchError(f"--precision {st['precision']} applies to training runs; a merge (--merger) fine-tunes "
                            "and evaluates its zoo in fp32: drop one of the two")
    if st["vectorize_seeds"] and st["executor"] != "local":
        raise MtlbenchError(f"--vectorize-seeds trains a spec's seeds together in one process, on the local "
                            f"executor; executor '{st['executor']}' places each run on its own worker: drop one of "
                            "the two")
    axes = {"dataset": st["dataset"], "tasks": st["tasks"] or [None], "arch": st["arch"],
            "optimizer": st["optimizer"], "seed": st["seeds"], "flip": [None, *st["ablate"]]}
    total = math.prod(len(v) for v in axes.values())
    if total > settings.MAX_RUNS:
        raise MtlbenchError(f"the grid has {total:,} runs ({' x '.join(str(len(v)) for v in axes.values())}), more "
                            f"than the {settings.MAX_RUNS:,} a sweep takes")
    from mtlbench import sweep
    from mtlbench.spec import available_cores, build_spec, incompatibility
    from mtlbench.results.store import ensure_writable

    _load_plugins(st["plugins"])
    if not st["dry_run"]:  # a dry run only reads the store
        ensure_writable(st["results_dir"])
    data_dir = st["data_dir"] or os.environ.get(DATA_DIR_ENV)
    training = {s.name: st[s.name] for s in settings.spec_settings()}
    if st["merger"]:
        return _run_merges(st, data_dir, training)
    switches = _check_ablation(st["ablate"], st["arch"], st["dataset"])
    jobs = st["jobs"] or max(1, min(total, available_cores()))

    def build(dataset: str, tasks: list[str] | None, arch: str, optimizer: str, seed: int, flip: str | None):
        arch_options = _options_for(st["arch_options"], arch, st["arch"])
        sw = switches[arch, dataset]
        if flip is not None and flip in sw:
            arch_options[flip] = not sw[flip] if flip not in arch_options else not arch_options[flip]
        spec = build_spec(dataset=dataset, tasks=tasks, arch=arch, optimizer=optimizer, seed=seed,
                          dataset_options=_options_for(st["dataset_options"], dataset, st["dataset"]),
                          arch_options=arch_options,
                          optimizer_options=_options_for(st["optimizer_options"], optimizer, st["optimizer"]),
                          jobs=jobs if total > 1 else 1, **training)
        return spec, incompatibility(spec)

    plan = sweep.expand(axes, build)
    if st["dry_run"]:
        return _dry_run(plan, st["results_dir"], st["force"], total)
    specs, skipped = [], []
    for spec, reason in plan:
        (skipped.append((spec, reason)) if reason else specs.append(spec))
    if not specs:
        reasons = sorted({r for _, r in skipped})
        raise MtlbenchError(reasons[0] if len(reasons) == 1 else "every combination of the grid is incompatible: "
                            + "; ".join(reasons))
    quiet = st["quiet"]
    pairs: dict[tuple[str, str, str], int] = {}
    for spec, reason in skipped:  # one line per incompatible arch x optimizer, however many seeds and task sets
        key = (spec.arch, spec.optimizer, reason)
        pairs[key] = pairs.get(key, 0) + 1
    for (arch, optimizer, reason), n in pairs.items():
        print(f"skipped (incompatible): {arch} x {optimizer} ({n} run{'s' if n > 1 else ''}): {reason}",
              file=sys.stderr)
    if st["vectorize_seeds"]:
        from mtlbench.seedgroup import ungroupable

        alone: dict[str, int] = {}  # one line per arch x optimizer whose seeds cannot train together
        for spec in specs:
            if (reason := ungroupable(spec)) is not None:
                what = f"{spec.arch} x {spec.optimizer}: {reason}"
                alone[what] = alone.get(what, 0) + 1
        for what, n in alone.items():
            print(f"--vectorize-seeds: {what}; its {n} seed(s) run one by one, as separate runs", file=sys.stderr)
    if len(specs) == 1 and st["executor"] == "local" and (st["jobs"] or 1) == 1 and not skipped:
        return _single_run(specs[0], st, data_dir)
    if not quiet:
        print(f"sweep: {len(specs)} runs, executor {st['executor']}"
              + (f", {min(jobs, len(specs))} parallel" if st["executor"] == "local" else "")
              + (f", {len(skipped)} incompatible combination(s) skipped" if skipped else ""), file=sys.stderr)
    result = sweep.run_sweep(specs, st["results_dir"], data_dir=data_dir, jobs=min(jobs, len(specs)),
                             executor=st["executor"], ray_address=st["ray_address"], plugins=st["plugins"],
                             force=st["force"], track=st["log"], progress=not quiet,
                             vectorize_seeds=st["vectorize_seeds"])
    result.incompatible = len(skipped)
    print(result.summary())
    if result.interrupted:
        return 130
    return 1 if result.failed else 0


def merge_plan(st: dict[str, Any], training: dict[str, Any]) -> tuple[list, list[tuple[str, dict[str, Any]]]]:
    """The recipes (one per dataset x task set x arch x seed) and the resolved (merger, options) of a merge run's
    settings; every bad input is refused here, before anything loads (``benchmarks/merging_times.py`` plans the
    whole published table with it)."""
    from mtlbench import registry
    from mtlbench.merging import merger_declaration
    from mtlbench.spec import build_spec

    archs = ["minilm"] if st["arch"] == settings.BY_NAME["arch"].default else st["arch"]
    mergers = [(m, registry.get("merger", m).resolve_options(_options_for(st["merger_options"], m, st["merger"])))
               for m in st["merger"]]
    if st["no_task_id"]:
        need = [m for m, o in mergers if merger_declaration(m, o)["needs_task_id"]]
        if need:
            ok = [m for m, _ in mergers if m not in need]
            raise MtlbenchError(f"merger(s) {', '.join(need)} need the task id at inference (one set of weights per "
                                f"task), which --no-task-id rules out (of those given, usable: {', '.join(ok) or 'none'})")
    recipes = [build_spec(dataset=d, tasks=t, arch=a, optimizer="ew", seed=seed,
                          dataset_options=_options_for(st["dataset_options"], d, st["dataset"]),
                          arch_options=_options_for(st["arch_options"], a, archs), jobs=1, **training)
               for d in st["dataset"] for t in (st["tasks"] or [None]) for a in archs for seed in st["seeds"]]
    return recipes, mergers


def settings_of(argv: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checked settings of ``mtlbench run ARGV`` and the training settings (the recipe's fields) among them."""
    st = _settings(make_parser().parse_args(["run", *argv]))
    return st, {s.name: st[s.name] for s in settings.spec_settings()}


def _run_merges(st: dict[str, Any], data_dir: str | None, training: dict[str, Any]) -> int:
    """`run --merger ...`: each merger on each dataset x task set x seed, over one cached expert zoo per seed;
    the zoo's recipe (arch, epochs, batch size, lr, ...) is this command's training settings, so joint training
    with the same settings is the same protocol at the same total fine-tuning budget."""
    from mtlbench.merge_run import build_merge_spec, label, merge_run_id, run_merges

    recipes, mergers = merge_plan(st, training)
    if st["dry_run"]:
        from mtlbench.results.store import finished_record

        specs = [build_merge_spec(r, m, o) for r in recipes for m, o in mergers]
        todo = 0
        for spec in specs:
            done = not st["force"] and finished_record(st["results_dir"], merge_run_id(spec)) is not None
            todo += not done
            print(f"{'done  ' if done else 'to run'}  {merge_run_id(spec)}  {label(spec)}")
        print(f"dry run: {len(specs)} merges, {len(specs) - todo} already done, {todo} to run; records in "
              f"{st['results_dir']}")
        return 0
    if recipes:
        import torch

        torch.set_num_threads(int(recipes[0].threads))  # part of the recipe: results differ between thread counts
    log = None if st["quiet"] else (lambda msg: print(msg, file=sys.stderr))
    done, skipped, failed = run_merges(recipes, mergers, st["results_dir"], data_dir=data_dir, force=st["force"],
                                       zoo=st["zoo_dir"], log=log)
    print(f"merges: {done} done, {skipped} already done, {failed} failed; records in {st['results_dir']}")
    return 1 if failed else 0


def _single_run(spec, st: dict[str, Any], data_dir: str | None) -> int:
    from mtlbench import sweep
    from mtlbench.results.store import finished_record
    from mtlbench.train import run

    quiet = st["quiet"]
    done = None if st["force"] else finished_record(st["results_dir"], spec.run_id)
    if done is not None:
        print(f"already done: {spec.label()}; record: {done[0]} (use --force to rerun)")
        return 0
    holder = sweep.claim(st["results_dir"], spec.run_id)
    if holder is not None:
        print(f"being trained by another process ({holder}): {spec.label()}; not started twice")
        return 0
    try:
        log = None if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
        if not quiet:
            print(f"run {spec.run_id}: {spec.label(max_tasks=8)} on {spec.device}, {spec.threads} thread(s)",
                  file=sys.stderr)
        path, record = run(spec, st["results_dir"], data_dir=data_dir, progress=not quiet and sys.stderr.isatty(),
                           log=log, track=st["log"])
    finally:
        sweep.release(st["results_dir"], spec.run_id)
    print_summary(record, str(path))
    return 0


def _arch_variant(arch: str, dataset: str):
    """The registry entry of ``arch`` for ``dataset``'s kind of data (its image variant on an image dataset)."""
    from mtlbench import registry

    modality = getattr(registry.get("dataset", dataset).obj, "modality", "tabular")
    return registry.variants(arch).get(modality) or registry.get("arch", arch)


def _check_ablation(names: list[str], archs: list[str], datasets: list[str]) -> dict[tuple[str, str], dict[str, bool]]:
    """Per arch and dataset, the on/off options (and defaults) of the arch's variant for that dataset's data (an
    image dataset reads the image arch's switches); each ablated name must be a switch of some listed arch."""
    switches: dict[tuple[str, str], dict[str, bool]] = {}
    for arch in archs:
        for dataset in datasets:
            cls = _arch_variant(arch, dataset).options_class
            fields = dataclasses.fields(cls) if cls is not None else ()
            switches[arch, dataset] = {f.name: f.default for f in fields if isinstance(f.default, bool)}
    valid = sorted({n for sw in switches.values() for n in sw})
    for name in names:
        if not any(name in sw for sw in switches.values()):
            raise unknown(f"switch to ablate for arch {', '.join(archs)}", name, valid)
    return switches


def _dry_run(plan, results_dir: str, force: bool, total: int) -> int:
    """One line per expanded run (done / to run / skipped as incompatible, run id, label) and a count: what the
    sweep would do. Lines are printed as the grid expands, so a large grid shows its first runs at once."""
    from mtlbench import registry
    from mtlbench.results.store import finished_record

    todo = n = incompatible = 0
    for spec, reason in plan:
        if reason:
            incompatible += 1
            print(f"skip    {spec.run_id}  {spec.label(max_tasks=6)}  (incompatible: {reason})")
            continue
        n += 1
        done = not force and finished_record(results_dir, spec.run_id) is not None
        todo += not done
        entry = _arch_variant(spec.arch, spec.dataset)
        defaults = registry.resolve_options(entry.options_class, {}, f"arch '{spec.arch}'")
        changed = ", ".join(f"{k}={v}" for k, v in sorted(spec.arch_options.items()) if defaults.get(k) != v)
        print(f"{'done  ' if done else 'to run'}  {spec.run_id}  {spec.label(max_tasks=6)}"
              + (f"  [{changed}]" if changed else ""))
    print(f"dry run: {n} runs, {n - todo} already done, {todo} to run"
          + (f", {incompatible} incompatible combination(s) skipped" if incompatible else "")
          + f"; records in {results_dir}")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from mtlbench.results.report import summary_lines, write_leaderboard

    formats = tuple(_csv(args.format) or [])
    bad = [f for f in formats if f not in ("md", "csv", "tex", "json", "html")]
    if bad or not formats:
        raise unknown("format", (bad or [""])[0], ("md", "csv", "tex", "json", "html"))
    options = stat_options.from_args(args)
    if not Path(args.results_dir).is_dir():
        raise MtlbenchError(f"results directory '{args.results_dir}' does not exist")
    tables: list = []
    stores: list = []
    written = write_leaderboard(args.results_dir, args.out, flat_delta_m=args.flat_delta_m, formats=formats,
                                tables_out=tables, baseline=args.baseline, store_out=stores,
                                plots=False if args.no_plots else None, options=options)
    _say_skipped(stores)
    for line in summary_lines(tables):
        print(line)
    for fmt, path in written.items():
        print(f"{fmt}: {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from mtlbench.results.compare import compare

    options = stat_options.from_args(args)  # a bad value: one line, before any record is read
    if not Path(args.results_dir).is_dir():
        raise MtlbenchError(f"results directory '{args.results_dir}' does not exist")
    stores: list = []
    try:
        text = compare(args.results_dir, args.a, args.b, dataset=args.dataset, tasks=_csv(args.tasks),
                       split=args.split, store_out=stores, options=options)
    finally:
        _say_skipped(stores)
    print(text)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """`mtlbench search`: every input checked (one line each) before the model is built."""
    import time

    from mtlbench import registry
    from mtlbench.spec import build_spec
    from mtlbench.train import build

    registry.load_builtins()
    controllable = sorted(n for n in registry.names("arch") if "image" in registry.variants(n)
                          and hasattr(registry.get("arch", n, modality="image").obj, "flops_table"))
    registry.get("arch", args.arch)  # an unknown name: one line with the valid ones
    if args.arch not in controllable:
        raise MtlbenchError(f"arch '{args.arch}' is not controllable: only a slimmable arch takes a budget and a "
                            f"preference (controllable archs: {', '.join(controllable)})")
    text = args.budget.strip()
    try:
        budget = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise MtlbenchError(f"budget must be a fraction of the full model's FLOPs in (0, 1] or N%, got "
                            f"{args.budget!r}") from None
    if not 0 < budget <= 1:
        raise MtlbenchError(f"budget must be a fraction of the full model's FLOPs in (0, 1] or N%, got "
                            f"{args.budget!r}")
    try:
        pref = [float(x) for x in args.preference.split(",")]
    except ValueError:
        raise MtlbenchError(f"preference must be comma-separated numbers (one weight per task), got "
                            f"{args.preference!r}") from None

    def kv(items: list[str], what: str) -> dict[str, Any]:
        out = {}
        for it in items:
            if "=" not in it:
                raise MtlbenchError(f"{what} must be KEY=VALUE, got {it!r}")
            k, v = it.split("=", 1)
            out[k.strip()] = registry.parse_value(v.strip())
        return out

    spec = build_spec(dataset=args.dataset, tasks=_csv(args.tasks), arch=args.arch, optimizer="ew",
                      arch_options=kv(args.arch_option, "-A"), dataset_options=kv(args.dataset_option, "-D"),
                      device="cpu")
    model = build(spec).model
    from mtlbench.vision.slim_search import check_preference

    check_preference(pref, model.task_names)
    table = model.flops_table()
    t0 = time.perf_counter()
    cfg = model.configure(budget, pref)
    ms = 1000 * (time.perf_counter() - t0)
    f = table.flops(cfg)
    print(f"encoder width {cfg.encoder:g}; decoder widths " + ", ".join(
        f"{t} {w:g}" for t, w in zip(model.task_names, cfg.decoders)))
    print(f"FLOPs per sample {f:,} = {100 * f / table.full:.1f}% of the full model ({table.full:,}); budget "
          f"{budget * table.full:,.0f}; search {ms:.2f} ms")
    return 0


def _say_skipped(stores: list) -> None:
    """One line on stderr per record file left out (invalid, newer schema, duplicate)."""
    for store in stores:
        for line in store.skipped:
            print(f"mtlbench: skipped {line}", file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command == "run" and args.global_plugins:
        args.plugins = list(args.global_plugins) + (args.plugins or [])
        args.global_plugins = None
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return {"run": cmd_run, "list": cmd_list, "leaderboard": cmd_leaderboard,
                "compare": cmd_compare, "search": cmd_search}[args.command](args)
    except RunFailed as exc:
        print(f"mtlbench: run failed: {_one_line(exc)} (recorded as failed)", file=sys.stderr)
        return 1
    except MtlbenchError as exc:
        print(f"mtlbench: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mtlbench: interrupted; nothing was recorded for the unfinished run(s)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`mtlbench list | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
