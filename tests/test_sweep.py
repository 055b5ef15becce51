"""Sweeps: grid expansion, resume, failures that do not stop the sweep, config files, local processes, Ray."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtlbench.cli import main
from mtlbench.errors import MtlbenchError
from mtlbench.sweep import parse_seeds

SMALL = ["-D", "n_rows=3000", "-D", "n_users=200", "-D", "n_items=100", "--epochs", "1", "--batch-size", "512",
         "--quiet"]

BROKEN_ARCH = '''
import torch
from mtlbench import MultiTaskArch, register_arch

@register_arch("broken")
class Broken(MultiTaskArch):
    """Raises in forward."""
    def __init__(self, schema, tasks, embed_dim, options=None):
        super().__init__(schema, tasks, embed_dim, options)
        self.shared["x"] = torch.nn.Linear(1, 1)
    def encode(self, batch):
        raise RuntimeError("boom in encode")
'''


def _records(d: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))}


@pytest.mark.parametrize("text,expected", [("3", [0, 1, 2]), ("0-4", [0, 1, 2, 3, 4]), ("1,3,7", [1, 3, 7]),
                                           ("0-2,9", [0, 1, 2, 9]), ("2,2,1", [2, 1]), (" 4 - 5 ", [4, 5]),
                                           ("0", [0])])
def test_parse_seeds(text, expected):
    assert parse_seeds(text) == expected


@pytest.mark.parametrize("text", ["", "a", "1-", "5-2", "1,,x", "1.5", "10001", "0-10000"])
def test_parse_seeds_rejects(text):
    with pytest.raises(MtlbenchError) as info:
        parse_seeds(text)
    assert "seeds" in str(info.value) and "\n" not in str(info.value)


def test_grid_resume_and_failures(tmp_path, capsys):
    plugin = tmp_path / "broken.py"
    plugin.write_text(BROKEN_ARCH)
    results = tmp_path / "runs"
    args = ["run", "--plugin", str(plugin), "--arch", "shared_bottom,broken", "--optimizer", "ew,pcgrad",
            "--seeds", "0-1", "--tasks", "ctr,cvr", "--jobs", "2", *SMALL, "--results-dir", str(results)]
    assert main(args) == 1  # some runs failed; the sweep went on
    out = capsys.readouterr().out
    assert "4 done, 0 skipped" in out and "4 failed" in out
    recs = _records(results)
    assert len(recs) == 8
    ok = [r for r in recs.values() if r["status"] == "ok"]
    failed = [r for r in recs.values() if r["status"] == "failed"]
    assert {r["spec"]["arch"] for r in ok} == {"shared_bottom"} and len(ok) == 4
    assert all("boom in encode" in r["error"]["reason"] for r in failed)
    assert {(r["spec"]["optimizer"], r["spec"]["seed"]) for r in ok} == {(o, s) for o in ("ew", "pcgrad")
                                                                        for s in (0, 1)}
    assert len(list((results / "logs").glob("*.log"))) == 8
    # resume: finished runs are skipped, failed ones retried; delete one finished record to see it rerun
    victim = ok[0]["run_id"]
    (results / f"{victim}.json").unlink()
    before = {k: v for k, v in recs.items() if k != victim}
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "1 done, 3 skipped" in out and "4 failed" in out
    after = _records(results)
    assert set(after) == set(recs)
    for k, v in before.items():
        if v["status"] == "ok":
            assert after[k] == v, "a finished record was rewritten"


def test_config_file_and_flag_override(tmp_path, capsys):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text("arch: [shared_bottom, mmoe]\noptimizer: ew\nseeds: 0-1\ntasks: [ctr, cvr]\nepochs: 1\n"
                   "batch_size: 512\ndataset_options: {n_rows: 3000, n_users: 200, n_items: 100}\n"
                   "arch_options: {mmoe: {n_experts: 2}}\nquiet: true\n")
    results = tmp_path / "runs"
    assert main(["run", "--config", str(cfg), "--arch", "mmoe", "--results-dir", str(results)]) == 0
    recs = list(_records(results).values())
    assert len(recs) == 2 and {r["spec"]["arch"] for r in recs} == {"mmoe"}
    assert all(r["spec"]["arch_options"]["n_experts"] == 2 for r in recs)
    assert {r["spec"]["seed"] for r in recs} == {0, 1}


def test_dry_run_lists_runs_and_trains_nothing(tmp_path, capsys):
    results = tmp_path / "runs"
    args = ["run", "--arch", "shared_bottom", "--seeds", "0-2", "--tasks", "ctr,cvr", *SMALL,
            "--results-dir", str(results)]
    assert main(["run", "--arch", "shared_bottom", "--seed", "1", "--tasks", "ctr,cvr", *SMALL,
                 "--results-dir", str(results)]) == 0
    capsys.readouterr()
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[:3]] == ["to", "done", "to"]
    assert "3 runs, 1 already done, 2 to run" in out[-1]
    assert len(_records(results)) == 1  # nothing trained


def test_ablation_is_a_sweep(tmp_path, capsys):
    """--ablate: the full model plus one run per switch flipped; each variant has its own run id and a
    leaderboard row named by the option that differs."""
    results = tmp_path / "runs"
    args = ["run", "--arch", "home,shared_bottom", "--ablate", "feature_gate,self_gate", "--seed", "0",
            "--tasks", "ctr,cvr", *SMALL, "--results-dir", str(results), "--jobs", "1"]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 runs, 0 already done" in out  # home full / no feature gate / no self gate, shared_bottom once
    assert "[feature_gate=False]" in out and "[self_gate=False]" in out
    assert main(args) == 0
    recs = list(_records(results).values())
    flags = sorted((r["spec"]["arch"], r["spec"]["arch_options"].get("feature_gate"),
                    r["spec"]["arch_options"].get("self_gate")) for r in recs)
    assert flags == [("home", False, True), ("home", True, False), ("home", True, True),
                     ("shared_bottom", None, None)]
    capsys.readouterr()
    assert main(["run", "--arch", "mmoe", "--ablate", "feature_gat", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown switch to ablate for arch mmoe 'feature_gat'" in err and "batch_norm" in err
    assert len(err.strip().splitlines()) == 1


def test_failure_never_replaces_a_finished_record(tmp_path):
    from mtlbench.results.store import read_record, record_path, store_run
    from mtlbench.testing import fake_record

    ok = fake_record("ecommerce", "mmoe", "ew", 0, {"ctr": 0.7, "cvr": 0.8})
    path = store_run(tmp_path, ok)
    assert path.stat().st_mode & 0o777 == 0o644  # readable by a team, not mkstemp's 0600
    failed = {**ok, "status": "failed", "error": {"reason": "lost a race"}}
    store_run(tmp_path, failed)
    assert read_record(record_path(tmp_path, ok["run_id"]))["status"] == "ok"
    other = {**failed, "run_id": "f" * 20}
    store_run(tmp_path, other)  # no finished record to protect: the failure is stored
    assert read_record(record_path(tmp_path, other["run_id"]))["status"] == "failed"


@pytest.mark.parametrize("text,needle", [
    ("archs: [mmoe]\n", "unknown setting in config file"),
    ("epochs: two\n", "'epochs' must be an integer"),
    ("arch_options: 3\n", "'arch_options' must be a mapping"),
    ("- a\n- b\n", "must hold a mapping"),
    ("epochs: [1\n", "does not parse"),
])
def test_bad_config(tmp_path, capsys, text, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    assert main(["run", "--config", str(cfg), "--results-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_bad_sweep_flags(tmp_path, capsys):
    assert main(["run", "--seeds", "x-y", "--results-dir", str(tmp_path)]) == 2
    assert "does not parse" in capsys.readouterr().err
    assert main(["run", "--executor", "dask", "--results-dir", str(tmp_path)]) == 2
    assert "unknown executor 'dask'" in capsys.readouterr().err
    assert main(["run", "--seed", "1", "--seeds", "2", "--results-dir", str(tmp_path)]) == 2
    assert "either --seed or --seeds" in capsys.readouterr().err


def test_killed_sweep_resumes_without_loss_or_duplicates(tmp_path):
    results = tmp_path / "runs"
    cmd = [sys.executable, "-m", "mtlbench.cli", "run", "--arch", "shared_bottom", "--seeds", "0-5",
           "--tasks", "ctr", "--jobs", "1", *SMALL, "--results-dir", str(results)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(results.glob("*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = _records(results)
    assert 2 <= len(first) < 6, "kill the sweep in the middle"
    assert all(r["status"] == "ok" for r in first.values())
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    final = _records(results)
    assert len(final) == 6 and {r["spec"]["seed"] for r in final.values()} == set(range(6))
    for k, v in first.items():
        assert final[k] == v
    assert not list(results.glob(".*.tmp"))


def test_local_pool_matches_serial(tmp_path):
    args = ["--arch", "mmoe", "--seeds", "0-1", "--tasks", "ctr,cvr", *SMALL]
    assert main(["run", *args, "--jobs", "1", "--threads", "1", "--results-dir", str(tmp_path / "a")]) == 0
    assert main(["run", *args, "--jobs", "2", "--results-dir", str(tmp_path / "b")]) == 0  # 1 thread each
    a, b = _records(tmp_path / "a"), _records(tmp_path / "b")
    assert set(a) == set(b)
    for k in a:
        assert a[k]["environment"]["threads"] == b[k]["environment"]["threads"] == 1
        assert a[k]["metrics"] == b[k]["metrics"]


ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'mtlbench[ray]'")


def test_ray_executor_real_local_cluster(tmp_path, capsys):
    args = ["--arch", "shared_bottom,mmoe", "--seed", "0", "--tasks", "ctr,cvr", *SMALL]
    assert main(["run", *args, "--jobs", "1", "--threads", "1", "--results-dir", str(tmp_path / "local")]) == 0
    try:
        assert main(["run", *args, "--executor", "ray", "--results-dir", str(tmp_path / "ray")]) == 0
    finally:
        ray.shutdown()
    assert "2 done" in capsys.readouterr().out
    local, remote = _records(tmp_path / "local"), _records(tmp_path / "ray")
    assert set(local) == set(remote)
    for k in local:
        assert remote[k]["status"] == "ok"
        assert remote[k]["metrics"] == local[k]["metrics"]  # one thread each: the same numbers


def test_ray_address_that_does_not_answer(tmp_path, capsys):
    code = main(["run", "--arch", "shared_bottom,mmoe", *SMALL, "--executor", "ray", "--ray-address",
                 "127.0.0.1:1", "--results-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "does not answer" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------------- faults

def _children(pid: int) -> list[int]:
    """Live sweep workers among the child processes of ``pid`` (Linux /proc; not multiprocessing's tracker)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in cmdline:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
SWEEP = [sys.executable, "-m", "mtlbench.cli", "run", "--arch", "shared_bottom", "--tasks", "ctr",
         "-D", "n_rows=3000", "-D", "n_users=200", "-D", "n_items=100", "--batch-size", "256"]


def _wait(cond, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


@linux_only
def test_killed_worker_fails_only_its_own_run(tmp_path):
    results = tmp_path / "runs"
    proc = subprocess.Popen([*SWEEP, "--epochs", "3", "--seeds", "0-3", "--jobs", "2", "--results-dir",
                             str(results)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    claims = results / ".claims"
    assert _wait(lambda: claims.is_dir() and any(claims.glob("*.claim")) and len(_children(proc.pid)) >= 2)
    victim_claim = sorted(claims.glob("*.claim"))[0].stem
    victim = _children(proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    recs = _records(results)
    failed = [r for r in recs.values() if r["status"] == "failed"]
    assert len(recs) == 4 and len(failed) == 1, out
    assert failed[0]["error"]["infrastructure"] is True and "signal 9" in failed[0]["error"]["reason"]
    assert "3 done" in out and "1 failed" in out
    assert victim_claim in {r["run_id"] for r in recs.values()}
    assert not list(claims.glob("*.claim"))  # every claim given back


@linux_only
def test_workers_die_with_the_sweep(tmp_path):
    results = tmp_path / "runs"
    proc = subprocess.Popen([*SWEEP, "--epochs", "50", "--seeds", "0-3", "--jobs", "2", "--results-dir",
                             str(results)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait(lambda: len(_children(proc.pid)) >= 2)
    workers = _children(proc.pid)
    proc.kill()
    proc.wait()
    assert _wait(lambda: not any(_alive(w) for w in workers), timeout=15), "orphaned workers"


def test_claims_are_exclusive_and_stale_ones_taken_over(tmp_path):
    from mtlbench.sweep import claim, release

    assert claim(tmp_path, "abc") is None
    assert claim(tmp_path, "abc") == f"pid {os.getpid()} on {__import__('socket').gethostname()}"
    release(tmp_path, "abc")
    assert claim(tmp_path, "abc") is None
    release(tmp_path, "abc")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".claims" / "stale.claim").write_text(f"{dead.pid} {__import__('socket').gethostname()} 0\n")
    assert claim(tmp_path, "stale") is None  # its process is gone: taken over


def test_two_sweeps_never_train_one_spec_twice(tmp_path):
    results = tmp_path / "runs"
    cmd = [*SWEEP, "--epochs", "1", "--seeds", "0-3", "--jobs", "1", "--results-dir", str(results)]
    a = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    b = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (out_a, err_a), (out_b, err_b) = a.communicate(timeout=300), b.communicate(timeout=300)
    assert a.returncode == b.returncode == 0, (err_a, err_b)
    trained = [line for err in (err_a, err_b) for line in err.splitlines() if "] ok " in line]
    assert len(trained) == 4, (err_a, err_b)  # each of the 4 specs trained by exactly one of the sweeps
    assert len(_records(results)) == 4


def test_ctrl_c_prints_the_summary(tmp_path):
    results = tmp_path / "runs"
    proc = subprocess.Popen([*SWEEP, "--epochs", "30", "-D", "n_rows=20000", "--seeds", "0-5", "--jobs", "2",
                             "--results-dir", str(results)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert _wait(lambda: (results / ".claims").is_dir() and any((results / ".claims").glob("*.claim")))
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted (not recorded" in out and "done" in out and "failed" in out, out
    assert "Traceback" not in err
    assert not list((results / ".claims").glob("*.claim"))


def test_ablation_reads_the_image_variants_switches(tmp_path, capsys):
    """On an image dataset --ablate looks up the image arch's switches (ple's shared_gate), not the tabular
    variant's under the same name; the dry run lists only the options that differ from that variant's defaults."""
    args = ["run", "--dataset", "scenes", "--arch", "ple,shared_bottom", "--ablate", "shared_gate", "--seed", "0",
            "--results-dir", str(tmp_path / "runs"), "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[shared_gate=False]" in out and "3 runs, 0 already done" in out
    assert "encoder=" not in out  # image defaults are not reported as changes
    assert main(["run", "--dataset", "scenes", "--arch", "ple", "--ablate", "batch_norm", "--dry-run",
                 "--results-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "unknown switch to ablate for arch ple 'batch_norm'" in err and "shared_gate" in err
