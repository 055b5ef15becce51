"""Run records on disk: one JSON file per run, named by the run id, written atomically (temp file + rename)."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from mtlbench.errors import MtlbenchError
from mtlbench.results.record import RECORD_SCHEMA, NewerSchema, RecordError, RunRecord

__all__ = ["RECORD_SCHEMA", "record_path", "ensure_writable", "write_record", "store_run", "load_record",
           "read_record", "finished_record"]


def record_path(results_dir: str | Path, run_id: str) -> Path:
    return Path(results_dir) / f"{run_id}.json"


def ensure_writable(results_dir: str | Path) -> Path:
    """Create the results directory if needed and prove it is writable, before any training starts."""
    d = Path(results_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".probe-", delete=True):
            pass
    except OSError as exc:
        raise MtlbenchError(f"results directory '{d}' is not writable: {exc.strerror or exc}") from exc
    return d


def _clean(obj: Any) -> Any:
    """NaN/inf are not JSON: store them as null (an undefined metric), keeping every other float exact."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_record(path: str | Path, record: dict[str, Any] | RunRecord) -> Path:
    """Write ``record`` to ``path`` atomically: a reader sees the old file, the new file, or none; never half."""
    path = Path(path)
    if isinstance(record, RunRecord):
        record = record.to_dict()
    text = json.dumps(_clean(record), indent=1, sort_keys=False, allow_nan=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide records from the rest of a team on a shared disk
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def store_run(results_dir: str | Path, record: dict[str, Any] | RunRecord) -> Path:
    """Write a run's record under its run id, except that a failure never replaces a finished run.

    Two sweeps over one store (or a ``--force`` rerun that fails) must not turn a good record into a failed
    one: the failure is still reported by whoever ran it, and the finished record stays.
    """
    if isinstance(record, RunRecord):
        record = record.to_dict()
    run_id = record["run_id"]
    if record.get("status") != "ok" and finished_record(results_dir, run_id) is not None:
        return record_path(results_dir, run_id)
    return write_record(record_path(results_dir, run_id), record)


def load_record(path: str | Path) -> RunRecord:
    """The validated record at ``path``; RecordError (one line) if it is unreadable or breaks the schema,
    NewerSchema if a newer mtlbench wrote it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RecordError(f"cannot be read ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise RecordError(f"not valid JSON (truncated?): {exc}") from None
    return RunRecord.from_dict(data)


def read_record(path: str | Path) -> dict[str, Any] | None:
    """The validated record at ``path`` as a dict, or None if it is missing, truncated or not a valid run record
    (a record of a newer schema raises MtlbenchError: it must be neither guessed at nor overwritten)."""
    try:
        return load_record(path).to_dict()
    except NewerSchema as exc:
        raise MtlbenchError(f"{path}: {exc}") from None
    except RecordError:
        return None


def finished_record(results_dir: str | Path, run_id: str) -> tuple[Path, dict[str, Any]] | None:
    """The stored record of a run that finished successfully, if any (failed runs are retried)."""
    path = record_path(results_dir, run_id)
    if not path.exists():
        return None
    rec = read_record(path)
    if rec is not None and rec.get("status") == "ok" and rec.get("run_id") == run_id:
        return path, rec
    return None
