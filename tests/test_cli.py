"""End to end through the command line: runs, records, skipping, plugins and every bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtlbench.results import store
from mtlbench.cli import main

SMALL = ["-D", "n_rows=4000", "-D", "n_users=300", "-D", "n_items=200", "--epochs", "2", "--batch-size", "256",
         "--quiet"]

NAN_ARCH = '''
import torch
from mtlbench import MultiTaskArch, register_arch

@register_arch("{name}")
class NanArch(MultiTaskArch):
    """An arch whose outputs are NaN."""
    def __init__(self, schema, tasks, embed_dim, options=None):
        super().__init__(schema, tasks, embed_dim, options)
        self.shared["input"] = self.input_layer()
        for t in self.tasks:
            self.heads[t.name]["out"] = torch.nn.Linear(self.shared["input"].output_dim, 1)
    def encode(self, batch):
        return (self.shared["input"](batch) * float("nan"),)
    def decode(self, features, batch):
        return [self.heads[t]["out"](features[0]) for t in self.task_names]
'''

MY_ARCH = '''
import torch
from dataclasses import dataclass
from mtlbench import MLP, MultiTaskArch, register_arch

@register_arch("my_arch")
class MyArch(MultiTaskArch):
    """A user's arch: a shared linear bottom and linear towers."""
    @dataclass
    class Options:
        width: int = 32
    def __init__(self, schema, tasks, embed_dim, options=None):
        super().__init__(schema, tasks, embed_dim, options)
        self.shared["input"] = self.input_layer()
        self.shared["bottom"] = MLP(self.shared["input"].output_dim, (options.width,))
        for t in self.tasks:
            self.heads[t.name]["tower"] = torch.nn.Linear(options.width, 1)
    def encode(self, batch):
        return (self.shared["bottom"](self.shared["input"](batch)),)
    def decode(self, features, batch):
        return [self.heads[t]["tower"](features[0]) for t in self.task_names]
