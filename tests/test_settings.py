"""The one declaration of run settings (mtlbench/settings.py) and what is generated from it: flags, config-file
checks, run-spec fields, protocol keys; thread count and device in the run id; the CLI's light start-up."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import pytest

from mtlbench import settings
from mtlbench.cli import main, make_parser
from mtlbench.errors import MtlbenchError

BASE = dict(dataset="ecommerce", tasks=["ctr", "cvr"], arch="mmoe", optimizer="ew", seed=0, epochs=2,
            batch_size=512, lr=0.001, device="cpu")
GOLDEN_RUN_ID = "0eafdc3deae491138810"  # tests/test_spec.py's: a v1 spec (one thread) keeps its id


def _spec(**changes):
    from mtlbench.spec import build_spec

    return build_spec(**{**BASE, **changes})


# ------------------------------------------------------------------------------ one declaration, many uses

def test_every_setting_has_a_flag_and_a_config_key():
    run = make_parser()._subparsers._group_actions[0].choices["run"]
    flags = {o for a in run._actions for o in a.option_strings}
    for s in settings.SETTINGS:
        assert set(s.option_strings) <= flags, s.name
        assert settings.from_config({s.name: s.default if s.default is not settings.DATASET else None},
                                    "cfg") is not None


def test_spec_fields_and_protocol_keys_come_from_the_declaration():
    from mtlbench.spec import RunSpec

    fields = {f.name for f in dataclasses.fields(RunSpec)}
    identity = {"dataset", "tasks", "arch", "optimizer", "arch_options", "optimizer_options", "dataset_options"}
    for s in settings.SETTINGS:
        assert (s.name in fields) == (s.spec or s.name in identity), s.name
    assert {s.name for s in settings.SETTINGS if s.protocol} <= set(settings.protocol_keys())


def test_run_help_says_where_dataset_defaults_are(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--batch-size", "--lr", "--epochs", "--embed-dim"):
        assert flag in out
    assert out.count("default: the dataset's (`mtlbench list -v` shows them)") == 4


def test_list_verbose_shows_help_ranges_and_training_defaults(capsys):
    assert main(["list", "-v"]) == 0
    out = capsys.readouterr().out
    assert "number of experts (>= 1)" in out and "dropout rate (>= 0 and < 1)" in out
    assert "training defaults: epochs 5, batch_size 1024, lr 0.002" in out  # ecommerce's suggestion


# -------------------------------------------------------------------------------- config files are strict

@pytest.mark.parametrize("text,needle", [
    ("seeds: [0, \"x\"]\n", "'seeds': item 1 must be a non-negative integer seed, got 'x'"),
    ("seeds: [[0]]\n", "'seeds': item 0 must be a non-negative integer seed, got [0]"),
    ("tasks: [[ctr], 5]\n", "got 5 in [['ctr'], 5]"),
    ("tasks: [ctr, 5]\n", "got 5 in ['ctr', 5]"),
    ("seeds: 0-1\nseed: 3\n", "give either 'seed' or 'seeds', not both"),
    ("tasks: []\n", "'tasks' is empty"),
    ("seeds: true\n", "'seeds' must be seeds"),
    ("arch: [mmoe, 3]\n", "'arch': item 1 must be a name, got 3"),
    ("threads: -1\n", "'threads' must be auto or a positive integer, got -1"),
    ("lr: 0\n", "'lr' must be > 0, got 0"),
    ("selection: best\n", "unknown selection 'best'"),
])
def test_config_file_is_as_strict_as_flags(tmp_path, capsys, text, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    assert main(["run", "--config", str(cfg), "--dry-run", "--results-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


# ------------------------------------------------------------------------------------------------- seeds

def test_seeds_zero_is_seed_zero():
    assert settings.parse_seeds("0") == [0]
    assert settings.parse_seeds("3") == [0, 1, 2]


def test_huge_seed_counts_are_refused_at_once(tmp_path, capsys):
    t0 = time.perf_counter()
    assert main(["run", "--seeds", "100000000", "--dry-run", "--results-dir", str(tmp_path)]) == 2
    assert main(["run", "--seeds", "0-99999999", "--dry-run", "--results-dir", str(tmp_path)]) == 2
    assert time.perf_counter() - t0 < 1.0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("more than the 10,000" in line for line in err)


def test_cli_seeds_zero_runs_seed_zero(tmp_path, capsys):
    assert main(["run", "--seeds", "0", "--dry-run", "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "seed 0" in out and "1 runs" in out


# ---------------------------------------------------------------------------------- start-up and plugins

def test_cli_module_does_not_import_torch():
    code = ("import sys, mtlbench.cli; heavy = [m for m in ('torch', 'pandas', 'scipy', 'numpy') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_help_and_bad_flags_answer_without_loading_torch():
    for argv, rc in ((["--help"], 0), (["run", "--seeds", "x"], 2), (["run", "--epochs", "0"], 2)):
        code = ("import sys; from mtlbench.cli import main\ntry:\n    rc = main(%r)\nexcept SystemExit as e:\n"
                "    rc = e.code\nprint('torch' in sys.modules, rc)" % (argv,))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.stdout.split()[-2:] == ["False", str(rc)], (argv, out.stdout, out.stderr)


def test_plugin_before_the_subcommand(tmp_path, capsys):
    plugin = tmp_path / "early_plugin.py"
    plugin.write_text("from mtlbench import register_optimizer, MTLOptimizer\n\n"
                      "@register_optimizer('early_opt')\nclass Early(MTLOptimizer):\n"
                      "    '''Registered by a plugin named before the subcommand.'''\n"
                      "    def step(self, ctx):\n        ctx.backward()\n")
    assert main(["--plugin", str(plugin), "list"]) == 0
    assert "early_opt" in capsys.readouterr().out
    assert main(["--plugin", str(plugin), "run", "--optimizer", "early_opt", "--dry-run",
                 "--results-dir", str(tmp_path / "r")]) == 0
    assert "early_opt" in capsys.readouterr().out


# ------------------------------------------------------------------------------- threads and the run id

def test_threads_are_part_of_the_run_id_and_v1_ids_hold():
    from mtlbench.spec import RunSpec

    one, two = _spec(threads=1), _spec(threads=2)
    assert one.run_id == GOLDEN_RUN_ID and _spec().threads == 1  # 'auto' resolves to one thread here
    assert two.run_id != one.run_id
    assert "threads" not in json.loads(one.canonical_json()) and json.loads(two.canonical_json())["threads"] == 2
    v1 = {k: v for k, v in one.to_dict().items() if k != "threads"}  # a record written before threads existed
    assert RunSpec.from_dict(v1) == one and RunSpec.from_dict(v1).run_id == GOLDEN_RUN_ID


def test_protocol_never_mixes_thread_counts():
    one, two = _spec(threads=1).to_dict(), _spec(threads=2).to_dict()
    v1 = {k: v for k, v in one.items() if k != "threads"}
    assert settings.protocol_of(one) == settings.protocol_of(v1)
    assert "threads" not in settings.protocol_of(one)  # the published tables' protocol text is unchanged
    assert settings.protocol_of(two) != settings.protocol_of(one) and settings.protocol_of(two)["threads"] == 2


def test_auto_threads_are_bounded_by_the_cores_per_job(monkeypatch):
    from mtlbench import spec as spec_mod

    monkeypatch.setattr(spec_mod, "available_cores", lambda: 8)
    assert spec_mod.resolve_threads("auto", None, jobs=1) == 1      # small tabular models: one thread
    assert spec_mod.resolve_threads("auto", 4, jobs=1) == 4         # a dataset of big models suggests more
    assert spec_mod.resolve_threads("auto", 4, jobs=4) == 2         # ... divided among parallel runs
    assert spec_mod.resolve_threads(3, None, jobs=8) == 3           # an explicit count is kept


def test_same_id_same_metrics_and_thread_count_recorded(tmp_path):
    small = ["--arch", "mmoe", "--tasks", "ctr,cvr", "-D", "n_rows=3000", "-D", "n_users=200", "-D", "n_items=100",
             "--epochs", "1", "--batch-size", "512", "--quiet"]
    recs = {}
    for name, threads in (("a", "2"), ("b", "2"), ("c", "1")):
        assert main(["run", *small, "--threads", threads, "--results-dir", str(tmp_path / name)]) == 0
        (path,) = (tmp_path / name).glob("*.json")
        recs[name] = json.loads(path.read_text())
    a, b, c = recs["a"], recs["b"], recs["c"]
    assert a["run_id"] == b["run_id"] != c["run_id"]
    assert a["metrics"] == b["metrics"]  # one id, one result, bit for bit
    assert a["spec"]["threads"] == a["environment"]["threads"] == 2 and c["environment"]["threads"] == 1


# ---------------------------------------------------------------------------------------------- devices

def test_device_names(monkeypatch):
    import torch

    from mtlbench.spec import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == resolve_device("cuda") == "cuda"  # one device, one run id
    with pytest.raises(MtlbenchError, match=r"device 'cuda:7': this machine has 1 CUDA GPU\(s\) \(valid: cuda:0\)"):
        resolve_device("cuda:7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MtlbenchError, match="no CUDA GPU is visible"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(MtlbenchError, match="MPS backend is not available here"):
        resolve_device("mps")
    for bad in ("cuda:x", "cpu:1", "gpu"):
        with pytest.raises(MtlbenchError, match="unknown device"):
            resolve_device(bad)


# ----------------------------------------------------------------------------------- grids and warnings

def test_incompatible_grid_points_are_skipped_up_front(tmp_path, capsys):
    small = ["-D", "n_rows=3000", "-D", "n_users=200", "-D", "n_items=100", "--epochs", "1", "--batch-size", "512",
             "--tasks", "ctr,cvr", "--quiet", "--jobs", "1"]
    args = ["run", "--arch", "single,shared_bottom", "--optimizer", "ew,pcgrad", *small,
            "--results-dir", str(tmp_path)]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    skip = [line for line in out.splitlines() if line.startswith("skip")]
    assert len(skip) == 1 and "single x pcgrad" in skip[0] and "shares none" in skip[0]
    assert "3 runs, 0 already done, 3 to run, 1 incompatible combination(s) skipped" in out
    assert main(args) == 0  # a grid of compatible runs exits 0
    captured = capsys.readouterr()
    assert "skipped (incompatible): single x pcgrad" in captured.err
    assert "3 done" in captured.out and "1 incompatible" in captured.out
    assert len(list(tmp_path.glob("*.json"))) == 3


def test_diverging_run_is_warned_in_the_record(tmp_path, capsys):
    args = ["run", "--arch", "shared_bottom", "--tasks", "ctr", "-D", "n_rows=3000", "-D", "n_users=200",
            "-D", "n_items=100", "--epochs", "2", "--batch-size", "256", "--lr", "1e6",
            "--results-dir", str(tmp_path), "--quiet"]
    code = main(args)
    (path,) = tmp_path.glob("*.json")
    rec = json.loads(path.read_text())
    if rec["status"] != "ok":
        pytest.skip(f"this machine's arithmetic ended the run as {rec['error']['reason']}")
    assert code == 0
    assert rec["warnings"] and "diverged" in rec["warnings"][0]
    assert "warning: training loss grew" in capsys.readouterr().out


def test_short_labels_with_many_tasks():
    from mtlbench.spec import RunSpec

    spec = RunSpec.from_dict({**_spec().to_dict(), "tasks": [f"t{i}" for i in range(139)]})
    short = spec.label(max_tasks=4)
    assert "t0, t1, t2, t3, ... 139 tasks" in short and len(short) < 100


def test_divergence_warning_rule():
    from mtlbench.train import divergence_warnings

    curve = lambda *losses: [{"epoch": i + 1, "train_loss": {"a": v}} for i, v in enumerate(losses)]  # noqa: E731
    assert divergence_warnings(0.7, curve(0.6, 0.5, 0.55)) == []          # ordinary training
    assert divergence_warnings(0.7, curve(0.6, 69.0)) == []               # under the factor of 100
    (w,) = divergence_warnings(0.7, curve(0.6, 4e12))
    assert "epoch 2" in w and "diverged" in w
    assert divergence_warnings(None, curve(4e12)) == []                   # nothing to compare against


def test_list_is_cached_by_source_and_answers_without_torch(tmp_path):
    """`mtlbench list` is a pure function of the source files: the second call reads its cached text (no torch
    import, well under a second on an idle machine); editing a plugin file makes it list afresh."""
    import os

    plugin = tmp_path / "listed_plugin.py"
    plugin.write_text("from mtlbench import register_optimizer, MTLOptimizer\n\n@register_optimizer('listed_a')\n"
                      "class A(MTLOptimizer):\n    '''First.'''\n    def step(self, ctx):\n        ctx.backward()\n")
    code = ("import sys; from mtlbench.cli import main; rc = main(['list', '-v', '--plugin', %r]); "
            "print('TORCH', 'torch' in sys.modules)" % str(plugin))
    env = {**os.environ, "MTLBENCH_CACHE_DIR": str(tmp_path / "cache")}

    def listing():
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr
        text, _, torch_line = out.stdout.rpartition("TORCH")
        return text, torch_line.strip()

    first, imported = listing()
    assert imported == "True" and "listed_a" in first and "number of experts (>= 1)" in first
    second, imported = listing()
    assert second == first and imported == "False"
    plugin.write_text(plugin.read_text().replace("listed_a", "listed_b"))
    third, imported = listing()
    assert imported == "True" and "listed_b" in third and "listed_a" not in third


def test_a_redirected_run_logs_progress_within_epochs(tmp_path, monkeypatch, capsys):
    """Issue 15: a run whose output goes to a file is not silent through a long epoch."""
    from mtlbench import train

    monkeypatch.setattr(train, "PROGRESS_EVERY_S", 0.0)  # every 16 steps, instead of at most every 30 s
    assert main(["run", "--arch", "shared_bottom", "--tasks", "ctr", "-D", "n_rows=3000", "-D", "n_users=200",
                 "-D", "n_items=100", "--epochs", "1", "--batch-size", "64",
                 "--results-dir", str(tmp_path)]) == 0  # capsys: stderr is not a terminal
    err = capsys.readouterr().err
    assert "epoch 1/1: 16/" in err and "batches" in err
    assert "epoch 1/1  train loss" in err  # and the per-epoch line
