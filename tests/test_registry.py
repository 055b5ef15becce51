"""The registry: built-ins, plugin files, duplicate names, one-line errors and command-line value parsing."""
from __future__ import annotations

import dataclasses
import hashlib
import textwrap

import pytest

import mtlbench
from mtlbench import registry
from mtlbench.errors import MtlbenchError
from mtlbench.metrics import Metric

from conftest import check_range_refused


@pytest.fixture(autouse=True)
def restore_registry():
    """The registry is process-global: undo whatever a test registers, so other test files see the built-ins."""
    registry.load_builtins()
    tables = {k: dict(v) for k, v in registry._REGISTRY.items()}
    loaded = set(registry._loaded_plugins)
    yield
    for k, v in registry._REGISTRY.items():
        v.clear()
        v.update(tables[k])
    registry._loaded_plugins.clear()
    registry._loaded_plugins.update(loaded)


def unique(tmp_path, stem: str) -> str:
    return f"{stem}_{''.join(ch if ch.isalnum() else '_' for ch in tmp_path.name)}"


# ----------------------------------------------------------------------------------------------- built-ins

def test_builtin_names():
    assert {"single", "shared_bottom", "mmoe", "home"} <= set(registry.names("arch"))
    assert {"ew", "pcgrad"} <= set(registry.names("optimizer"))
    assert "ecommerce" in registry.names("dataset")
    assert {"auc", "logloss", "accuracy", "rmse", "mae"} <= set(registry.names("metric"))
    for kind in registry.KINDS:
        assert registry.names(kind) == sorted(registry.names(kind))


BUILTINS = [("arch", n) for n in ("single", "shared_bottom", "mmoe", "home")] + \
           [("optimizer", n) for n in ("ew", "pcgrad")] + [("dataset", "ecommerce")] + \
           [("metric", n) for n in ("auc", "logloss", "accuracy", "rmse", "mae")]


@pytest.mark.parametrize("kind,name", BUILTINS)
def test_builtins_registered_through_public_decorators(kind, name):
    e = registry.get(kind, name)
    assert e.kind == kind and e.name == name
    assert e.builtin is True
    assert e.module.startswith("mtlbench.")
    assert e.source_hash() is None
    assert e.description and "\n" not in e.description


def test_every_builtin_entry_is_builtin():
    for kind in registry.KINDS:
        for e in registry.entries(kind):
            if e.module.startswith("mtlbench_plugin_"):
                continue  # plugins loaded by other tests in this process
            assert e.builtin, (kind, e.name, e.module)
            assert e.module.startswith("mtlbench."), (kind, e.name, e.module)


def test_builtin_classes_know_their_registered_name():
    assert registry.get("arch", "mmoe").obj.registered_name == "mmoe"
    assert registry.get("optimizer", "pcgrad").obj.registered_name == "pcgrad"


def test_get_unknown_name_is_one_line_with_choices():
    with pytest.raises(MtlbenchError) as info:
        registry.get("optimizer", "pcgard")
    msg = str(info.value)
    assert "\n" not in msg and "pcgard" in msg and "did you mean 'pcgrad'" in msg and "ew" in msg


def test_unknown_kind_is_rejected():
    with pytest.raises(MtlbenchError):
        registry.register("loss", "x")


# --------------------------------------------------------------------------------------------------- plugins

PLUGIN = '''\
from mtlbench import register_optimizer, MTLOptimizer

SCALE = 1.0  # used by the registered class


def helper():  # not used by it
    return 0


@register_optimizer("{name}")
class MyWeighting(MTLOptimizer):
    """A test plugin: equal weights, {variant}."""

    variant = "{variant}"

    def step(self, ctx):
        ctx.backward()  # a comment
        self.scale = SCALE
'''


def test_plugin_file_registers_an_optimizer(tmp_path):
    name = unique(tmp_path, "plugopt")
    path = tmp_path / "my_plugin.py"
    path.write_text(PLUGIN.format(name=name, variant="first"))
    assert name not in registry.names("optimizer")
    registry.load_plugin(str(path))
    assert name in registry.names("optimizer")
    e = registry.get("optimizer", name)
    assert e.builtin is False
    assert e.description == "A test plugin: equal weights, first."
    assert issubclass(e.obj, mtlbench.MTLOptimizer)
    h1 = e.source_hash()
    assert h1 is not None and len(h1) == 64
    # loading the same target again is a no-op, not a duplicate registration
    registry.load_plugin(str(path))
    assert registry.get("optimizer", name) is e
    # an edit of what the registered class runs changes the hash, so runs using it get new ids
    path.write_text(PLUGIN.format(name=name, variant="second"))
    h2 = e.source_hash()
    assert h2 is not None and h2 != h1


