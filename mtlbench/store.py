"""Moved to `mtlbench.results.store`; this alias keeps old imports working for one session (remove after it)."""
import sys

from mtlbench.results import store as _moved

sys.modules[__name__] = _moved
