"""Per-task losses and predictions, both honouring label masks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mtlbench.data import TaskSpec


def task_loss(task: TaskSpec, output: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean loss over the rows where the task's label is defined (0 with no gradient if there are none)."""
    m = mask.to(output.dtype)
    if task.kind == "binary":
        per_row = F.binary_cross_entropy_with_logits(output.reshape(-1), labels, reduction="none")
    elif task.kind == "regression":
        per_row = (output.reshape(-1) - labels) ** 2
    else:
        safe = torch.where(mask, labels, torch.zeros_like(labels)).long()
        per_row = F.cross_entropy(output, safe, reduction="none")
    return (per_row * m).sum() / m.sum().clamp(min=1.0)


def predict(task: TaskSpec, output: torch.Tensor) -> torch.Tensor:
    """What the metrics read: probabilities for binary/multiclass tasks, values for regression."""
    if task.kind == "binary":
        return torch.sigmoid(output.reshape(-1))
    if task.kind == "regression":
        return output.reshape(-1)
    return torch.softmax(output, dim=-1)
