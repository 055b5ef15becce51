"""RunSpec / build_spec: a stable run id, sensitivity to every choice, and one-line errors for bad input."""
from __future__ import annotations

import json
import math

import pytest
import torch

from mtlbench.errors import MtlbenchError
from mtlbench.spec import RunSpec, build_spec

BASE = dict(dataset="ecommerce", tasks=["ctr", "cvr"], arch="mmoe", optimizer="ew", seed=0, epochs=2,
            batch_size=512, lr=0.001, device="cpu")

# Golden run id of BASE. Every stored run record is keyed by this hash: if this assertion fails, every existing
# record (and every resumable sweep) is silently orphaned. Change the literal only on purpose, together with a
# deliberate change of the spec (bump SPEC_VERSION, a changed default...), never to make the test pass.
GOLDEN_RUN_ID = "0eafdc3deae491138810"


def spec(**changes) -> RunSpec:
    return build_spec(**{**BASE, **changes})


def test_golden_run_id():
    assert spec().run_id == GOLDEN_RUN_ID


def test_run_id_shape_and_determinism():
    a, b = spec(), spec()
    assert a == b
    assert a.run_id == b.run_id
    assert len(a.run_id) == 20 and all(ch in "0123456789abcdef" for ch in a.run_id)


@pytest.mark.parametrize("changes", [
    dict(seed=1),
    dict(lr=0.002),
    dict(epochs=3),
    dict(batch_size=256),
    dict(tasks=["cvr", "ctr"]),
    dict(tasks=["ctr", "cvr", "ctcvr"]),
    dict(arch="shared_bottom"),
    dict(arch_options={"n_experts": 4}),
    dict(arch_options={"expert_units": [64, 32]}),
    dict(optimizer="pcgrad"),
    dict(optimizer="pcgrad", optimizer_options={"reduction": "mean"}),
    dict(dataset_options={"n_rows": 100_000}),
    dict(dataset_options={"relatedness": 0.9}),
    dict(weight_decay=0.0),
    dict(patience=5),
    dict(embed_dim=8),
    dict(selection="val_loss"),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_any_change_changes_the_id(changes):
    assert spec(**changes).run_id != GOLDEN_RUN_ID


def test_pcgrad_options_change_id_relative_to_pcgrad():
    assert spec(optimizer="pcgrad").run_id != spec(optimizer="pcgrad",
                                                   optimizer_options={"reduction": "mean"}).run_id


@pytest.mark.parametrize("changes", [
    dict(arch_options={"n_experts": 8}),
    dict(arch_options={"expert_units": [128, 64], "tower_units": (64,), "batch_norm": True}),
    dict(arch_options={"n_experts": "8"}),  # as typed on the command line
    dict(dataset_options={"n_rows": 200_000, "relatedness": 0.5, "data_seed": None}),
    dict(optimizer_options={}),
    dict(weight_decay=1e-6, patience=3, embed_dim=16, selection="mean_primary"),
    dict(lr=1e-3),
    dict(seed=0.0),
])
def test_explicit_defaults_give_the_same_id(changes):
    assert spec(**changes).run_id == GOLDEN_RUN_ID


def test_dataset_training_defaults_are_resolved_before_hashing():
    # ecommerce suggests 5 epochs, batch 1024, lr 2e-3: leaving them out equals passing them
    implicit = build_spec(dataset="ecommerce", tasks=["ctr", "cvr"], arch="mmoe", optimizer="ew", device="cpu")
    explicit = build_spec(dataset="ecommerce", tasks=["ctr", "cvr"], arch="mmoe", optimizer="ew", device="cpu",
                          epochs=5, batch_size=1024, lr=2e-3)
    assert (implicit.epochs, implicit.batch_size, implicit.lr) == (5, 1024, 2e-3)
    assert implicit.run_id == explicit.run_id


def test_tasks_none_means_all_tasks_in_offered_order():
    s = build_spec(dataset="ecommerce", tasks=None, arch="mmoe", optimizer="ew", device="cpu")
    assert s.tasks == ("ctr", "cvr", "ctcvr")
    assert s.run_id == spec(tasks=["ctr", "cvr", "ctcvr"], epochs=5, batch_size=1024, lr=2e-3).run_id


@pytest.mark.skipif(torch.cuda.is_available() or (getattr(torch.backends, "mps", None) is not None
                                                  and torch.backends.mps.is_available()),
                    reason="'auto' resolves to cpu only on a machine without accelerators")
def test_auto_device_resolves_before_hashing():
    assert spec(device="auto").device == "cpu"
    assert spec(device="auto").run_id == GOLDEN_RUN_ID


def test_round_trip_preserves_id():
    for s in (spec(), spec(optimizer="pcgrad", arch_options={"n_experts": 3}, tasks=["ctcvr", "ctr"])):
        d = s.to_dict()
        back = RunSpec.from_dict(d)
        assert back == s
        assert back.run_id == s.run_id
        # through JSON text, as a stored record is read back
        again = RunSpec.from_dict(json.loads(json.dumps(d)))
        assert again.run_id == s.run_id
        assert isinstance(again.tasks, tuple)


def test_from_dict_does_not_mutate_input():
    d = spec().to_dict()
    snapshot = json.dumps(d, sort_keys=True)
    RunSpec.from_dict(d)
    assert json.dumps(d, sort_keys=True) == snapshot


def _assert_sorted_keys(obj):
    if isinstance(obj, dict):
        assert list(obj) == sorted(obj)
        for v in obj.values():
            _assert_sorted_keys(v)
    elif isinstance(obj, list):
        for v in obj:
            _assert_sorted_keys(v)


def test_canonical_json_is_key_sorted_and_compact():
    text = spec().canonical_json()
    parsed = json.loads(text, object_pairs_hook=lambda pairs: dict(pairs))
    _assert_sorted_keys(parsed)
    assert text == json.dumps(parsed, sort_keys=True, separators=(",", ":"))
    assert " " not in text and "\n" not in text
    assert parsed["tasks"] == ["ctr", "cvr"]


# ----------------------------------------------------------------------------------------------- bad input

BAD = [
    # (changes, substrings the one-line message must contain)
    (dict(dataset="ecomerce"), ["ecomerce", "ecommerce"]),
    (dict(arch="mmo"), ["'mmo'", "did you mean", "mmoe", "shared_bottom", "single", "home"]),
    (dict(arch="transformer"), ["transformer", "mmoe", "shared_bottom", "single", "home"]),
    (dict(optimizer="pcgrd"), ["pcgrd", "did you mean", "pcgrad", "ew"]),
    (dict(optimizer="nash"), ["nash", "pcgrad", "ew"]),
    (dict(tasks=["ctx"]), ["ctx", "ctr", "cvr", "ctcvr"]),
    (dict(tasks=["ctr", "ctr"]), ["ctr", "twice"]),
    (dict(tasks=[]), ["empty", "ctr", "cvr", "ctcvr"]),
    (dict(epochs=0), ["epochs", "0"]),
    (dict(batch_size=-1), ["batch size", "-1"]),
    (dict(lr=0), ["learning rate", "0"]),
    (dict(lr=float("nan")), ["learning rate", "nan"]),
    (dict(lr=-0.1), ["learning rate", "-0.1"]),
    (dict(arch_options={"n_exprts": 4}), ["n_exprts", "n_experts", "expert_units", "tower_units"]),
    (dict(arch_options={"n_experts": "many"}), ["n_experts", "many", "integer"]),
    (dict(arch_options={"n_experts": 0}), ["n_experts", "0"]),
    (dict(optimizer_options={"reduction": "mean"}), ["ew", "reduction"]),
    (dict(optimizer="pcgrad", optimizer_options={"reduction": "max"}), ["reduction", "max", "sum", "mean"]),
    (dict(dataset_options={"relatedness": 2.0}), ["relatedness", "2.0"]),
    (dict(selection="best"), ["best", "mean_primary", "val_loss"]),
    (dict(device="tpu"), ["tpu", "cpu", "cuda", "auto"]),
]


@pytest.mark.parametrize("changes,needles", BAD, ids=lambda x: repr(x) if isinstance(x, dict) else "")
def test_bad_input_one_clear_line(changes, needles):
    with pytest.raises(MtlbenchError) as info:
        spec(**changes)
    msg = str(info.value)
    assert msg and "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="cuda is available here")
def test_unavailable_cuda_is_one_clear_line():
    with pytest.raises(MtlbenchError) as info:
        spec(device="cuda")
    msg = str(info.value)
    assert "\n" not in msg and "cuda" in msg and "cpu" in msg


@pytest.mark.parametrize("changes", [
    dict(lr=math.inf),
    dict(weight_decay=math.inf),
    dict(arch_options={"dropout": math.nan}),
    dict(dataset_options={"signal": math.inf}),
], ids=["lr=inf", "weight_decay=inf", "dropout=nan", "signal=inf"])
def test_non_finite_values_are_rejected_up_front(changes):
    try:
        s = spec(**changes)
        s.run_id  # noqa: B018 - what a caller does next with the spec
    except MtlbenchError as exc:
        assert "\n" not in str(exc)
        return
    pytest.fail("non-finite value was accepted")


def test_fractional_counts_are_rejected():
    for key in ("epochs", "batch_size", "patience", "embed_dim", "seed"):
        with pytest.raises(MtlbenchError, match="integer"):
            spec(**{key: 2.5})
