"""Optional mirrors of a run's metrics to MLflow or TensorBoard (`--log mlflow,tensorboard`).

The JSON record stays the source of truth; a tracker only copies per-epoch curves and final metrics, so a
missing extra or a tracking failure never changes a result. Both packages are imported lazily.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from mtlbench.errors import MtlbenchError

KINDS = ("mlflow", "tensorboard")


def _flat(prefix: str, obj: Any, out: dict[str, float]) -> dict[str, float]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flat(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and obj == obj:
        out[prefix] = float(obj)
    return out


class Trackers:
    """Fans per-epoch entries and the final record out to the requested backends."""

    def __init__(self, kinds: list[str], run_id: str, spec: dict[str, Any], results_dir: str | Path) -> None:
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            from mtlbench.errors import unknown

            raise unknown("tracker", bad[0], KINDS)
        self.backends: list[Any] = []
        for kind in kinds:
            if kind == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as exc:
                    raise MtlbenchError("--log tensorboard needs the tensorboard package: "
                                        "pip install 'mtlbench[tracking]'") from exc
                self.backends.append(("tensorboard", SummaryWriter(log_dir=str(Path(results_dir) / "tensorboard"
                                                                               / run_id))))
            else:
                try:
                    import mlflow
                except ImportError as exc:
                    raise MtlbenchError("--log mlflow needs the mlflow package: pip install 'mtlbench[tracking]'") \
                        from exc
                try:
                    mlflow.start_run(run_name=run_id)
                    mlflow.log_params({k: str(v)[:250] for k, v in spec.items()})
                except Exception as exc:  # e.g. an unreachable or misconfigured tracking server
                    raise MtlbenchError(f"--log mlflow failed to start a run: {' '.join(str(exc).split())[:300]}") \
                        from exc
                self.backends.append(("mlflow", mlflow))

    def log_epoch(self, entry: dict[str, Any]) -> None:
        self._safely(self._log_epoch, entry)

    def finish(self, record: dict[str, Any]) -> None:
        self._safely(self._finish, record)

    def _safely(self, fn, arg) -> None:
        try:
            fn(arg)
        except Exception as exc:  # a mirror must never fail a run; the JSON record is the truth
            warnings.warn(f"tracking failed ({type(exc).__name__}: {exc}); the run record is unaffected",
                          RuntimeWarning, stacklevel=3)

    def _log_epoch(self, entry: dict[str, Any]) -> None:
        step = int(entry["epoch"])
        values = _flat("", {"train_loss": entry.get("train_loss", {}), "val": entry.get("val", {}),
                            "task_weights": entry.get("task_weights", {})}, {})
        for kind, backend in self.backends:
            if kind == "tensorboard":
                for k, v in values.items():
                    backend.add_scalar(k, v, step)
            else:
                backend.log_metrics({k.replace("/", ".") : v for k, v in values.items()}, step=step)

    def _finish(self, record: dict[str, Any]) -> None:
        final = _flat("", {"final": record.get("metrics", {})}, {})
        for kind, backend in self.backends:
            if kind == "tensorboard":
                for k, v in final.items():
                    backend.add_scalar(k, v, int(record.get("selected_epoch") or 0))
                backend.close()
            else:
                backend.log_metrics({k.replace("/", "."): v for k, v in final.items()})
                backend.set_tag("status", record.get("status"))
                backend.end_run(status="FINISHED" if record.get("status") == "ok" else "FAILED")
