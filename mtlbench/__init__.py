"""mtlbench: a multi-task learning benchmarking suite.

The public plugin API: built-in methods use exactly these names, and so does a user's plugin file. They are
imported on first use (PEP 562), so that reading results (``mtlbench.results``) never imports torch, and
`import mtlbench.cli` stays light (`--help` and bad flags answer without torch).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "mtlbench.arch": ("ArchOutput", "MultiTaskArch"),
    "mtlbench.data": ("CategoricalField", "DatasetAdapter", "FeatureSchema", "MultiTaskData", "SequenceField",
                      "Split", "TaskSpec"),
    "mtlbench.errors": ("MtlbenchError", "RunFailed"),
    "mtlbench.layers": ("MLP", "ExpertBank", "InputLayer", "mix"),
    "mtlbench.metrics": ("Metric",),
    "mtlbench.optim": ("JacobianMethod", "MTLOptimizer", "StepContext"),
    "mtlbench.registry": ("option_field", "register", "register_arch", "register_dataset", "register_metric",
                          "register_optimizer"),
}
_WHERE = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = [*_WHERE, "__version__"]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'mtlbench' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static checkers and IDEs see the names as before
    from mtlbench.arch import ArchOutput, MultiTaskArch
    from mtlbench.data import (CategoricalField, DatasetAdapter, FeatureSchema, MultiTaskData, SequenceField, Split,
                               TaskSpec)
    from mtlbench.errors import MtlbenchError, RunFailed
    from mtlbench.layers import MLP, ExpertBank, InputLayer, mix
    from mtlbench.metrics import Metric
    from mtlbench.optim import JacobianMethod, MTLOptimizer, StepContext
    from mtlbench.registry import (option_field, register, register_arch, register_dataset, register_metric,
                                   register_optimizer)
