"""The methods that ship with mtlbench. Each module registers itself through the public plugin API."""
from mtlbench.baselines import archs, merging, optimizers  # noqa: F401
