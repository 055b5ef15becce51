"""User-facing errors: each one becomes a single clear line on the command line, never a traceback."""
from __future__ import annotations

import difflib
from typing import Iterable


class MtlbenchError(Exception):
    """A problem with the user's input or environment, stated in one line."""


class RunFailed(MtlbenchError):
    """A run that started but could not finish (non-finite loss, solver failure...); it is recorded as failed."""


def unknown(kind: str, value: object, valid: Iterable[str]) -> MtlbenchError:
    """An error for an unknown name, listing the valid choices and the closest match."""
    choices = sorted(str(v) for v in valid)
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    listed = ", ".join(choices) if choices else "(none)"
    return MtlbenchError(f"unknown {kind} '{value}'{hint} (valid: {listed})")