@pytest.mark.parametrize("edit,changes", [
    (lambda t: t.replace("# a comment", "# another comment"), False),
    (lambda t: t.replace("equal weights,", "equal weights (docstring edited),"), False),
    (lambda t: t.replace("    return 0", "    return 1"), False),  # a function the class does not use
    (lambda t: t + "\n\n# a trailing comment\n", False),
    (lambda t: t.replace("SCALE = 1.0", "SCALE = 2.0"), True),  # a module constant the class uses
    (lambda t: t.replace("ctx.backward()", "ctx.backward(); ctx.backward()"), True),
    (lambda t: t.replace("from mtlbench import", "import math\nfrom mtlbench import"), True),  # the imports
], ids=["comment", "docstring", "unused-function", "trailing-comment", "used-constant", "code", "imports"])
def test_plugin_code_hash_follows_what_affects_results(tmp_path, edit, changes):
    """Issue 16: editing only a comment in a plugin file must not change run ids; editing its code must."""
    name = unique(tmp_path, "plughash")
    path = tmp_path / "hash_plugin.py"
    text = PLUGIN.format(name=name, variant="v")
    path.write_text(text)
    registry.load_plugin(str(path))
    before = registry.get("optimizer", name).source_hash()
    path.write_text(edit(text))
    assert (registry.get("optimizer", name).source_hash() != before) is changes


def test_plugin_source_hash_enters_the_run_spec(tmp_path):
    from mtlbench.spec import build_spec

    name = unique(tmp_path, "plugspec")
    path = tmp_path / "spec_plugin.py"
    path.write_text(PLUGIN.format(name=name, variant="a"))
    registry.load_plugin(str(path))
    kw = dict(dataset="ecommerce", tasks=["ctr", "cvr"], arch="mmoe", optimizer=name, device="cpu")
    s1 = build_spec(**kw)
    assert s1.plugin_sources == {f"optimizer:{name}": registry.code_hash(registry.get("optimizer", name).obj)}
    path.write_text(PLUGIN.format(name=name, variant="b"))
    assert build_spec(**kw).run_id != s1.run_id


def test_two_plugin_files_get_distinct_hashes(tmp_path):
    a, b = tmp_path / "a" / "plug.py", tmp_path / "b" / "plug.py"
    a.parent.mkdir()
    b.parent.mkdir()
    na, nb = unique(tmp_path, "pa"), unique(tmp_path, "pb")
    a.write_text(PLUGIN.format(name=na, variant="a"))
    b.write_text(PLUGIN.format(name=nb, variant="b"))
    registry.load_plugin(str(a))
    registry.load_plugin(str(b))  # same file name in another folder: a distinct module
    ha, hb = registry.get("optimizer", na).source_hash(), registry.get("optimizer", nb).source_hash()
    assert ha and hb and ha != hb


def _load_error(target: str) -> str:
    with pytest.raises(MtlbenchError) as info:
        registry.load_plugin(target)
    msg = str(info.value)
    assert msg and "\n" not in msg, repr(msg)
    return msg


def test_load_plugin_missing_file(tmp_path):
    path = tmp_path / "nowhere.py"
    msg = _load_error(str(path))
    assert str(path) in msg


def test_load_plugin_syntax_error(tmp_path):
    path = tmp_path / "broken_syntax.py"
    path.write_text("x = 1\n\ndef broken(:\n    pass\n")
    msg = _load_error(str(path))
    assert str(path) in msg
    assert "SyntaxError" in msg
    assert "line 3" in msg
    assert unique(tmp_path, "x") not in registry.names("optimizer")


def test_load_plugin_raising_at_import(tmp_path):
    name = unique(tmp_path, "never")
    path = tmp_path / "raises.py"
    path.write_text(textwrap.dedent(f'''\
        from mtlbench import register_optimizer, MTLOptimizer

        SETTINGS = {{"a": 1}}
        value = SETTINGS["missing"]


        @register_optimizer("{name}")
        class Never(MTLOptimizer):
            pass
        '''))
    msg = _load_error(str(path))
    assert str(path) in msg
    assert "KeyError" in msg
    assert "line 4" in msg
    assert name not in registry.names("optimizer")
    # a failed import is not remembered as loaded: fixing the file and loading again works
    path.write_text(PLUGIN.format(name=name, variant="fixed"))
    registry.load_plugin(str(path))
    assert name in registry.names("optimizer")


