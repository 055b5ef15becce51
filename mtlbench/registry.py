"""One registry for datasets, architectures, MTL optimizers, model mergers and metrics.

Built-in methods and a user's plugin register through the same decorators::

    from mtlbench import register_arch

    @register_arch("my_arch")
    class MyArch(MultiTaskArch):
        '''One-line description shown by `mtlbench list`.'''

A registered class may declare its hyper-parameters as a dataclass named ``Options``; the registry validates
user-given options against it (unknown names and wrong types give one clear line) and fills in the defaults,
so the full set of values lands in the run spec.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mtlbench.errors import MtlbenchError, unknown

KINDS = ("dataset", "arch", "optimizer", "metric", "merger")
ENTRY_POINT_GROUP = "mtlbench.plugins"
BUILTIN_MODULES = ("mtlbench.metrics", "mtlbench.tasks", "mtlbench.baselines")


@dataclass
class Entry:
    """A registered component: its kind, name, the object (class or function) and a one-line description."""

    kind: str
    name: str
    obj: Any
    description: str
    module: str
    modality: str = "tabular"  # archs: the data they read; one name may have a tabular and an image variant

    @property
    def builtin(self) -> bool:
        return self.module == "mtlbench" or self.module.startswith("mtlbench.")

    @property
    def options_class(self) -> type | None:
        opts = getattr(self.obj, "Options", None)
        return opts if dataclasses.is_dataclass(opts) else None

    def resolve_options(self, given: dict[str, Any] | None) -> dict[str, Any]:
        """Validate ``given`` against ``Options`` and return every option with defaults filled in."""
        return resolve_options(self.options_class, given or {}, f"{self.kind} '{self.name}'")

    def source_hash(self) -> str | None:
        """A hash of a plugin's code that affects results (None for built-ins): see :func:`code_hash`."""
        if self.builtin:
            return None
        return code_hash(self.obj)


