"""One method identity, shared by every command: an architecture with its options crossed with an MTL optimizer
with its options.

Labels show only the options that vary among the runs being shown (``home(expert_norm=false) × ew``), so a table
of default runs reads ``home × ew``. A user names a method as ``ARCH``, ``ARCH:OPTIMIZER`` or with options,
``ARCH(k=v,...):OPTIMIZER(k=v,...)``, or by a full label ``ARCH(...) × OPTIMIZER(...)``; :func:`resolve` maps such
a name to one method of a table the same way for `leaderboard --baseline` and `compare`:

1. a method matches when its arch (and optimizer, if named) is the one named and every option named has the value
   given (options not named may be anything);
2. without an optimizer, the ``ew`` runs are preferred (the plain loss sum, the usual reference);
3. among option variants, the one whose options are the method's defaults is preferred (records store them);
4. what is still ambiguous is refused with one line listing the candidates and how to name each.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from mtlbench.errors import MtlbenchError

SEP = " × "
DEFAULT_OPTIMIZER = "ew"


def canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def fmt_option(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ",".join(fmt_option(x) for x in v) + "]"
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "null"
    return str(v)


@dataclass(frozen=True)
class MethodId:
    """What identifies a method in a table: names and full option values (as canonical JSON, hashable). For a
    merge record (``spec["merger"]``) the second half is ``merge:NAME`` with the merger's options, and ``tag``
    shows the merger's declared data access and task-id need (``[labelled_val, task id]``)."""

    arch: str
    arch_options: str
    optimizer: str
    optimizer_options: str
    tag: str = ""

    @classmethod
    def of_spec(cls, spec: Mapping[str, Any]) -> "MethodId":
        if spec.get("merger"):
            tag = f" [{spec.get('data_access')}" + (", task id" if spec.get("needs_task_id") else "") + "]"
            return cls(spec["arch"], canon(spec.get("arch_options") or {}), f"merge:{spec['merger']}",
                       canon(spec.get("merger_options") or {}), tag)
        return cls(spec["arch"], canon(spec.get("arch_options") or {}), spec["optimizer"],
                   canon(spec.get("optimizer_options") or {}))

    @property
    def arch_opts(self) -> dict[str, Any]:
        return json.loads(self.arch_options)

    @property
    def optimizer_opts(self) -> dict[str, Any]:
        return json.loads(self.optimizer_options)


def labels(methods: Iterable[MethodId]) -> dict[MethodId, str]:
    """A readable, unique label per method: names plus the options that vary among these methods' variants."""
    methods = sorted(set(methods), key=lambda m: (m.arch, m.arch_options, m.optimizer, m.optimizer_options))
    vary_arch = _varying({_variant(m): [] for m in methods}, [(_variant(m), m.arch_opts) for m in methods])
    vary_opt = _varying({m.optimizer: [] for m in methods}, [(m.optimizer, m.optimizer_opts) for m in methods])
    return {m: _part(m.arch, m.arch_opts, vary_arch[_variant(m)]) + SEP
            + _part(m.optimizer, m.optimizer_opts, vary_opt[m.optimizer]) + m.tag for m in methods}


def _variant(m: MethodId) -> tuple[str, str]:
    """One arch name may hold a tabular and an image variant (``shared_bottom``, ``single``, ``mmoe``...) with
    different option sets (image archs have an ``encoder``): a label compares a method's options with those of the
    same variant only, so image runs never relabel the tabular tables."""
    return m.arch, "image" if "encoder" in m.arch_opts else "tabular"


def _varying(groups: dict[Any, list], items: list[tuple[str, dict[str, Any]]]) -> dict[str, set[str]]:
    for name, opts in items:
        groups[name].append(opts)
    out = {}
    for name, options in groups.items():
        keys = set().union(*[o.keys() for o in options]) if options else set()
        out[name] = {k for k in keys if len({canon(o.get(k)) for o in options}) > 1}
    return out


