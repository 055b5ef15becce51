"""Moved to `mtlbench.results.report`; this alias keeps old imports working for one session (remove after it)."""
import sys

from mtlbench.results import report as _moved

sys.modules[__name__] = _moved