_REGISTRY: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
# arch name -> modality -> entry: `mmoe` on tabular data and `mmoe` on images are two classes under one name;
# _REGISTRY holds the first registered (the tabular one for the built-ins)
_VARIANTS: dict[str, dict[str, Entry]] = {}
_loaded_builtins = False
_loaded_plugins: set[str] = set()


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def code_hash(obj: Any) -> str | None:
    """sha256 of the code that defines ``obj``: its own definition plus, transitively, every top-level
    function, class and assignment of its module that it names, plus the module's imports, each as an AST
    without comments, docstrings or layout. Editing a comment, a docstring or an unrelated function of the
    plugin's file keeps the run ids; editing what the registered object runs changes them. (Code in other
    files the plugin imports is not hashed: name it by a version in the plugin's dataset or options.)
    Where the source cannot be parsed, the whole file's bytes; None where there is no file."""
    try:
        path = inspect.getsourcefile(obj if isinstance(obj, (type, types.FunctionType)) else type(obj))
    except TypeError:
        return None
    if not path or not Path(path).is_file():
        return None
    raw = Path(path).read_bytes()
    name = getattr(obj, "__name__", None) if isinstance(obj, (type, types.FunctionType)) else None
    try:
        tree = ast.parse(raw)
    except SyntaxError:
        return hashlib.sha256(raw).hexdigest()
    top: dict[str, list[ast.stmt]] = {}
    imports: list[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            top.setdefault(node.name, []).append(node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        top.setdefault(n.id, []).append(node)
    if name is None or name not in top:
        return hashlib.sha256(raw).hexdigest()
    seen: list[ast.stmt] = []
    todo = [name]
    done: set[str] = set()
    while todo:
        n = todo.pop()
        if n in done:
            continue
        done.add(n)
        for node in top.get(n, []):
            if node not in seen:
                seen.append(node)
            todo.extend(x.id for x in ast.walk(node) if isinstance(x, ast.Name) and x.id in top)
    seen.sort(key=lambda node: node.lineno)
    parts = [ast.dump(_strip_docstrings(node)) for node in imports + seen]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _first_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def register(kind: str, name: str, description: str | None = None) -> Callable[[Any], Any]:
    """Decorator registering ``obj`` under ``kind``/``name``. Re-registering the same object is a no-op."""
    if kind not in KINDS:
        raise unknown("registry kind", kind, KINDS)

    def deco(obj: Any) -> Any:
        table = _REGISTRY[kind]
        old = table.get(name)
        # the module that registers (not the object's class module: a Metric instance is built anywhere)
        module = sys._getframe(1).f_globals.get("__name__", "") or getattr(obj, "__module__", "")
        modality = str(getattr(obj, "modality", "tabular")) if kind == "arch" else "tabular"
        if kind == "arch" and old is not None and old.obj is not obj:
            variants = _VARIANTS.setdefault(name, {old.modality: old})
            prior = variants.get(modality)
            if prior is None or prior.obj is obj or (isinstance(obj, type) and isinstance(prior.obj, type) and (
                    prior.module, prior.obj.__qualname__) == (module, obj.__qualname__)):
                desc = description or getattr(obj, "description", None) or _first_line(obj)
                variants[modality] = Entry(kind, name, obj, desc, module, modality)
                if (prior is not None and table[name] is prior) or modality == "tabular":
                    table[name] = variants[modality]  # the tabular variant is the primary entry
                try:
                    obj.registered_name = name
                except (AttributeError, TypeError):
                    pass
                return obj
        same_class = (isinstance(obj, type) and isinstance(getattr(old, "obj", None), type)
                      and (old.module, old.obj.__qualname__) == (module, obj.__qualname__))  # a re-imported module
        if old is not None and old.obj is not obj and not same_class:
            raise MtlbenchError(f"{kind} '{name}' is registered twice: by {old.module} and by {module}")
        desc = description or getattr(obj, "description", None) or _first_line(obj)
        table[name] = Entry(kind, name, obj, desc, module, modality)
        if kind == "arch" and name in _VARIANTS:
            _VARIANTS[name][modality] = table[name]
        try:
            obj.registered_name = name
        except (AttributeError, TypeError):
            pass
        return obj

    return deco


def register_dataset(name: str, description: str | None = None):
    return register("dataset", name, description)


def register_arch(name: str, description: str | None = None):
    return register("arch", name, description)


def register_optimizer(name: str, description: str | None = None):
    return register("optimizer", name, description)


def register_metric(name: str, description: str | None = None):
    return register("metric", name, description)


def register_merger(name: str, description: str | None = None):
    """A model-merging method (see :mod:`mtlbench.merging`): acts on a pretrained model and fine-tuned experts."""
    return register("merger", name, description)


def load_builtins() -> None:
    """Import the shipped components; they register themselves exactly as plugins do."""
    global _loaded_builtins
    if _loaded_builtins:
        return
    _loaded_builtins = True
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)
    load_entry_point_plugins()


def load_entry_point_plugins() -> None:
    """Import every module advertised under the ``mtlbench.plugins`` entry-point group."""
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.value in _loaded_plugins:
            continue
        _loaded_plugins.add(ep.value)
        try:
            loaded = ep.load()
            if callable(loaded) and not isinstance(loaded, types.ModuleType):
                loaded()
        except Exception as exc:  # a broken third-party plugin must not take the tool down silently
            raise MtlbenchError(f"plugin entry point '{ep.name}' ({ep.value}) failed to load: "
                                f"{type(exc).__name__}: {exc}") from exc


def load_plugin(target: str) -> None:
    """Import a plugin from a ``.py`` file or an importable module name; its decorators register it."""
    if target in _loaded_plugins:
        return
    path = Path(target)
    try:
        if target.endswith(".py") or path.is_file():
            if not path.is_file():
                raise MtlbenchError(f"plugin file '{target}' does not exist")
            mod_name = "mtlbench_plugin_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
            spec = importlib.util.spec_from_file_location(mod_name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(mod_name, None)
                raise
        else:
            try:
                importlib.import_module(target)
            except ModuleNotFoundError as exc:
                if exc.name and target.startswith(exc.name):
                    raise MtlbenchError(f"plugin '{target}' is neither an existing .py file nor an importable "
                                        f"module") from exc
                raise
    except MtlbenchError:
        raise
    except Exception as exc:
        where = ""
        tb = exc.__traceback__
        while tb is not None:
            if Path(tb.tb_frame.f_code.co_filename).name == path.name:
                where = f" (line {tb.tb_lineno})"
            tb = tb.tb_next
        if isinstance(exc, SyntaxError) and exc.lineno:
            where = f" (line {exc.lineno})"
        detail = " ".join(str(exc).split())
        raise MtlbenchError(f"plugin '{target}' failed to import{where}: {type(exc).__name__}: {detail}") from exc
    _loaded_plugins.add(target)


def get(kind: str, name: str, modality: str | None = None) -> Entry:
    """The entry for ``name``; an unknown name raises one line with the valid names and a suggestion.

    ``modality`` (archs): the variant for that kind of data (``"tabular"``, ``"image"``); an arch that has no
    such variant is one line naming the archs that have."""
    load_builtins()
    table = _REGISTRY[kind]
    if name not in table:
        raise unknown(kind, name, table)
    if modality is None or kind != "arch":
        return table[name]
    found = variants(name).get(modality)
    if found is None:
        have = ", ".join(sorted(variants(name)))
        valid = ", ".join(n for n in sorted(table) if modality in variants(n))
        raise MtlbenchError(f"arch '{name}' works on {have} data only, not on {modality} data "
                            f"(archs for {modality} data: {valid or 'none'})")
    return found


def variants(name: str) -> dict[str, Entry]:
    """The modality variants of arch ``name`` (``{"tabular": ..., "image": ...}``)."""
    load_builtins()
    if name in _VARIANTS:
        return dict(_VARIANTS[name])
    e = _REGISTRY["arch"].get(name)
    return {e.modality: e} if e is not None else {}


def names(kind: str) -> list[str]:
    load_builtins()
    return sorted(_REGISTRY[kind])


def entries(kind: str) -> list[Entry]:
    load_builtins()
    return [_REGISTRY[kind][n] for n in sorted(_REGISTRY[kind])]


# ----------------------------------------------------------------------------------------------- options

def parse_value(text: str) -> Any:
    """Parse a command-line option value: JSON when it parses (numbers, booleans, lists), else the string."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        low = text.lower()
        if low in ("true", "yes", "on"):
            return True
        if low in ("false", "no", "off"):
            return False
        return text


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except MtlbenchError as exc:
                errors.append(str(exc))
        raise MtlbenchError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [parse_value(v) for v in value.split(",") if v != ""] if value else []
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise MtlbenchError(f"{where} must be a list, got {value!r}")
        inner = args[0] if args and args[0] is not Ellipsis else Any
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            inner = args[0]
        out = [_coerce(v, inner, where) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise MtlbenchError(f"{where} must be a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, str):
            value = parse_value(value)
        if not isinstance(value, bool):
            raise MtlbenchError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, str):
            value = parse_value(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise MtlbenchError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            value = parse_value(value)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise MtlbenchError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise MtlbenchError(f"{where} must be a string, got {value!r}")
        return value
    if typing.get_origin(tp) is typing.Literal:
        if value not in args:
            raise MtlbenchError(f"{where} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    return value


def resolve_options(options_class: type | None, given: dict[str, Any], owner: str) -> dict[str, Any]:
    """Check ``given`` against the ``Options`` dataclass, coerce types, fill defaults; JSON-ready result."""
    if options_class is None:
        if given:
            raise MtlbenchError(f"{owner} takes no options; got {', '.join(sorted(given))}")
        return {}
    fields = {f.name: f for f in dataclasses.fields(options_class)}
    for key in given:
        if key not in fields:
            raise unknown(f"option for {owner}", key, fields)
    hints = typing.get_type_hints(options_class)
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name in given:
            values[name] = _coerce(given[name], hints.get(name, Any), f"{owner} option '{name}'")
            rng = f.metadata.get("range")
            if rng is not None:
                rng.check(values[name], f"{owner} option '{name}'")
    try:
        inst = options_class(**values)
    except (ValueError, TypeError) as exc:
        raise MtlbenchError(f"{owner}: {exc}") from exc
    return _jsonable(dataclasses.asdict(inst))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def build_options(options_class: type | None, resolved: dict[str, Any]) -> Any:
    """Instantiate the ``Options`` dataclass from a resolved (JSON) dict, turning lists back into tuples."""
    if options_class is None:
        return None
    hints = typing.get_type_hints(options_class)
    kwargs = {}
    for k, v in resolved.items():
        kwargs[k] = _coerce(v, hints.get(k, Any), k) if isinstance(v, list) else v
    return options_class(**kwargs)


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric option (each element, for a tuple of numbers such as layer widths)."""

    minimum: float | None = None
    maximum: float | None = None
    open_minimum: bool = False
    open_maximum: bool = False

    def text(self) -> str:
        lo = None if self.minimum is None else f"{'>' if self.open_minimum else '>='} {self.minimum:g}"
        hi = None if self.maximum is None else f"{'<' if self.open_maximum else '<='} {self.maximum:g}"
        return " and ".join(x for x in (lo, hi) if x)

    def contains(self, v: float) -> bool:
        if self.minimum is not None and (v < self.minimum or (self.open_minimum and v == self.minimum)):
            return False
        return not (self.maximum is not None and (v > self.maximum or (self.open_maximum and v == self.maximum)))

    def check(self, value: Any, where: str) -> None:
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not self.contains(v):
                which = f"every value must be {self.text()}" if isinstance(value, (list, tuple)) else \
                    f"must be {self.text()}"
                raise MtlbenchError(f"{where} {which}, got {_show(value)}")


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(map(str, value)) + ")"
    return repr(value)


def option_field(default: Any, help: str = "", *, minimum: float | None = None, maximum: float | None = None,
                 open_minimum: bool = False, open_maximum: bool = False) -> Any:
    """A dataclass field with a help text and, for numbers (or tuples of numbers), a valid range; both are
    shown by `mtlbench list --verbose`, and a value out of range is one clear line before anything loads."""
    meta: dict[str, Any] = {"help": help}
    if minimum is not None or maximum is not None:
        meta["range"] = Range(minimum, maximum, open_minimum, open_maximum)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default.copy(), metadata=meta)
    return field(default=default, metadata=meta)


def describe_option(f: dataclasses.Field) -> str:
    """``help (range)`` of an Options field, for `mtlbench list -v`."""
    rng = f.metadata.get("range")
    parts = [f.metadata.get("help", "")] + ([f"({rng.text()})"] if rng else [])
    return " ".join(p for p in parts if p)
