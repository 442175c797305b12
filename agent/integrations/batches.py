"""What the trainer callbacks take from a training batch besides the batch itself: its class labels.

Labels are counted per class (`labels/<class>`, read by ClassImbalance) only when there is one per example: a
1-D integer tensor. Per-token or per-pixel labels (a language model's next tokens, a segmentation mask) are
imbalanced by nature, and counting them would make ClassImbalance fire on every such run; they are still
watched as an input tensor with the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def class_labels(batch: object) -> torch.Tensor | None:
    """The batch's integer class labels, one per example, where they usually are: `batch["labels"]` (or
    `"label"`) of a dict batch, the last element of a tuple or list."""
    candidate = None
    if isinstance(batch, Mapping):
        candidate = batch.get("labels", batch.get("label"))
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        candidate = batch[-1]
    if (isinstance(candidate, torch.Tensor) and candidate.dim() == 1 and not candidate.is_floating_point()
            and not candidate.is_complex() and candidate.dtype != torch.bool):
        return candidate
    return None
