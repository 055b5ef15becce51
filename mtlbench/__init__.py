"""mtlbench: a multi-task learning benchmarking suite.

The public plugin API: built-in methods use exactly these names, and so does a user's plugin file.
"""
from mtlbench.arch import ArchOutput, MultiTaskArch
from mtlbench.data import (CategoricalField, DatasetAdapter, FeatureSchema, MultiTaskData, SequenceField, Split,
                           TaskSpec)
from mtlbench.errors import MtlbenchError, RunFailed
from mtlbench.layers import MLP, ExpertBank, InputLayer, mix
from mtlbench.metrics import Metric
from mtlbench.optim import JacobianMethod, MTLOptimizer, StepContext
from mtlbench.registry import (option_field, register, register_arch, register_dataset, register_metric,
                               register_optimizer)

__version__ = "0.1.0"

__all__ = [
    "ArchOutput", "MultiTaskArch", "CategoricalField", "DatasetAdapter", "FeatureSchema", "MultiTaskData",
    "SequenceField", "Split", "TaskSpec", "MtlbenchError", "RunFailed", "MLP", "ExpertBank", "InputLayer", "mix",
    "Metric", "JacobianMethod", "MTLOptimizer", "StepContext", "option_field", "register", "register_arch", "register_dataset",
    "register_metric", "register_optimizer", "__version__",
]
