"""mtlbench: a multi-task learning benchmarking suite.

The public plugin API: built-in methods use exactly these names, and so does a user's plugin file. They are
imported on first use (PEP 562), so `import mtlbench.cli` stays light: the command line answers `--help` and
bad flags without importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_WHERE = {
    "ArchOutput": "mtlbench.arch", "MultiTaskArch": "mtlbench.arch",
    "CategoricalField": "mtlbench.data", "DatasetAdapter": "mtlbench.data", "FeatureSchema": "mtlbench.data",
    "MultiTaskData": "mtlbench.data", "SequenceField": "mtlbench.data", "Split": "mtlbench.data",
    "TaskSpec": "mtlbench.data",
    "MtlbenchError": "mtlbench.errors", "RunFailed": "mtlbench.errors",
    "MLP": "mtlbench.layers", "ExpertBank": "mtlbench.layers", "InputLayer": "mtlbench.layers",
    "mix": "mtlbench.layers",
    "JacobianMethod": "mtlbench.optim", "MTLOptimizer": "mtlbench.optim", "StepContext": "mtlbench.optim",
    "option_field": "mtlbench.registry", "register": "mtlbench.registry", "register_arch": "mtlbench.registry",
    "register_dataset": "mtlbench.registry", "register_metric": "mtlbench.registry",
    "register_optimizer": "mtlbench.registry",
}

__all__ = [*_WHERE, "__version__"]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'mtlbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
