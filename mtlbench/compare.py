"""Moved to `mtlbench.results.compare`; this alias keeps old imports working for one session (remove after it)."""
import sys

from mtlbench.results import compare as _moved

sys.modules[__name__] = _moved
