"""The leaderboard: a pure, deterministic function of stored records, with honest Δm% and statistics."""
from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pandas as pd
import pytest

from mtlbench.cli import main
from mtlbench.results.leaderboard import build_tables, load_store, long_frame
from mtlbench.results.report import write_leaderboard
from mtlbench.testing import fake_record, write_fake_store

AUC = {"single": {"ctr": 0.70, "cvr": 0.60}, "mmoe": {"ctr": 0.77, "cvr": 0.54}, "home": {"ctr": 0.735, "cvr": 0.63}}


def _store(tmp_path: Path, archs=("single", "mmoe", "home"), seeds=range(5), noise=0.0, dataset="ecommerce"):
    recs = [fake_record(dataset, a, "ew", s, AUC[a], noise=noise, rng=random.Random(f"{dataset}{a}{s}"))
            for a in archs for s in seeds]
    return write_fake_store(tmp_path / "runs", recs)


def test_delta_m_by_hand(tmp_path):
    tables = build_tables(long_frame(load_store(_store(tmp_path)).records))
    (t,) = tables
    # Δm%(mmoe) = mean(+(0.77-0.70)/0.70, +(0.54-0.60)/0.60) * 100 = mean(10, -10) = 0
    # Δm%(home) = mean(+(0.735-0.70)/0.70, (0.63-0.60)/0.60) * 100 = mean(5, 5) = 5
    assert t.delta_m["mmoe × ew"] == pytest.approx(0.0, abs=1e-9)
    assert t.delta_m["home × ew"] == pytest.approx(5.0)
    assert t.delta_m["single × ew"] == pytest.approx(0.0)
    assert t.methods[0] == "home × ew"  # sorted by Δm%
    assert "Maninis" in t.delta_m_note and "positive = better" in t.delta_m_note
    assert t.stats["mmoe × ew"][("ctr", "auc")] == {"mean": pytest.approx(0.77), "std": pytest.approx(0.0),
                                                     "n": 5}
    # mean rank over the 4 columns: ctr auc (mmoe 1, home 2, single 3), ctr logloss (same), cvr (home, single,
    # mmoe) twice -> home 1.5, mmoe 2, single 2.5
    assert t.mean_rank == {"home × ew": 1.5, "mmoe × ew": 2.0, "single × ew": 2.5}


def test_flat_delta_m_uses_every_metric(tmp_path):
    frame = long_frame(load_store(_store(tmp_path)).records)
    (t,) = build_tables(frame, flat_delta_m=True)
    terms = [(0.77 - 0.70) / 0.70, -(-math.log(0.77) + math.log(0.70)) / -math.log(0.70),
             (0.54 - 0.60) / 0.60, -(-math.log(0.54) + math.log(0.60)) / -math.log(0.60)]
    assert t.delta_m["mmoe × ew"] == pytest.approx(100 * sum(terms) / 4)


def test_missing_baseline_is_said_never_faked(tmp_path):
    (t,) = build_tables(long_frame(load_store(_store(tmp_path, archs=("mmoe", "home"))).records))
    assert all(v is None for v in t.delta_m.values())
    assert "no single-task" in t.delta_m_note
    out = write_leaderboard(tmp_path / "runs", tmp_path / "lb")
    md = out["md"].read_text()
    assert "Δm% n/a: no single-task" in md and "| n/a |" in md


def test_significance_and_small_n_note(tmp_path):
    (t,) = build_tables(long_frame(load_store(_store(tmp_path, noise=0.01)).records))
    s = t.significance["single × ew"]["ctr"]
    assert s["n"] == 5 and s["t_p_adjusted"] >= s["t_p"]
    assert "0.0625" in s["note"]  # exact Wilcoxon with 5 seeds cannot go lower: said, not hidden


def test_all_formats_and_byte_for_byte(tmp_path):
    store = _store(tmp_path, noise=0.005)
    write_fake_store(store, [fake_record("census", a, "ew", s, AUC[a], noise=0.005, rng=random.Random(f"c{a}{s}"))
                             for a in AUC for s in range(5)])
    first = write_leaderboard(store, tmp_path / "a")
    second = write_leaderboard(store, tmp_path / "b")
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert {p.suffix for p in files_a} >= {".md", ".csv", ".tex", ".json", ".html", ".png"}
    assert any("critical_difference" in str(p) for p in files_a)  # two tables share all methods
    csv = pd.read_csv(first["csv"])
    assert len(csv) == 2 * 3 * 5 * 3 * 2 * 2  # datasets x methods x seeds x splits x tasks x metrics
    doc = json.loads(first["json"].read_text())
    assert len(doc["tables"]) == 2 and doc["across_datasets"][0]["methods"] == sorted(f"{a} × ew" for a in AUC)
    tex = first["tex"].read_text()
    assert "\\begin{tabular}" in tex and "\\textbf{" in tex and "\\underline{" in tex


def test_figures_redrawn_only_when_what_they_show_changes(tmp_path, monkeypatch):
    from mtlbench.results import report

    store = _store(tmp_path, noise=0.005)
    write_fake_store(store, [fake_record("census", a, "ew", s, AUC[a], noise=0.005, rng=random.Random(f"c{a}{s}"))
                             for a in AUC for s in range(5)])
    out = tmp_path / "lb"
    write_leaderboard(store, out)
    before = {p.name: p.read_bytes() for p in (out / "figures").glob("*.png")}
    drawn: list[str] = []
    for name in ("plot_bars", "plot_tradeoff", "plot_curves"):
        real = getattr(report, name)
        monkeypatch.setattr(report, name, lambda *a, _real=real, _n=name: drawn.append(_n) or _real(*a))
    write_leaderboard(store, out)  # unchanged records: nothing is drawn, every byte is the same
    assert drawn == []
    assert {p.name: p.read_bytes() for p in (out / "figures").glob("*.png")} == before
    one = next(store.glob("*.json"))  # change one record: only its table's three figures are redrawn
    rec = json.loads(one.read_text())
    rec["metrics"]["test"]["ctr"]["auc"] -= 0.01
    one.write_text(json.dumps(rec))
    write_leaderboard(store, out)
    assert sorted(drawn) == ["plot_bars", "plot_curves", "plot_tradeoff"]
    stale = out / "figures" / "gone-bars.png"  # a figure of a table that no longer exists is removed
    stale.write_bytes(b"x")
    write_leaderboard(store, out)
    assert not stale.exists()