def test_load_plugin_raising_inside_a_function_reports_plugin_line(tmp_path):
    path = tmp_path / "raises_in_fn.py"
    path.write_text("def setup():\n    raise RuntimeError('no backend')\n\n\nsetup()\n")
    msg = _load_error(str(path))
    assert str(path) in msg and "RuntimeError" in msg and "no backend" in msg
    assert "line 2" in msg


def test_load_plugin_multiline_exception_still_one_line(tmp_path):
    path = tmp_path / "multiline.py"
    path.write_text("raise ValueError('bad config\\nsee docs')\n")
    msg = _load_error(str(path))
    assert "ValueError" in msg and "line 1" in msg


# -------------------------------------------------------------------------------------------- duplicates

def test_two_objects_under_one_name_raise(tmp_path):
    name = unique(tmp_path, "dup")

    class First(mtlbench.MTLOptimizer):
        pass

    class Second(mtlbench.MTLOptimizer):
        pass

    registry.register_optimizer(name)(First)
    registry.register_optimizer(name)(First)  # the same object again: a no-op
    with pytest.raises(MtlbenchError) as info:
        registry.register_optimizer(name)(Second)
    assert name in str(info.value) and "\n" not in str(info.value)
    assert registry.get("optimizer", name).obj is First
    # the same name in another kind is fine
    registry.register_arch(name)(Second)
    assert registry.get("arch", name).obj is Second


def test_plugin_cannot_take_a_builtin_name(tmp_path):
    path = tmp_path / "steal.py"
    path.write_text(PLUGIN.format(name="pcgrad", variant="stolen"))
    msg = _load_error(str(path))
    assert "pcgrad" in msg
    assert registry.get("optimizer", "pcgrad").builtin


def test_two_metric_instances_under_one_name_raise(tmp_path):
    name = unique(tmp_path, "dupmetric")
    registry.register_metric(name)(Metric(lambda y, p: 0.0, "max", ("binary",)))
    with pytest.raises(MtlbenchError):
        registry.register_metric(name)(Metric(lambda y, p: 1.0, "min", ("binary",)))


def test_plugin_metric_cannot_replace_builtin_auc(tmp_path):
    path = tmp_path / "fake_auc.py"
    path.write_text(textwrap.dedent('''\
        from mtlbench import register_metric
        from mtlbench.metrics import Metric

        register_metric("auc")(Metric(lambda y, p: 1.0, "max", ("binary",), "always perfect"))
        '''))
    original = registry.get("metric", "auc").obj
    with pytest.raises(MtlbenchError):
        registry.load_plugin(str(path))
    assert registry.get("metric", "auc").obj is original


# ---------------------------------------------------------------------------------------------- parse_value

@pytest.mark.parametrize("text,value", [
    ("3", 3), ("-2", -2), ("0.5", 0.5), ("1e-3", 1e-3), ("true", True), ("false", False), ("True", True),
    ("no", False), ("[1,2]", [1, 2]), ("abc", "abc"), ("mean", "mean"), ("null", None), ("", ""),
])
def test_parse_value(text, value):
    out = registry.parse_value(text)
    assert out == value
    assert type(out) is type(value)


def test_entry_point_plugins_are_discovered(tmp_path, monkeypatch):
    """A package advertising a module under the `mtlbench.plugins` entry-point group is imported and registers
    its components (real importlib.metadata discovery of an installed distribution's metadata)."""
    name = unique(tmp_path, "ep_opt")
    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / f"{name}_mod.py").write_text(PLUGIN.format(name=name, variant="ep"))
    dist = pkg / f"{name}_dist-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-dist\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[mtlbench.plugins]\n{name} = {name}_mod\n")
    monkeypatch.syspath_prepend(str(pkg))
    registry.load_entry_point_plugins()
    entry = registry.get("optimizer", name)
    assert not entry.builtin and entry.module == f"{name}_mod"


def _ranged_options():
    out = []
    for kind in ("arch", "optimizer", "dataset"):
        for e in registry.entries(kind):
            variants = registry.variants(e.name).values() if kind == "arch" else [e]
            for v in variants:
                for f in dataclasses.fields(v.options_class) if v.options_class is not None else ():
                    if f.metadata.get("range") is not None:
                        out.append(pytest.param(v, f, id=f"{kind}:{e.name}:{v.modality}:{f.name}"))
    return out


@pytest.mark.parametrize("entry,field", _ranged_options())
def test_every_declared_range_is_enforced_before_anything_loads(entry, field):
    """Issue 15: `-A expert_units=-5`, `-A dropout=1.5`: refused by the options class in one line naming the
    option, the value and the range (no torch message, no failed record)."""
    check_range_refused(entry, field)
