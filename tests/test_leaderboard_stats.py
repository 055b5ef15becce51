"""The reviewer statistics in the leaderboard (IQM, probability of improvement, Bayesian signed-rank with a ROPE,
Holm or Benjamini-Hochberg), their one declaration of settings, per-table method labels, per-task selected epochs,
across-dataset comparisons per family, and the removed alias modules."""
from __future__ import annotations

import importlib.util
import json
import random

import numpy as np
import pandas as pd
import pytest

from mtlbench.cli import main
from mtlbench.errors import MtlbenchError
from mtlbench.results import stats as S
from mtlbench.results.leaderboard import build_tables, load_store, long_frame
from mtlbench.results.options import DEFAULTS, StatOptions
from mtlbench.results.report import write_leaderboard
from mtlbench.results.compare import compare
from mtlbench.testing import fake_record, write_fake_store

AUC = {"single": {"ctr": 0.70, "cvr": 0.60}, "mmoe": {"ctr": 0.705, "cvr": 0.61}, "home": {"ctr": 0.70, "cvr": 0.6005}}


def _records(dataset="ecommerce", archs=("single", "mmoe", "home"), seeds=range(5), noise=0.004, **kw):
    return [fake_record(dataset, a, "ew", s, AUC[a], noise=noise, rng=random.Random(f"{dataset}{a}{s}"), **kw)
            for a in archs for s in seeds]


def _table(tmp_path, options=DEFAULTS, **kw):
    store = write_fake_store(tmp_path / "runs", _records(**kw))
    (t,) = build_tables(long_frame(load_store(store).records), options=options)
    return t, store


def test_robust_statistics_are_the_stats_functions_on_the_runs(tmp_path):
    t, store = _table(tmp_path)
    frame = long_frame(load_store(store).records)
    test = frame[(frame["split"] == "test") & (frame["metric"] == "auc")]

    def runs(label):
        wide = test[test["method"] == label].pivot(index="seed", columns="task", values="value")
        return wide[["ctr", "cvr"]].to_numpy()

    single, mmoe = runs("single × ew"), runs("mmoe × ew")
    rel = (mmoe - single.mean(axis=0)) / single.mean(axis=0) * 100
    iqm = S.iqm_ci(rel, 0.95, 2000, 0)
    got = t.robust["mmoe × ew"]
    assert got["iqm"]["estimate"] == pytest.approx(iqm.estimate, abs=1e-12)
    assert got["iqm"]["ci"] == pytest.approx([iqm.ci_low, iqm.ci_high], abs=1e-12)
    pi = S.probability_of_improvement_ci(mmoe, single, 0.95, 2000, 0)
    assert got["p_improvement"]["estimate"] == pytest.approx(pi.estimate, abs=1e-12)
    per_seed = ((mmoe - single) / single * 100).mean(axis=1)          # Δm% of each seed against single's seed
    bayes = S.bayesian_signed_rank(per_seed, np.zeros(5), DEFAULTS.rope)
    assert (got["bayes_vs_baseline"]["better"], got["bayes_vs_baseline"]["equivalent"],
            got["bayes_vs_baseline"]["worse"]) == pytest.approx((bayes.p_a, bayes.p_rope, bayes.p_b), abs=1e-12)
    assert got["bayes_vs_baseline"]["n"] == 5
    # mmoe is +1.2 % on average here: practically better than single at a 0.1-point ROPE, equivalent at 5 points
    assert got["bayes_vs_baseline"]["better"] > 0.9
    wide, _ = _table(tmp_path / "wide", options=StatOptions(rope=5.0))
    assert wide.robust["mmoe × ew"]["bayes_vs_baseline"]["equivalent"] > 0.9
    assert "p_improvement" not in t.robust["single × ew"]     # not against itself
    assert "bayes_vs_top" not in t.robust[t.methods[0]]


def test_markdown_json_tex_html_show_the_statistics_and_their_settings(tmp_path):
    store = write_fake_store(tmp_path / "runs", _records())
    out = write_leaderboard(store, tmp_path / "lb", plots=False)
    md = out["md"].read_text()
    assert "### Robust aggregates and practical significance" in md
    for text in ("interquartile mean (Agarwal et al. 2021)", "2000 resamples", "Benavoli et al. 2017",
                 "±0.1 Δm% points", "50000 posterior samples", "probability of improvement", "Holm-corrected"):
        assert text in md, text
    assert "| IQM Δ% ↑ [95% CI] | P(> single × ew) ↑ [95% CI] |" in md
    doc = json.loads(out["json"].read_text())
    table = doc["tables"][0]
    assert table["statistics"] == {"alpha": 0.05, "correction": "holm", "rope": 0.1, "bayes_prior": 0.5,
                                   "bayes_samples": 50000, "bayes_min_pairs": 3, "confidence": 0.95,
                                   "bootstrap_resamples": 2000, "stat_seed": 0}
    middle = next(m for m in table["methods"][1:] if m["method"] != "single × ew")   # neither top nor baseline
    assert {"iqm", "p_improvement", "bayes_vs_baseline", "bayes_vs_top"} <= set(middle["robust"])
    assert "robust aggregates and practical significance" in out["tex"].read_text()
    assert "<h3>Robust aggregates and practical significance</h3>" in out["html"].read_text()
    assert pd.read_csv(out["csv"]).shape[0] > 0        # the CSV stays one row per run x split x task x metric


