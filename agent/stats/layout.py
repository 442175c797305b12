"""The statistics row of one tensor, the contract between the summarizers, the kernels and the encoder:
its columns, the elements it covers, and how rows of parts of one tensor merge.

  nan, inf, zero, sum, sum of squares, min, max, sum of cubes, histogram[64]

over the finite values (buckets in gradwatch.stats); float64, one row per watched tensor.
"""

from __future__ import annotations

import torch

from gradwatch.agent.capture.distributed import local
from gradwatch.stats import HIST_BUCKETS

COL_NAN, COL_INF, COL_ZERO, COL_SUM, COL_SUMSQ, COL_MIN, COL_MAX, COL_CUBE, COL_HIST = range(9)
NCOLS = COL_HIST + HIST_BUCKETS


def flat_elements(tensor: torch.Tensor) -> torch.Tensor:
    """The elements summarized: a DTensor's local shard, complex numbers as (re, im) pairs, flattened (a view
    for the contiguous tensors parameters and gradients are)."""
    flat = local(tensor).detach().reshape(-1)
    return torch.view_as_real(flat).reshape(-1) if flat.is_complex() else flat


def merge(parts: torch.Tensor) -> torch.Tensor:
    """Merge statistics rows along dim 0 (parts of one tensor): counts and sums add, min and max fold."""
    out = parts.sum(0)
    out[..., COL_MIN] = parts[..., COL_MIN].amin(0)
    out[..., COL_MAX] = parts[..., COL_MAX].amax(0)
    return out