'''


def _records(d: Path) -> list[Path]:
    return sorted(d.glob("*.json")) if d.exists() else []


def _run(tmp_path, *args, results=None):
    results = results or tmp_path / "runs"
    return main(["run", *args, *SMALL, "--results-dir", str(results)]), results


def test_end_to_end_home(tmp_path, capsys):
    code, results = _run(tmp_path, "--arch", "home", "--tasks", "ctr,cvr")
    assert code == 0
    out = capsys.readouterr().out
    assert "ctr" in out and "cvr" in out and "record:" in out
    (path,) = _records(results)
    rec = json.loads(path.read_text())
    assert rec["status"] == "ok" and rec["schema"] == store.RECORD_SCHEMA
    assert path.stem == rec["run_id"]
    assert rec["spec"]["arch"] == "home" and rec["spec"]["tasks"] == ["ctr", "cvr"]
    for split in ("train", "val", "test"):
        for task in ("ctr", "cvr"):
            m = rec["metrics"][split][task]
            assert 0.0 < m["auc"] < 1.0 and m["logloss"] > 0
    assert rec["selected_epoch"] in (1, 2) and rec["epochs_run"] == len(rec["curves"]) == 2
    best = max(rec["curves"], key=lambda c: c["selection_score"])
    assert best["epoch"] == rec["selected_epoch"]
    assert rec["metrics"]["val"] == rec["curves"][rec["selected_epoch"] - 1]["val"], "selection is on validation"
    assert rec["parameters"]["total"] > rec["parameters"]["shared"] > 0
    assert rec["arch_info"]["groups"] == [["ctr"], ["cvr"]]
    assert rec["train_samples_per_s"] > 0 and rec["wall_seconds"] > 0
    assert rec["environment"]["torch"] and rec["environment"]["device"] == "cpu"
    assert "task_weights" in rec["curves"][0]


def test_second_identical_run_is_skipped_and_force_reruns(tmp_path, capsys):
    _, results = _run(tmp_path, "--arch", "shared_bottom", "--tasks", "ctr,cvr")
    (path,) = _records(results)
    before = path.read_bytes()
    mtime = path.stat().st_mtime_ns
    capsys.readouterr()
    code, _ = _run(tmp_path, "--arch", "shared_bottom", "--tasks", "ctr,cvr")
    assert code == 0
    assert "already done" in capsys.readouterr().out
    assert path.stat().st_mtime_ns == mtime and path.read_bytes() == before
    code, _ = _run(tmp_path, "--arch", "shared_bottom", "--tasks", "ctr,cvr", "--force")
    assert code == 0 and _records(results) == [path]
    assert path.stat().st_mtime_ns != mtime


def test_same_seed_same_numbers(tmp_path):
    _run(tmp_path, "--arch", "mmoe", "--optimizer", "pcgrad", "--seed", "3", results=tmp_path / "a")
    _run(tmp_path, "--arch", "mmoe", "--optimizer", "pcgrad", "--seed", "3", results=tmp_path / "b")
    _run(tmp_path, "--arch", "mmoe", "--optimizer", "pcgrad", "--seed", "4", results=tmp_path / "c")
    a, b, c = (json.loads(_records(tmp_path / x)[0].read_text()) for x in "abc")
    assert a["metrics"] == b["metrics"] and a["curves"][0]["val"] == b["curves"][0]["val"]
    assert a["metrics"] != c["metrics"]
    assert a["spec"]["tasks"] == ["ctr", "cvr", "ctcvr"]


def test_plugin_arch_from_file(tmp_path, capsys):
    plugin = tmp_path / "my_arch.py"
    plugin.write_text(MY_ARCH)
    code, results = _run(tmp_path, "--plugin", str(plugin), "--arch", "my_arch", "--tasks", "ctr,cvr",
                         "-A", "width=16")
    assert code == 0
    rec = json.loads(_records(results)[0].read_text())
    assert rec["spec"]["arch_options"] == {"width": 16}
    assert "arch:my_arch" in rec["spec"]["plugin_sources"]
    assert main(["list", "--plugin", str(plugin)]) == 0
    assert "my_arch" in capsys.readouterr().out


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("ecommerce", "single", "shared_bottom", "mmoe", "home", "ew", "pcgrad", "auc"):
        assert name in out
    assert main(["list", "-v"]) == 0
    assert "feature_gate_rank = 16" in capsys.readouterr().out


@pytest.mark.parametrize("command", [[], ["run"], ["list"], ["leaderboard"], ["compare"]])
def test_help_of_every_command(command, capsys):
    """--help prints usage and exits 0 (a stray '%' in a help string made argparse crash here once)."""
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("args,needle", [
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--arch", "mmo"], "did you mean 'mmoe'"),
    (["--optimizer", "pcgard"], "did you mean 'pcgrad'"),
    (["--tasks", "ctr,click"], "unknown task for dataset 'ecommerce' 'click'"),
    (["--tasks", "ctr,ctr"], "listed twice"),
    (["--tasks", ","], "--tasks is empty"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--batch-size", "-5"], "--batch-size must be >= 1, got -5"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--arch", "home", "-A", "groups=ctr|cvr"], "leaves out"),
    (["--arch", "home", "--tasks", "ctr,cvr", "-A", "groups=ctr|cvr,ctcvr"], "unknown task"),
    (["--arch", "home", "-A", "bogus=1"], "unknown option for arch 'home' 'bogus'"),
    (["--arch", "mmoe", "-A", "n_experts=many"], "must be an integer"),
    (["--arch", "single", "--optimizer", "pcgrad"], "shares none"),
    (["--plugin", "does_not_exist.py"], "does not exist"),
    (["--device", "tpu"], "unknown device"),
    (["--epochs", "two"], "--epochs must be an integer, got 'two'"),
    (["--arch", "mmoe", "-A", "expert_units=-5"], "option 'expert_units' every value must be >= 1, got (-5)"),
    (["--arch", "mmoe", "-A", "dropout=1.5"], "option 'dropout' must be >= 0 and < 1, got 1.5"),
    (["--device", "cuda:x"], "unknown device 'cuda:x'"),
    (["--threads", "0"], "--threads must be auto or a positive integer, got 0"),
])
def test_bad_input_one_line_no_record(tmp_path, capsys, args, needle):
    results = tmp_path / "runs"
    with pytest.raises(SystemExit) if needle == "invalid int value" else _no_raise() as info:
        code = main(["run", *SMALL, *args, "--results-dir", str(results)])
    if info is not None and hasattr(info, "value"):
        code = info.value.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert needle in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert _records(results) == []


class _no_raise:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_plugin_that_fails_to_import(tmp_path, capsys):
    bad = tmp_path / "bad_plugin.py"
    bad.write_text("import torch\n\nx = 1 / 0\n")
    assert main(["run", "--plugin", str(bad), *SMALL, "--results-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad_plugin.py" in err and "ZeroDivisionError" in err and "line 3" in err
    assert len(err.splitlines()) == 1


def test_unwritable_results_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["run", *SMALL, "--results-dir", str(blocker / "runs")]) == 2
    err = capsys.readouterr().err
    assert "not writable" in err and str(blocker) in err


def test_nan_loss_recorded_as_failed(tmp_path, capsys):
    plugin = tmp_path / "nan_arch.py"
    plugin.write_text(NAN_ARCH.format(name="nan_arch"))
    code, results = _run(tmp_path, "--plugin", str(plugin), "--arch", "nan_arch", "--tasks", "ctr,cvr")
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert "epoch 1" in err and "ctr, cvr" in err and len(err.splitlines()) == 1
    (path,) = _records(results)
    rec = json.loads(path.read_text())
    assert rec["status"] == "failed" and "non-finite loss in epoch 1" in rec["error"]["reason"]
    assert "metrics" not in rec


def test_interrupted_write_leaves_no_record(tmp_path, monkeypatch):
    target = tmp_path / "abc.json"

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        store.write_record(target, {"schema": store.RECORD_SCHEMA, "status": "ok"})
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    store.write_record(target, {"schema": store.RECORD_SCHEMA, "status": "ok", "x": float("nan")})
    assert json.loads(target.read_text())["x"] is None
    target.write_text('{"schema": "mtlbench.run/1", "status": "o')  # truncated by some other writer
    assert store.read_record(target) is None


def test_ctrl_c_records_nothing(tmp_path):
    results = tmp_path / "runs"
    exe = Path(sys.executable).parent / "mtlbench"
    cmd = [str(exe) if exe.exists() else sys.executable, "run", "--arch", "home", "--epochs", "50",
           "-D", "n_rows=60000", "--results-dir", str(results)]
    if not exe.exists():
        cmd = [sys.executable, "-m", "mtlbench.cli", *cmd[2:]]
    # a runner started in the background (`cmd &`) hands its children SIGINT ignored, and Python then never
    # installs its Ctrl-C handler: give the child the default disposition, as a terminal would
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    line = ""
    while time.time() < deadline:
        line = proc.stderr.readline()
        if line.startswith("parameters:") or not line:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert _records(results) == []
    assert not [p for p in results.iterdir() if p.suffix == ".tmp"]


NAN_GRAD_OPT = '''
import torch
from mtlbench import MTLOptimizer, register_optimizer

@register_optimizer("nan_grad")
class NanGrad(MTLOptimizer):
    """Writes NaN gradients."""
    def step(self, ctx):
        ctx.backward()
        for p in ctx.shared_params:
            p.grad.fill_(float("nan"))
'''


def test_nan_gradient_recorded_as_failed(tmp_path, capsys):
    plugin = tmp_path / "nan_grad.py"
    plugin.write_text(NAN_GRAD_OPT)
    code, results = _run(tmp_path, "--plugin", str(plugin), "--optimizer", "nan_grad", "--tasks", "ctr,cvr")
    assert code == 1
    rec = json.loads(_records(results)[0].read_text())
    assert rec["status"] == "failed"
    assert "non-finite gradient in epoch 1, step 1 (optimizer 'nan_grad')" in rec["error"]["reason"]


def test_closed_pipe_is_quiet():
    """`mtlbench list | head -1`: the reader closes the pipe early; no traceback, the exit code a pipe gives."""
    proc = subprocess.run(f"{sys.executable} -m mtlbench.cli list -v | head -1", shell=True, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.strip() == "Datasets"
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
