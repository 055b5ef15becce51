"""The typed run record, the store's validation and the leaderboard / compare behaviours built on them."""
from __future__ import annotations

import json
import random
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

from mtlbench.cli import main
from mtlbench.errors import MtlbenchError
from mtlbench.results import methods as mid
from mtlbench.results.compare import compare
from mtlbench.results.leaderboard import build_tables, load_store, long_frame
from mtlbench.results.record import (RECORD_SCHEMA, NewerSchema, RecordError, RunRecord, make_record,
                                     relative_traceback)
from mtlbench.results.report import latex, markdown, slug, write_leaderboard
from mtlbench.testing import TASKS, fake_record, write_fake_store

AUC = {"single": {"ctr": 0.70, "cvr": 0.60}, "mmoe": {"ctr": 0.77, "cvr": 0.54}, "home": {"ctr": 0.735, "cvr": 0.63}}


def _records(archs=("single", "mmoe", "home"), seeds=range(5), noise=0.01, **kw):
    return [fake_record("ecommerce", a, "ew", s, AUC[a], noise=noise, rng=random.Random(f"{a}{s}"), **kw)
            for a in archs for s in seeds]


def _tables(tmp_path, recs, **kw):
    store = load_store(write_fake_store(tmp_path / "runs", recs))
    return build_tables(long_frame(store.records), superseded=store.superseded, **kw), store


# ------------------------------------------------------------------------------------------- the record


def test_one_constructor_created_is_iso_and_run_id_hashed_like_runspec():
    from mtlbench.spec import RunSpec
    from mtlbench.sweep import crash_record

    rec = fake_record("ecommerce", "mmoe", "ew", 3, AUC["mmoe"], arch_options={"n_experts": 4})
    assert rec["run_id"] == RunSpec.from_dict(rec["spec"]).run_id
    crash = crash_record(RunSpec.from_dict(rec["spec"]), "worker died")
    for r in (rec, crash):
        assert r["schema"] == RECORD_SCHEMA and isinstance(r["created"], str)
        datetime.fromisoformat(r["created"])
    assert crash["error"]["type"] == "WorkerDied" and crash["error"]["infrastructure"] and RunRecord.from_dict(crash).status == "failed"


def test_schema_1_records_are_upgraded_float_created_and_directions():
    rec = fake_record("ecommerce", "mmoe", "ew", 0, AUC["mmoe"])
    old = {**rec, "schema": "mtlbench.run/1", "created": 1700000000.5}
    old.pop("directions")
    r = RunRecord.from_dict(old)
    assert r.created == "2023-11-14T22:13:20+00:00" and r.directions == {"auc": "max", "logloss": "min"}


@pytest.mark.parametrize("change, message", [
    ({"metrics": None}, "metrics"),
    ({"metrics": {"test": {"ctr": {"auc": "0.7"}}}}, "metric test/ctr/auc is a str"),
    ({"metrics": {"test": {"ctr": {"auc": True}}}}, "metric test/ctr/auc is a bool"),
    ({"metrics": {"test": "x"}}, "'metrics.test'"),
    ({"spec": {"dataset": "x"}}, "spec.tasks"),
    ({"status": "done"}, "status"),
    ({"created": "yesterday"}, "created"),
    ({"directions": {"auc": "up", "logloss": "min"}}, "direction of metric 'auc'"),
    ({"directions": {"auc": "max"}}, "no direction (max/min) for metric(s) logloss"),
    ({"curves": {}}, "curves"),
])
def test_invalid_records_are_refused_in_one_line(change, message):
    rec = {**fake_record("ecommerce", "mmoe", "ew", 0, AUC["mmoe"]), **change}
    with pytest.raises(RecordError, match=message.replace("(", r"\(").replace(")", r"\)")) as exc:
        RunRecord.from_dict(rec)
    assert "\n" not in str(exc.value)