@pytest.mark.parametrize("correction", ["holm", "bh"])
def test_correction_adjusts_the_table_p_values(tmp_path, correction):
    t, _ = _table(tmp_path, options=StatOptions(correction=correction))
    raw = [(m, task, s["t_p"], s["t_p_adjusted"]) for m, per in t.significance.items() for task, s in per.items()]
    expected = S.correct([r[2] for r in raw], correction).adjusted
    assert [r[3] for r in raw] == pytest.approx(list(expected), abs=1e-15)
    if correction == "bh":  # BH never adjusts above Holm
        holm = S.holm([r[2] for r in raw]).adjusted
        assert all(b <= h + 1e-15 for b, h in zip(expected, holm))


def test_floor_notes_say_when_a_correction_cannot_reject(tmp_path):
    five, _ = _table(tmp_path / "5", options=StatOptions(correction="bh"))
    assert any("Benjamini-Hochberg-corrected Wilcoxon p can fall below 0.0625" in n for n in five.notes)
    six, _ = _table(tmp_path / "6", options=StatOptions(correction="bh"), seeds=range(6))
    assert not any("Wilcoxon p can fall below" in n for n in six.notes)   # 2/2^6 = 0.031 < 0.05
    holm6, _ = _table(tmp_path / "h6", seeds=range(6))                     # 4 comparisons x 0.031 = 0.125
    assert any("no Holm-corrected Wilcoxon p can fall below 0.125" in n and "m=4" in n for n in holm6.notes)
    assert S.wilcoxon_floor([6] * 4, correction="bh").floor == pytest.approx(2 / 2 ** 6)


def test_control_comparison_with_bh_is_bh_of_the_raw_p():
    rng = np.random.default_rng(1)
    matrix = rng.normal(size=(8, 5)) + np.arange(5) * 0.6
    names = list("abcde")
    bh = S.control_comparison(matrix, names, "e", correction="bh")
    raw = [r.pvalue for r in bh.rows]
    assert [r.p_adjusted for r in bh.rows] == pytest.approx(list(S.benjamini_hochberg(raw).adjusted), abs=1e-12)


def test_settings_declared_once_and_bad_values_one_line(tmp_path, capsys):
    assert DEFAULTS == StatOptions()
    for bad in ({"alpha": 0.0}, {"alpha": 0.7}, {"rope": 0}, {"correction": "bonferroni"}, {"bayes_samples": 1.5},
                {"confidence": 1.0}):
        with pytest.raises(MtlbenchError):
            StatOptions(**bad)
    store = write_fake_store(tmp_path / "runs", _records(archs=("single", "mmoe")))
    for flags, text in ((["--correction", "bonferroni"], "unknown correction 'bonferroni' (valid: bh, holm)"),
                        (["--alpha", "0"], "alpha 0.0 is out of range: it must be > 0 and < 0.5"),
                        (["--rope", "-1"], "rope -1.0 is out of range: it must be > 0"),
                        (["--alpha", "x"], "alpha 'x' is not a number")):
        assert main(["leaderboard", "--results-dir", str(store), "--out", str(tmp_path / "lb"), *flags]) == 2
        err = capsys.readouterr().err
        assert text in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "lb").exists()     # refused before anything was read or written
    assert main(["leaderboard", "--results-dir", str(store), "--out", str(tmp_path / "lb"), "--correction", "bh",
                 "--rope", "0.5", "--no-plots", "--format", "md"]) == 0
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "Benjamini-Hochberg-corrected" in md and "±0.5 Δm% points" in md and "t-test p (BH)" in md