def test_bad_and_failed_records_are_reported_not_fatal(tmp_path, recwarn):
    store = _store(tmp_path)
    (store / "broken.json").write_text('{"schema": "mtlbench.run/1", "spec": {')
    failed = fake_record("ecommerce", "mmoe", "ew", 9, AUC["mmoe"])
    failed.update(status="failed", error={"reason": "non-finite loss in epoch 2"})
    failed.pop("metrics")
    write_fake_store(store, [failed])
    out = write_leaderboard(store, tmp_path / "lb")
    assert not [w for w in recwarn if "broken" in str(w.message)]  # a line in the store's report, not a warning
    assert [s for s in load_store(store).skipped if s.startswith("broken.json: invalid run record: not valid JSON")]
    md = out["md"].read_text()
    assert "broken.json" in md and "non-finite loss in epoch 2" in md
    (t,) = build_tables(long_frame(load_store(store).records))
    assert t.seeds["mmoe × ew"] == [0, 1, 2, 3, 4]


def test_option_variants_are_separate_methods(tmp_path):
    recs = [fake_record("ecommerce", "home", "ew", s, AUC["home"], arch_options={"feature_gate": fg})
            for s in range(2) for fg in (True, False)]
    (t,) = build_tables(long_frame(load_store(write_fake_store(tmp_path / "r", recs)).records))
    assert sorted(t.methods) == ["home(feature_gate=false) × ew", "home(feature_gate=true) × ew"]


def test_every_method_also_tested_against_a_chosen_baseline(tmp_path):
    store = _store(tmp_path, noise=0.01)
    frame = long_frame(load_store(store).records)
    (default,) = build_tables(frame)  # default baseline: the Δm% reference
    assert default.baseline == "single × ew"
    assert set(default.significance_baseline) == {"mmoe × ew", "home × ew"}
    (t,) = build_tables(frame, baseline="home")
    assert t.baseline == "home × ew" and set(t.significance_baseline) == {"mmoe × ew", "single × ew"}
    s = t.significance_baseline["single × ew"]["cvr"]  # single's cvr 0.60 vs home's 0.63: worse, negative diff
    assert s["mean_diff"] < 0 and s["n"] == 5 and "wilcoxon_p_adjusted" in s
    (t,) = build_tables(frame, baseline="ple:ew")
    assert t.baseline is None and any("baseline 'ple:ew' has no runs" in n for n in t.notes)
    out = tmp_path / "lb"
    write_leaderboard(store, out, baseline="home:ew")
    md = (out / "leaderboard.md").read_text()
    assert "Significance vs the top row" in md and "Significance vs the baseline (home × ew)" in md


def test_cli_leaderboard_and_compare(tmp_path, capsys):
    store = _store(tmp_path, noise=0.01)
    assert main(["leaderboard", "--results-dir", str(store), "--out", str(tmp_path / "lb")]) == 0
    assert (tmp_path / "lb" / "leaderboard.html").exists()
    summary = capsys.readouterr().out.splitlines()[0]  # one line per table: size and top method
    assert summary.startswith("ecommerce (v1") and "3 methods, 15 runs; top: " in summary and "Δm% +" in summary
    assert main(["compare", "home:ew", "mmoe", "--results-dir", str(store)]) == 0
    out = capsys.readouterr().out
    assert "home × ew  vs  mmoe × ew" in out and "cvr" in out and "Holm" in out
    assert main(["compare", "home", "nope", "--results-dir", str(store)]) == 2
    assert "no runs of 'nope'" in capsys.readouterr().err
    assert main(["leaderboard", "--results-dir", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["leaderboard", "--results-dir", str(store), "--out", str(blocker / "lb")]) == 2
    assert "cannot be written" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_html_page_in_headless_chromium(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    store = _store(tmp_path, noise=0.01)
    page_path = write_leaderboard(store, tmp_path / "lb")["html"]
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_path.resolve().as_uri())
            names = lambda: page.locator("table.lb tbody tr td:first-child").all_inner_texts()  # noqa: E731
            assert names()[0] == "home × ew" and len(names()) == 3  # ordered by Δm%
            ctr_auc = page.locator("table.lb th", has_text="ctr auc")
            ctr_auc.click()
            assert names() == ["single × ew", "home × ew", "mmoe × ew"]  # ascending
            ctr_auc.click()
            assert names() == ["mmoe × ew", "home × ew", "single × ew"]  # descending
            assert page.locator("img").count() >= 3
            assert all(page.evaluate("Array.from(document.images).map(i => i.naturalWidth > 0)"))
            summaries = page.locator("details summary").all_inner_texts()  # significance vs top row, vs baseline
            assert len(summaries) == 2 and "(single × ew)" in summaries[1]
            page.locator("details summary").nth(1).click()
            assert page.locator("table.sig").nth(1).locator("tbody tr").count() == 4  # 2 methods x 2 tasks
        finally:
            browser.close()
    assert errors == []
