"""The statistics row of one tensor, the contract between the summarizers, the kernels and the encoder:
its columns, the elements it covers, and how rows of parts of one tensor merge.

  nan, inf, zero, sum, sum of squares, min, max, sum of cubes, checksum low, checksum high, histogram[64]

over the finite values (buckets in gradwatch.stats); float64, one row per watched tensor. The checksum
(TensorSummary.checksum) is over every element, NaN and Inf included: the wrapping sum modulo 2^64 of the
elements' bit patterns read as signed integers of the element width, sign-extended. A float64 column holds
53 bits exactly, so it is kept as two integer halves, low in [0, 2^32) and high in [-2^31, 2^31) as one pass
writes them; halves of merged parts (chunks, Triton blocks, accumulated rows) add like the sums, exact below
2^21 parts, and `checksum_of` folds them back modulo 2^64. Compare rows' checksums through it, not bitwise.
"""

from __future__ import annotations

import torch

from gradwatch.agent.capture.distributed import local
from gradwatch.stats import HIST_BUCKETS

(COL_NAN, COL_INF, COL_ZERO, COL_SUM, COL_SUMSQ, COL_MIN, COL_MAX, COL_CUBE, COL_CHECK_LO, COL_CHECK_HI,
 COL_HIST) = range(11)
NCOLS = COL_HIST + HIST_BUCKETS
# element width in bytes -> the signed integer type its bit patterns are read as
_BIT_VIEWS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


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


def checksum(flat: torch.Tensor) -> torch.Tensor:
    """The checksum of `flat` (flat_elements) as a 0-dim int64 on its device, no host read: one integer sum
    over a view of its bits (int64 sums wrap: the modulo 2^64). torch widens narrower bits to int64 first, a
    temporary as long as `flat`: the plain-torch path calls it per chunk."""
    return flat.view(_BIT_VIEWS[flat.element_size()]).sum(dtype=torch.int64)


def checksum_halves(sums: torch.Tensor) -> torch.Tensor:
    """int64 checksums (any shape) as their float64 column pair (..., 2): low 32 bits, then the high ones."""
    high = sums >> 32  # arithmetic: the signed high half
    return torch.stack([sums - (high << 32), high], dim=-1).double()


def checksum_of(row) -> int:
    """The checksum in a host row (numpy or a sequence), as the unsigned 64-bit TensorSummary.checksum."""
    return ((int(row[COL_CHECK_HI]) << 32) + int(row[COL_CHECK_LO])) & 0xFFFFFFFFFFFFFFFF