def test_labels_are_per_table_and_compare_names_variants(tmp_path):
    census = [fake_record("census", "home", "ew", s, AUC["home"], arch_options={"expert_norm": norm})
              for s in range(3) for norm in (True, False)]
    ecommerce = [fake_record("ecommerce", "home", "ew", s, AUC["home"], arch_options={"expert_norm": True})
                 for s in range(3)] + [fake_record("ecommerce", "single", "ew", s, AUC["single"]) for s in range(3)]
    store = write_fake_store(tmp_path / "runs", census + ecommerce)
    frame = long_frame(load_store(store).records)
    labels = {d: sorted(set(frame.loc[frame["dataset"] == d, "method"])) for d in ("census", "ecommerce")}
    assert labels["census"] == ["home(expert_norm=false) × ew", "home(expert_norm=true) × ew"]
    assert labels["ecommerce"] == ["home × ew", "single × ew"]      # census' ablation does not relabel it
    text = compare(str(store), "home(expert_norm=true)", "single", dataset="ecommerce")
    assert text.startswith("home × ew  vs  single × ew")
    with pytest.raises(MtlbenchError, match="same method"):
        compare(str(store), "home(expert_norm=true)", "home(expert_norm=true):ew")


def test_csv_selected_epoch_is_each_tasks_own(tmp_path):
    rec = fake_record("ecommerce", "single", "ew", 0, AUC["single"], epochs=5)
    rec["selected_epochs"] = {"ctr": 2, "cvr": 5}
    rec["selected_epoch"] = 5
    other = fake_record("ecommerce", "mmoe", "ew", 0, AUC["mmoe"], epochs=5)
    store = write_fake_store(tmp_path / "runs", [rec, other])
    out = write_leaderboard(store, tmp_path / "lb", formats=("csv",))
    csv = pd.read_csv(out["csv"])
    single = csv[csv["arch"] == "single"].groupby("task")["selected_epoch"].unique()
    assert single.to_dict() == {"ctr": [2], "cvr": [5]}
    assert set(csv.loc[csv["arch"] == "mmoe", "selected_epoch"]) == {5}
    bad = dict(rec, selected_epochs={"ctr": "2"})
    with pytest.raises(Exception, match="selected_epochs"):
        from mtlbench.results.record import RunRecord
        RunRecord.from_dict(bad)


def test_across_datasets_compares_within_each_family(tmp_path):
    image = {"schema": {"image": {"channels": 3, "height": 8, "width": 8}}}
    recs = _records("census", noise=0.01) + _records("ecommerce", noise=0.01)
    for r in _records("scenes", noise=0.01):
        r["dataset"].update(image)
        recs.append(r)
    store = write_fake_store(tmp_path / "runs", recs)
    out = write_leaderboard(store, tmp_path / "lb", plots=False, formats=("md", "json"))
    doc = json.loads(out["json"].read_text())
    fams = {f["family"]: f for f in doc["across_datasets"]}
    assert set(fams) == {"tabular", "image"}
    assert len(fams["tabular"]["tables"]) == 2 and fams["tabular"]["methods"] == ["home × ew", "mmoe × ew",
                                                                                   "single × ew"]
    assert "nothing to compare" in fams["image"]["text"] and "scenes" in fams["image"]["text"]
    md = out["md"].read_text()
    assert "**Tabular tables** — 2 tables (census" in md and "**Image tables** — one table (scenes" in md


def test_probability_of_improvement_interval_equal_run_counts_matches_a_plain_loop():
    rng0 = np.random.default_rng(2)
    a, b = rng0.normal(1.0, 1.0, size=(5, 3)), rng0.normal(0.8, 1.0, size=(5, 3))
    got = S.probability_of_improvement_ci(a, b, n_resamples=150, seed=4)
    rng = np.random.default_rng(4)
    boot = []
    for _ in range(150):
        ia, ib = rng.integers(0, 5, size=(5, 3)), rng.integers(0, 5, size=(5, 3))
        boot.append(np.mean([np.mean([(x > y) + 0.5 * (x == y) for x in a[ia[:, t], t] for y in b[ib[:, t], t]])
                             for t in range(3)]))
    assert (got.ci_low, got.ci_high) == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])), abs=1e-6)


@pytest.mark.parametrize("name", ["store", "leaderboard", "stats", "report", "compare"])
def test_old_alias_modules_are_gone(name):
    assert importlib.util.find_spec(f"mtlbench.{name}") is None
    assert importlib.util.find_spec(f"mtlbench.results.{name}") is not None


def test_bayesian_test_needs_enough_shared_seeds(tmp_path):
    t, _ = _table(tmp_path, seeds=range(2))
    assert not any("bayes_vs_baseline" in r or "bayes_vs_top" in r for r in t.robust.values())
    assert any("fewer than 3 seeds are shared (here 2)" in n for n in t.robust_notes)
    assert all("iqm" in t.robust[m] for m in t.methods)        # the bootstrap statistics are still shown


def test_one_seed_notes_that_no_test_can_reject(tmp_path):
    t, _ = _table(tmp_path, seeds=range(1))
    note = next(n for n in t.notes if "Wilcoxon p can fall below 1" in n)
    assert "nor can the paired t-test, which needs at least 2 pairs" in note and "the paired t-test can)" not in note