def _part(name: str, options: dict[str, Any], varying: set[str]) -> str:
    shown = [f"{k}={fmt_option(options.get(k))}" for k in sorted(varying)]
    return name + (f"({', '.join(shown)})" if shown else "")


# ------------------------------------------------------------------------------------------------ naming

_PART = re.compile(r"^\s*([A-Za-z0-9_.:\-]+)\s*(?:\((.*)\))?\s*(?:\[[^\]]*\])?\s*$")  # [tag] ignored


def _parse_part(text: str, whole: str) -> tuple[str, dict[str, str]]:
    m = _PART.match(text)
    if not m:
        raise MtlbenchError(f"cannot read method '{whole}': expected ARCH[:OPTIMIZER], options as NAME(k=v,...)")
    opts = {}
    for item in filter(None, (s.strip() for s in _split_top(m.group(2) or ""))):
        key, eq, value = item.partition("=")
        if not eq:
            raise MtlbenchError(f"cannot read option '{item}' of method '{whole}': expected KEY=VALUE")
        opts[key.strip()] = value.strip()
    return m.group(1), opts


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets (list values such as expert_units=[128,64])."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def parse(text: str) -> tuple[str, dict[str, str], str | None, dict[str, str]]:
    """``ARCH[(opts)][:OPT[(opts)]]`` or ``ARCH[(opts)] × OPT[(opts)]`` -> (arch, options, optimizer, options)."""
    if SEP.strip() in text:
        a, _, o = text.partition(SEP.strip())
    else:
        depth, cut = 0, -1
        for i, ch in enumerate(text):
            depth += ch in "(["
            depth -= ch in ")]"
            if ch == ":" and depth == 0:
                cut = i
                break
        a, o = (text, "") if cut < 0 else (text[:cut], text[cut + 1:])
    arch, aopts = _parse_part(a, text)
    if not o.strip():
        return arch, aopts, None, {}
    opt, oopts = _parse_part(o, text)
    return arch, aopts, opt, oopts


def _options_match(given: dict[str, str], actual: dict[str, Any]) -> bool:
    return all(k in actual and fmt_option(actual[k]).replace(" ", "") == v.replace(" ", "")
               for k, v in given.items())


def resolve(text: str, methods: Iterable[MethodId], defaults: Mapping[MethodId, bool] | None = None,
            context: str = "") -> MethodId | None:
    """The one method of ``methods`` that ``text`` names (rules in the module docstring), or None if none does.
    ``defaults[m]`` says whether m runs with its default options (from the records). Ambiguity raises
    MtlbenchError naming the candidates."""
    methods = list(dict.fromkeys(methods))
    arch, aopts, opt, oopts = parse(text)
    found = [m for m in methods if m.arch == arch and _options_match(aopts, m.arch_opts)
             and (opt is None or (m.optimizer == opt and _options_match(oopts, m.optimizer_opts)))]
    if opt is None and any(m.optimizer == DEFAULT_OPTIMIZER for m in found):
        found = [m for m in found if m.optimizer == DEFAULT_OPTIMIZER]
    if len(found) > 1 and defaults:
        at_default = [m for m in found if defaults.get(m)]
        if at_default:
            found = at_default
    if len(found) > 1:
        names = labels(methods)
        listed = "; ".join(_full_name(m, names[m]) for m in found)
        raise MtlbenchError(f"'{text}' names {len(found)} methods{context} ({listed}): name one of them so")
    return found[0] if found else None


def _full_name(m: MethodId, label: str) -> str:
    arch, opt = label.removesuffix(m.tag).split(SEP)
    return f"{arch.replace(', ', ',')}:{opt.replace(', ', ',')}"


def known_names(methods: Iterable[MethodId]) -> list[str]:
    """How a user can name each of ``methods`` (for the 'known:' part of an error)."""
    names = labels(methods)
    return sorted(_full_name(m, lab) for m, lab in names.items())
