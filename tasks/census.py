"""UCI Census-Income (KDD): the real-data benchmark of MMoE (Ma et al., "Modeling Task Relationships in Multi-task
Learning with Multi-gate Mixture-of-Experts", KDD 2018, §6.3) and PLE (Tang et al., RecSys 2020, §5.2).

Data: the 1994/95 Current Population Surveys, one person per row, 40 attributes + an ``instance weight`` + the
income label, comma-separated without a header (``census-income.names`` describes the columns). The UCI release has
a train file ``census-income.data.gz`` (199,523 rows) and a test file ``census-income.test.gz`` (99,762 rows).

Tasks (all binary, AUC then logloss; every row labelled):

- ``income``: total person income above $50K (label column ``50000+.``; 6.2 % positive in the test file).
- ``marital``: marital status is ``Never married`` (43.3 % in the test file).
- ``education``: the paper's "education level is at least college", made exact here (option
  ``education_positive``, default ``associate_or_above``): positive for ``Associates degree-occup /vocational``,
  ``Associates degree-academic program``, ``Bachelors degree(BA AB BS)``, ``Masters degree(MA MS MEng MEd MSW
  MBA)``, ``Prof school degree (MD DDS DVM LLB JD)``, ``Doctorate degree(PhD EdD)``; ``Some college but no degree``
  and everything below (``Children`` included) are negative. ``bachelors_or_above`` keeps only the last four;
  ``some_college_or_above`` adds ``Some college but no degree``.

The paper's task groups are task lists: group 1 is ``--tasks income,marital`` (income main, marital auxiliary),
group 2 is ``--tasks education,marital`` (``PAPER_TASK_GROUPS``). Task ``group`` hints (HoME's default grouping):
``income`` and ``education`` -> ``socioeconomic``, ``marital`` -> ``household`` (an assumption; the paper has none).

Features: the three label sources (``income``, ``marital_stat``, ``education``) and the ``instance_weight`` (a
survey sampling weight; the .names file says not to use it in classifiers) are never features. Of the remaining 38
columns, the 7 continuous ones (age, wage per hour, capital gains, capital losses, dividends from stocks, number of
persons worked for employer, weeks worked in year, as typed in the .names file) are dense features standardised
with the training split's mean and standard deviation; the 31 others are categorical fields whose vocabulary is
built on the training split only (sorted values get ids 1..K; a value unseen in training gets the OOV id 0; ``?``
and ``Not in universe`` are ordinary values). As in the paper, other columns stay even though they correlate with
a label (``detailed_household_and_family_stat`` says "never marr", ``tax_filer_stat`` says "Joint"), which is why
marital AUCs are ~0.99; ``drop_columns`` removes more columns for a stricter setting.

Modes (option ``mode``; explicit, never inferred from which files exist, so a run id always names one dataset):

- ``test_only`` (default: the train file is often unavailable, e.g. offline CI): only the test file, split 50/25/25
  into train/val/test (49,881 / 24,940 / 24,941 rows) by a fixed permutation from ``split_seed``.
- ``full`` (the paper's protocol): train = the train file; the test file is split 1:1 at random into validation and
  test (49,881 each), again by a fixed permutation from ``split_seed``.

The split never depends on the run seed, so every run shares it. ``max_rows`` (default: all) keeps a fixed seeded
subset of each file before splitting, for quick runs and tests.

Files: ``<data_dir>/census_income/census-income.test.gz`` (sha256 pinned: the gzip file from SHA256SUMS, or the
sha256 of its decompressed content, so an identical re-compressed copy is accepted) and, in ``full`` mode,
``<data_dir>/census_income/census-income.data.gz``. Missing files are downloaded from the UCI archive into the cache
(see ``mtlbench.tasks.helpers``). **The train file is not pinned by hash** (no published hash was found and no copy was
available to hash); it is checked by its layout (42 fields, known label and category values) and its row count
(199,523) instead, and the record stores its sha256.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mtlbench import (DatasetAdapter, FeatureSchema, MtlbenchError, MultiTaskData, TaskSpec, option_field,
                      register_dataset)
from mtlbench.data import CategoricalField
from mtlbench.tasks import helpers as F

NAME = "census"
UCI_BASE = "https://archive.ics.uci.edu/ml/machine-learning-databases/census-income-mld/"
TEST_FILE = F.SourceFile(
    "census_income/census-income.test.gz",
    sha256="5ac4cacd3ca9f1ecb10de1a0a41e4ac68fdc419e3fec190f5c0c6cc03b2ea659",
    content_sha256="98402b1ab879573d0a7f38a699a40258080e25e33d3401e7bf9c96d3fa0fab8c",
    url=UCI_BASE + "census-income.test.gz")
TRAIN_FILE = F.SourceFile("census_income/census-income.data.gz", sha256=None, url=UCI_BASE + "census-income.data.gz")
ROWS = {TEST_FILE.relpath: 99_762, TRAIN_FILE.relpath: 199_523}

COLUMNS = (
    "age", "class_of_worker", "detailed_industry_recode", "detailed_occupation_recode", "education",
    "wage_per_hour", "enroll_in_edu_inst_last_wk", "marital_stat", "major_industry_code", "major_occupation_code",
    "race", "hispanic_origin", "sex", "member_of_a_labor_union", "reason_for_unemployment",
    "full_or_part_time_employment_stat", "capital_gains", "capital_losses", "dividends_from_stocks",
    "tax_filer_stat", "region_of_previous_residence", "state_of_previous_residence",
    "detailed_household_and_family_stat", "detailed_household_summary_in_household", "instance_weight",
    "migration_code_change_in_msa", "migration_code_change_in_reg", "migration_code_move_within_reg",
    "live_in_this_house_1_year_ago", "migration_prev_res_in_sunbelt", "num_persons_worked_for_employer",
    "family_members_under_18", "country_of_birth_father", "country_of_birth_mother", "country_of_birth_self",
    "citizenship", "own_business_or_self_employed", "fill_inc_questionnaire_for_veterans_admin",
    "veterans_benefits", "weeks_worked_in_year", "year", "income")
CONTINUOUS = ("age", "wage_per_hour", "capital_gains", "capital_losses", "dividends_from_stocks",
              "num_persons_worked_for_employer", "weeks_worked_in_year")
NOT_FEATURES = ("income", "marital_stat", "education", "instance_weight")
CATEGORICAL = tuple(c for c in COLUMNS if c not in CONTINUOUS and c not in NOT_FEATURES)
FEATURES = tuple(c for c in COLUMNS if c not in NOT_FEATURES)

INCOME_VALUES = {"- 50000.": 0, "50000+.": 1}
MARITAL_VALUES = ("Never married", "Married-civilian spouse present", "Married-spouse absent", "Separated",
                  "Divorced", "Widowed", "Married-A F spouse present")
EDUCATION_VALUES = (
    "Children", "Less than 1st grade", "1st 2nd 3rd or 4th grade", "5th or 6th grade", "7th and 8th grade",
    "9th grade", "10th grade", "11th grade", "12th grade no diploma", "High school graduate",
    "Some college but no degree", "Associates degree-occup /vocational", "Associates degree-academic program",
    "Bachelors degree(BA AB BS)", "Masters degree(MA MS MEng MEd MSW MBA)", "Prof school degree (MD DDS DVM LLB JD)",
    "Doctorate degree(PhD EdD)")
EDUCATION_POSITIVE = {
    "associate_or_above": EDUCATION_VALUES[11:],
    "bachelors_or_above": EDUCATION_VALUES[13:],
    "some_college_or_above": EDUCATION_VALUES[10:],
}
PAPER_TASK_GROUPS = {"group1": ("income", "marital"), "group2": ("education", "marital")}
MODES = ("test_only", "full")

TASKS = (
    TaskSpec("income", "binary", ("auc", "logloss"), group="socioeconomic",
             description="total person income > $50K"),
    TaskSpec("marital", "binary", ("auc", "logloss"), group="household",
             description="marital status 'Never married'"),
    TaskSpec("education", "binary", ("auc", "logloss"), group="socioeconomic",
             description="education at least an associate degree (option education_positive)"),
)


def _read(path: Path, relpath: str, sha256: str):
    """The file as a pyarrow table with the 42 named columns; a different layout is refused in one line."""
    n_fields = len(F.first_line(path).split(","))
    if n_fields != len(COLUMNS):
        raise MtlbenchError(f"{NAME}: {path} has {n_fields} comma-separated fields per row, expected {len(COLUMNS)} "
                            f"(the UCI census-income layout: 40 attributes, instance weight, income label)")
    from datasets import Features, Value

    numeric = set(CONTINUOUS) | {"instance_weight"}
    features = Features({c: Value("float64" if c in numeric else "string") for c in COLUMNS})
    table = F.read_table(NAME, path, "csv", sha256, column_names=list(COLUMNS), features=features, header=None,
                         skipinitialspace=True, na_filter=False)
    if table.num_rows != ROWS[relpath]:
        raise MtlbenchError(f"{NAME}: {path} has {table.num_rows:,} rows, expected {ROWS[relpath]:,}; it is not the "
                            f"UCI file (replace it; source: {UCI_BASE})")
    for col, valid in (("income", tuple(INCOME_VALUES)), ("marital_stat", MARITAL_VALUES),
                       ("education", EDUCATION_VALUES)):
        values, _ = F.dictionary_codes(table.column(col))
        bad = sorted(str(v) for v in values if v not in valid)
        if bad:
            raise MtlbenchError(f"{NAME}: {path} has unexpected value(s) {', '.join(map(repr, bad[:5]))} in "
                                f"column '{col}' (valid: {', '.join(valid)})")
    return table


def _splits(o: "Census.Options", n_test: int, n_train: int | None) -> dict[str, tuple[str, np.ndarray]]:
    """Split name -> (source file, sorted row indices), all fixed by ``split_seed``."""
    order = F.hash_order(n_test, o.split_seed)
    if o.max_rows is not None:
        order = order[:o.max_rows]
    n = len(order)
    if o.mode == "test_only":
        a, b = n // 2, n // 2 + n // 4
        return {"train": (TEST_FILE.relpath, np.sort(order[:a])), "val": (TEST_FILE.relpath, np.sort(order[a:b])),
                "test": (TEST_FILE.relpath, np.sort(order[b:]))}
    assert n_train is not None
    half = n // 2
    return {"train": (TRAIN_FILE.relpath, F.subsample(n_train, o.max_rows, o.split_seed)),
            "val": (TEST_FILE.relpath, np.sort(order[:half])), "test": (TEST_FILE.relpath, np.sort(order[half:]))}


@register_dataset(NAME)
class Census(DatasetAdapter):
    """UCI Census-Income (KDD), the MMoE paper's benchmark: income, marital (never married), education."""

    version = "1.0"
    tasks = ("income", "marital", "education")
    task_aliases = PAPER_TASK_GROUPS
    default_training = {"epochs": 10, "batch_size": 1024, "lr": 1e-3}

    @dataclass
    class Options:
        mode: Literal["test_only", "full"] = "test_only"
        education_positive: Literal["associate_or_above", "bachelors_or_above",
                                    "some_college_or_above"] = "associate_or_above"
        drop_columns: tuple[str, ...] = ()
        max_rows: int | None = option_field(None, "at most this many rows (none: all)", minimum=1)
        split_seed: int = option_field(2018, "seed of the train/validation split", minimum=0)

        def __post_init__(self) -> None:
            if self.mode not in MODES:
                raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
            if self.education_positive not in EDUCATION_POSITIVE:
                raise ValueError(f"education_positive must be one of {', '.join(EDUCATION_POSITIVE)}; "
                                 f"got {self.education_positive!r}")
            self.drop_columns = tuple(self.drop_columns)
            for c in self.drop_columns:
                if c not in FEATURES:
                    raise ValueError(f"drop_columns: unknown feature column {c!r} (valid: {', '.join(FEATURES)})")
            if set(FEATURES) <= set(self.drop_columns):
                raise ValueError("drop_columns would drop every feature column")
            if self.max_rows is not None and self.max_rows < 1:
                raise ValueError(f"max_rows must be a positive number of rows, got {self.max_rows}")

    def load(self, seed: int) -> MultiTaskData:
        o = self.options or self.Options()
        files = [TEST_FILE] + ([TRAIN_FILE] if o.mode == "full" else [])
        found = F.locate(NAME, files, F.resolve_data_dir(self.data_dir))
        p, _ = F.cached_tensors(NAME, self.version, dataclasses.asdict(o),
                                {f.relpath: found[f.relpath].sha256 for f in files},
                                lambda: self._build(o, files, found))
        splits, schema, info = F.unpack(p)
        return MultiTaskData(NAME, self.version, schema, TASKS, splits, info)

    def _build(self, o: "Census.Options", files: list[F.SourceFile], found: dict[str, F.Located]) -> F.Payload:
        tables = {f.relpath: _read(found[f.relpath].path, f.relpath, found[f.relpath].sha256) for f in files}
        parts = _splits(o, tables[TEST_FILE.relpath].num_rows,
                        tables[TRAIN_FILE.relpath].num_rows if o.mode == "full" else None)
        F.check_nonempty(NAME, {s: len(idx) for s, (_, idx) in parts.items()},
                         f"with max_rows={o.max_rows}" if o.max_rows is not None else "")

        coded: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

        def codes(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
            """(distinct values, code per row of the split) of a string column."""
            rel, idx = parts[split]
            if (rel, name) not in coded:
                coded[(rel, name)] = F.dictionary_codes(tables[rel].column(name))
            values, c = coded[(rel, name)]
            return values, c[idx]

        def is_in(name: str, split: str, positive: tuple[str, ...]) -> np.ndarray:
            values, c = codes(name, split)
            return np.isin(values, positive)[c]

        names = list(parts)  # train first
        cat_fields = [c for c in CATEGORICAL if c not in o.drop_columns]
        dense_cols = [c for c in CONTINUOUS if c not in o.drop_columns]
        cat = {s: np.zeros((len(parts[s][1]), len(cat_fields)), dtype=np.int64) for s in names}
        vocab: list[int] = []
        for j, c in enumerate(cat_fields):
            size, ids = F.encode_categorical([codes(c, s) for s in names])
            vocab.append(size)
            for s, v in zip(names, ids):
                cat[s][:, j] = v
        raw_dense = [np.stack([F.column_numpy(tables[parts[s][0]], c)[parts[s][1]] for c in dense_cols], axis=1)
                     if dense_cols else np.zeros((len(parts[s][1]), 0)) for s in names]
        dense = dict(zip(names, F.standardise(*raw_dense)))
        positive_edu = EDUCATION_POSITIVE[o.education_positive]
        tensors, rates = {}, {}
        for s in names:
            labels = np.stack([is_in("income", s, ("50000+.",)), is_in("marital_stat", s, ("Never married",)),
                               is_in("education", s, positive_edu)], axis=1)
            tensors[s] = F.to_tensors(cat[s], dense[s], labels, np.ones_like(labels, dtype=bool))
            rates[s] = {t.name: float(labels[:, i].mean()) for i, t in enumerate(TASKS)}
        schema = FeatureSchema(categorical=tuple(CategoricalField(c, v) for c, v in zip(cat_fields, vocab)),
                               dense=tuple(dense_cols))
        split_desc = ("test file split 50/25/25 into train/val/test" if o.mode == "test_only"
                      else "train file = train; test file split 1:1 into val/test")
        info: dict[str, Any] = {
            "mode": o.mode, "split": f"{split_desc}, fixed permutation from split_seed {o.split_seed}",
            "positive_rate": rates, "education_positive": list(positive_edu),
            "paper_task_groups": {k: list(v) for k, v in PAPER_TASK_GROUPS.items()},
            "not_features": list(NOT_FEATURES) + list(o.drop_columns),
            "source_files": F.source_info(files, found),
        }
        if o.mode == "full":
            info["train_file_check"] = "not pinned by hash; verified by layout and row count (199,523)"
        return F.payload(tensors, schema, info)
