"""Moved to `mtlbench.results.leaderboard`; this alias keeps old imports working for one session (remove after it)."""
import sys

from mtlbench.results import leaderboard as _moved

sys.modules[__name__] = _moved