def test_failed_record_traceback_paths_are_relative():
    import mtlbench

    root = str(Path(mtlbench.__file__).resolve().parent.parent)
    tb = (f'Traceback (most recent call last):\n  File "{root}/mtlbench/train.py", line 3, in run\n'
          '  File "/usr/lib/python3/site-packages/torch/nn/modules/module.py", line 9, in f\nValueError: x\n')
    rec = make_record({"dataset": "d", "tasks": ["a"], "arch": "a", "optimizer": "ew", "seed": 0,
                       "arch_options": {}, "optimizer_options": {}}, "abc", "failed",
                      error={"reason": "ValueError: x", "type": "ValueError", "traceback": tb})
    text = rec.error["traceback"]
    assert root not in text and 'File "mtlbench/train.py"' in text
    assert 'File "site-packages/torch/nn/modules/module.py"' in text
    assert relative_traceback(None) is None


# ------------------------------------------------------------------------------------------- the store


def test_store_skips_bad_records_in_one_line_each_and_counts_a_copy_once(tmp_path, capsys):
    recs = _records(archs=("single", "mmoe"), seeds=range(2))
    runs = write_fake_store(tmp_path / "runs", recs)
    first = runs / f"{recs[0]['run_id']}.json"
    (runs / "copy-of-a-run.json").write_text(first.read_text())          # same run id, second name
    bad_metric = {**recs[1], "run_id": "b" * 20, "metrics": {"test": {"ctr": {"auc": "high"}}}}
    null_metrics = {**recs[1], "run_id": "c" * 20, "metrics": None}
    newer = {**recs[1], "run_id": "d" * 20, "schema": "mtlbench.run/99"}
    for name, rec in (("bad.json", bad_metric), ("null.json", null_metrics), ("newer.json", newer)):
        (runs / name).write_text(json.dumps(rec))
    store = load_store(runs)
    assert len(store.records) == 4
    by_file = {line.split(":")[0]: line for line in store.skipped}
    assert set(by_file) == {"copy-of-a-run.json", "bad.json", "null.json", "newer.json"}
    assert "counted once" in by_file["copy-of-a-run.json"]
    assert "metric test/ctr/auc is a str" in by_file["bad.json"]
    assert "newer mtlbench" in by_file["newer.json"] and "mtlbench.run/99" in by_file["newer.json"]
    (t,) = build_tables(long_frame(store.records))
    assert t.stats["single × ew"][("ctr", "auc")]["n"] == 2                 # not 3 from 2 seeds
    assert main(["leaderboard", "--results-dir", str(runs), "--out", str(tmp_path / "lb"), "--no-plots"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len([e for e in err if e.startswith("mtlbench: skipped ")]) == 4
    assert main(["compare", "mmoe", "single", "--results-dir", str(runs)]) == 0
    assert "summary over 4 rows" in capsys.readouterr().out


def test_a_newer_record_is_never_overwritten(tmp_path):
    from mtlbench.results.store import finished_record, record_path

    rec = fake_record("ecommerce", "mmoe", "ew", 0, AUC["mmoe"])
    path = record_path(tmp_path, rec["run_id"])
    path.write_text(json.dumps({**rec, "schema": "mtlbench.run/3"}))
    with pytest.raises(MtlbenchError, match="newer mtlbench"):
        finished_record(tmp_path, rec["run_id"])
    with pytest.raises(NewerSchema):
        RunRecord.from_dict({**rec, "schema": "mtlbench.run/3"})


def test_one_seed_of_one_method_counts_once_newest_kept(tmp_path):
    recs = _records(archs=("single", "mmoe"), seeds=range(3))
    newer = fake_record("ecommerce", "mmoe", "ew", 0, {"ctr": 0.9, "cvr": 0.9},
                        spec_changes={"plugin_sources": {"mine.py": "abc"}},
                        created=datetime(2026, 6, 1, tzinfo=timezone.utc))
    assert newer["run_id"] != recs[3]["run_id"]
    (t,), store = _tables(tmp_path, recs + [newer])
    assert t.stats["mmoe × ew"][("ctr", "auc")]["n"] == 3 and t.seeds["mmoe × ew"] == [0, 1, 2]
    assert [d.run_id for d, _ in store.superseded] == [recs[3]["run_id"]]
    assert any("each seed counts once" in n and recs[3]["run_id"] in n for n in t.notes)


# ----------------------------------------------------------------------------------- method identity


def _variants(defaults: bool):
    recs = []
    for fg in (True, False):
        for s in range(3):
            recs.append(fake_record("ecommerce", "home", "ew", s, AUC["home"], noise=0.01,
                                    rng=random.Random(f"h{fg}{s}"), arch_options={"feature_gate": fg},
                                    option_defaults={"arch": {"feature_gate": True}, "optimizer": {}}
                                    if defaults else None))
    return recs + _records(archs=("single", "mmoe"), seeds=range(3))


def test_baseline_home_matches_home_with_option_variants_like_compare(tmp_path):
    (t,), _ = _tables(tmp_path, _variants(defaults=True), baseline="home")
    assert t.baseline == "home(feature_gate=true) × ew"
    (t,), _ = _tables(tmp_path / "2", _variants(defaults=True), baseline="home(feature_gate=false):ew")
    assert t.baseline == "home(feature_gate=false) × ew"
    runs = tmp_path / "runs"
    out = compare(str(runs), "home:ew", "mmoe:ew")
    assert out.startswith("home(feature_gate=true) × ew  vs  mmoe × ew")
    assert compare(str(runs), "home(feature_gate=false)", "mmoe").startswith("home(feature_gate=false) × ew")
    assert compare(str(runs), "home(feature_gate=false) × ew", "mmoe").startswith("home(feature_gate=false) × ew")


def test_ambiguous_method_names_list_how_to_name_each(tmp_path):
    (t,), _ = _tables(tmp_path, _variants(defaults=False), baseline="home")
    assert t.baseline is None
    assert any("'home' names 2 methods" in n and "home(feature_gate=false):ew" in n for n in t.notes)
    with pytest.raises(MtlbenchError, match=r"'home:ew' names 2 methods .*home\(feature_gate=true\):ew"):
        compare(str(tmp_path / "runs"), "home:ew", "mmoe")


def test_method_names_parse():
    assert mid.parse("home") == ("home", {}, None, {})
    assert mid.parse("home(a=1,b=[1,2]):cagrad(c=0.5)") == ("home", {"a": "1", "b": "[1,2]"}, "cagrad", {"c": "0.5"})
    assert mid.parse("home(a=1) × ew") == ("home", {"a": "1"}, "ew", {})
    with pytest.raises(MtlbenchError, match="KEY=VALUE"):
        mid.parse("home(a):ew")


def test_compare_bogus_split_blames_the_split(tmp_path):
    runs = write_fake_store(tmp_path / "runs", _records(seeds=range(2)))
    with pytest.raises(MtlbenchError, match=r"unknown split 'bogus'.*test, train, val"):
        compare(str(runs), "home", "mmoe", split="bogus")


def test_compare_prints_a_summary_line(tmp_path):
    runs = write_fake_store(tmp_path / "runs", _records(noise=0.001))
    out = compare(str(runs), "home", "mmoe").splitlines()
    (line,) = [x for x in out if x.startswith("summary over")]
    # home vs mmoe: ctr auc/logloss worse (0.735 < 0.77), cvr auc/logloss better (0.63 > 0.54), all significant
    assert "A better on 2 (2 significant), B better on 2 (2 significant), 0 tied" in line


# ----------------------------------------------------------------------------------- issue 14 defects


def test_dagger_marks_only_significantly_worse_cells(tmp_path):
    auc = {"single": {"ctr": 0.70, "cvr": 0.60}, "mmoe": {"ctr": 0.80, "cvr": 0.60},
           "home": {"ctr": 0.70, "cvr": 0.65}}
    recs = [fake_record("ecommerce", a, "ew", s, auc[a], noise=0.001, rng=random.Random(f"{a}{s}"))
            for a in auc for s in range(6)]
    (t,), store = _tables(tmp_path, recs)
    assert t.methods[0] == "mmoe × ew"                        # top by Δm%
    assert t.significance["home × ew"]["cvr"]["mean_diff"] > 0  # home significantly *better* on cvr
    row = next(r for r in markdown([t], store, None).splitlines() if r.startswith("| home × ew"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    ctr_auc, cvr_auc = cells[2], cells[4]
    assert ctr_auc.endswith("†") and not cvr_auc.endswith("†")


def test_a_metric_without_a_direction_is_never_ranked(tmp_path):
    tasks = ({"name": "ctr", "kind": "binary", "metrics": ["auc", "logloss"]},
             {"name": "cvr", "kind": "binary", "metrics": ["auc", "logloss"]})
    recs = []
    for a in ("single", "mmoe"):
        for s in range(2):
            r = fake_record("ecommerce", a, "ew", s, AUC[a], tasks=tasks)
            for split in r["metrics"].values():
                split["ctr"]["plugin_score"] = 1.0 if a == "mmoe" else 2.0
            r.update(schema="mtlbench.run/1")       # written before directions were stored
            r.pop("directions")
            recs.append(r)
    (t,), store = _tables(tmp_path, recs)
    assert t.directions["plugin_score"] is None and ("ctr", "plugin_score") not in t.ranked_columns
    assert any("plugin_score" in n and "not ranked" in n for n in t.notes)
    # mean rank over the 4 ranked columns only (mmoe: ctr 1, 1; cvr 2, 2 -> 1.5)
    assert t.mean_rank["mmoe × ew"] == 1.5
    md = markdown([t], store, None)
    assert "ctr plugin_score (no direction: not ranked)" in md and "**1.0000" not in md and "**2.0000" not in md


def test_significance_n_counts_the_pairs_tested_and_holm_floor_is_said(tmp_path):
    recs = _records(seeds=range(5))
    recs[5]["metrics"]["test"]["ctr"]["auc"] = None     # mmoe seed 0: no ctr AUC
    (t,), _ = _tables(tmp_path, recs)
    top = t.methods[0]
    assert top == "home × ew"
    assert t.significance["mmoe × ew"]["ctr"]["n"] == 4 and t.significance["mmoe × ew"]["cvr"]["n"] == 5
    assert any("m=4 comparisons" in n and "cannot reject at alpha=0.05" in n for n in t.notes)


def test_round_off_ties_rank_equal_everywhere(tmp_path):
    base = {"ctr": 0.7, "cvr": 0.6}
    recs = [fake_record("ecommerce", a, "ew", s, dict(base), rng=random.Random(0)) for a in ("mmoe", "home")
            for s in range(3)]
    for r in recs[3:]:
        r["metrics"]["test"]["ctr"]["auc"] = 0.1 + 0.2 + 0.4   # 0.7000000000000001: round-off only
    (t,), _ = _tables(tmp_path, recs)
    assert t.mean_rank["mmoe × ew"] == t.mean_rank["home × ew"] == 1.5


def test_cost_column_and_cost_figure(tmp_path):
    recs = (_records(archs=("single",), seeds=range(2), seconds_per_epoch=2.0)
            + _records(archs=("mmoe",), seeds=range(2), seconds_per_epoch=5.0)
            + _records(archs=("home",), seeds=range(2), seconds_per_epoch=3.0))
    (t,), store = _tables(tmp_path, recs)
    assert t.cost_reference == "single × ew"
    assert t.cost == {"single × ew": 1.0, "mmoe × ew": 2.5, "home × ew": 1.5}
    md = markdown([t], store, None)
    assert "cost ↓" in md and "relative to `single × ew` (2 s per epoch)" in md
    out = write_leaderboard(tmp_path / "runs", tmp_path / "lb", formats=("md",))
    assert (tmp_path / "lb" / "figures" / f"{slug(t)}-cost.png").exists() and out["md"].exists()
    # without single, the reference is shared_bottom x ew; without either, cost is n/a and said
    (t,), _ = _tables(tmp_path / "2", _records(archs=("mmoe", "home"), seeds=range(2)))
    assert t.cost_reference is None and set(t.cost.values()) == {None}


# ------------------------------------------------------------------------------------------ outputs


def test_method_names_are_escaped_in_markdown_and_latex(tmp_path):
    recs = _records(archs=("single", "mmoe"), seeds=range(2))
    for r in recs[2:]:
        r["spec"]["arch"] = "evil|arch_<b>$x$&"
    (t,), store = _tables(tmp_path, recs)
    md = markdown([t], store, None)
    row = next(r for r in md.splitlines() if r.startswith("| evil"))
    assert row.startswith("| evil\\|arch\\_&lt;b&gt;\\$x\\$&amp; × ew |") and len(row.split(" | ")) == 9
    tex = latex([t])
    assert "evil|arch\\_\\textless{}b\\textgreater{}\\$x\\$\\& $\\times$ ew" in tex


def test_139_tasks_leaderboard_bounded_names_compact_table(tmp_path, capsys):
    tasks = tuple({"name": f"subject_group_{i:03d}_response", "kind": "binary", "metrics": ["auc", "logloss"]}
                  for i in range(139))
    auc = {t["name"]: 0.6 + 0.001 * i for i, t in enumerate(tasks)}
    recs = [fake_record("big", a, "ew", s, auc, tasks=tasks, noise=0.01, rng=random.Random(f"{a}{s}"))
            for a in ("single", "mmoe") for s in range(2)]
    runs = write_fake_store(tmp_path / "runs", recs)
    assert main(["leaderboard", "--results-dir", str(runs), "--out", str(tmp_path / "lb")]) == 0
    figures = sorted(p.name for p in (tmp_path / "lb" / "figures").glob("*.png"))
    assert figures and max(len(f) for f in figures) < 100
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "per-task columns are left out here" in md and "leaderboard.csv" in md
    assert len(md) < 20_000 and len((tmp_path / "lb" / "leaderboard.tex").read_text()) < 20_000
    html_text = (tmp_path / "lb" / "leaderboard.html").read_text()
    assert "better / worse" in html_text and html_text.count("<tr>") < 50
    assert len(pd.read_csv(tmp_path / "lb" / "leaderboard.csv")) == 4 * 3 * 139 * 2    # every metric in the CSV


def test_csv_only_and_no_plots_draw_nothing(tmp_path):
    runs = write_fake_store(tmp_path / "runs", _records(seeds=range(2)))
    assert main(["leaderboard", "--results-dir", str(runs), "--out", str(tmp_path / "a"), "--format", "csv"]) == 0
    assert not list((tmp_path / "a").rglob("*.png"))
    assert main(["leaderboard", "--results-dir", str(runs), "--out", str(tmp_path / "b"), "--no-plots"]) == 0
    assert not list((tmp_path / "b").rglob("*.png")) and (tmp_path / "b" / "leaderboard.html").exists()


def test_slug_is_bounded_and_unique():
    from mtlbench.results.leaderboard import Table

    def table(tasks):
        proto = {"dataset": "d", "tasks": tasks}
        return Table(proto, [], {}, [], {}, {}, "", {}, {}, {})

    long1 = table([f"task_{i}" for i in range(139)])
    long2 = table([f"task_{i}" for i in range(138)] + ["other"])
    assert len(slug(long1)) <= 80 and slug(long1) != slug(long2) and "139tasks" in slug(long1)
    assert slug(table(["ctr", "cvr"])).startswith("d-ctr-cvr-")


@pytest.mark.parametrize("correction", ["holm", "bh"])
def test_compare_takes_the_correction_and_alpha(tmp_path, capsys, correction):
    """`mtlbench compare --correction/--alpha`: the adjusted p of each row is that correction of the raw ones,
    the summary counts significance at the given alpha; a bad value is one line before any record is read."""
    from mtlbench.cli import main
    from mtlbench.results import stats as S

    runs = write_fake_store(tmp_path / "runs", _records(noise=0.01))
    assert main(["compare", "home", "mmoe", "--results-dir", str(runs), "--correction", correction,
                 "--alpha", "0.2"]) == 0
    out = capsys.readouterr().out.splitlines()
    short = {"holm": "Holm", "bh": "BH"}[correction]
    head = next(i for i, x in enumerate(out) if x.startswith("task"))
    assert f"t p ({short})" in out[head]
    rows = [x.split() for x in out[head + 1:] if x and not x.startswith(("summary", "notes"))]
    raw = [float(r[-4]) for r in rows]
    adjusted = [float(r[-3].strip("()")) for r in rows]
    # printed to 3 decimals: each raw p is off by up to 5e-4, which a correction multiplies by at most m
    tol = 5e-4 * (len(raw) + 1)
    assert adjusted == pytest.approx(list(S.correct(raw, correction).adjusted), abs=tol)
    assert any(x.startswith("summary over") and "p < 0.2" in x for x in out)
    assert main(["compare", "home", "mmoe", "--results-dir", str(tmp_path / "nowhere"), "--correction", "bonf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bonf" in err and "holm" in err and "bh" in err
