"""Moved to `mtlbench.results.stats`; this alias keeps old imports working for one session (remove after it)."""
import sys

from mtlbench.results import stats as _moved

sys.modules[__name__] = _moved
