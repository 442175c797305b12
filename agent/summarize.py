"""On-device tensor statistics written into one preallocated buffer, without host syncs.

Each watched tensor owns a row of `buffer` (float64, on the model's device):

  nan, inf, zero, sum, sum of squares, min, max, histogram[64]

over its finite values (see gradwatch.stats). Everything here is device work queued on the training
thread's stream; nothing reads a value back to the host. This is the plain-torch path (CPU, and CUDA
until the fused multi-tensor kernel lands): a few ops per tensor, chunked so temporaries stay bounded.
"""

from __future__ import annotations

import torch

from gradwatch.stats import HIST_BUCKETS, HIST_MIN_EXPONENT

COL_NAN, COL_INF, COL_ZERO, COL_SUM, COL_SUMSQ, COL_MIN, COL_MAX, COL_HIST = range(8)
NCOLS = COL_HIST + HIST_BUCKETS
_INF = float("inf")
_ZERO_BUCKET = -1 - HIST_MIN_EXPONENT  # where frexp puts 0


class Summarizer:
    """Owns the device buffer: `n_rows` tensor rows plus one row of tensor-valued scalars."""

    def __init__(self, n_rows: int, device: torch.device, histogram: bool, chunk_elements: int):
        self.n_rows = n_rows
        self.device = device
        self.histogram = histogram
        self.chunk_elements = chunk_elements
        self.buffer = torch.zeros(n_rows + 1, NCOLS, dtype=torch.float64, device=device)
        self._ones = torch.ones(1, dtype=torch.float64, device=device)

    @property
    def scalar_row(self) -> torch.Tensor:
        return self.buffer[self.n_rows]

    def summarize(self, row: int, tensor: torch.Tensor) -> None:
        """Queue the statistics of `tensor` into buffer[row]."""
        flat = tensor.detach().reshape(-1)  # a view for contiguous tensors; parameters and grads are
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(-1)
        n = flat.numel()
        if n <= self.chunk_elements:
            result = self._row(flat)
        else:
            parts = torch.stack([self._row(c) for c in flat.split(self.chunk_elements)])
            result = parts.sum(0)
            result[COL_MIN] = parts[:, COL_MIN].amin()
            result[COL_MAX] = parts[:, COL_MAX].amax()
        self.buffer[row].copy_(result, non_blocking=True)

    def set_scalar(self, slot: int, value: torch.Tensor) -> None:
        """Queue a tensor-valued scalar (a loss, a capturable learning rate) into the scalar row."""
        self.scalar_row[slot].copy_(value.detach().reshape(()), non_blocking=True)

    def _row(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # half, bfloat16, integers: a bounded temporary (one chunk)
        finite = torch.isfinite(x)
        clean = torch.where(finite, x, 0.0)  # non-finite values are counted, never summed
        nonfinite = x.numel() - finite.sum()
        nan = torch.isnan(x).sum()
        zeros_in_clean = (clean == 0).sum()  # true zeros plus the non-finite values replaced above
        head = torch.stack([
            nan.double(), (nonfinite - nan).double(), (zeros_in_clean - nonfinite).double(),
            clean.sum(dtype=torch.float64),
            torch.linalg.vector_norm(clean, dtype=torch.float64).square(),  # float64 accumulation
            torch.where(finite, x, _INF).amin().double(),
            torch.where(finite, x, -_INF).amax().double(),
        ])
        if not self.histogram:
            return torch.cat([head, head.new_zeros(HIST_BUCKETS)])
        # |x| = m * 2**e with m in [0.5, 1): floor(log2|x|) = e - 1. frexp(0) has e = 0, so zeros (and the
        # replaced non-finite values) all land in _ZERO_BUCKET and are subtracted there. scatter_add_ into
        # a fixed-size buffer needs no host sync (bincount on CUDA would).
        idx = (torch.frexp(clean)[1] - (1 + HIST_MIN_EXPONENT)).clamp_(0, HIST_BUCKETS - 1).long()
        hist = head.new_zeros(HIST_BUCKETS).scatter_add_(0, idx, self._ones.expand(idx.numel()))
        hist[_ZERO_BUCKET] -= zeros_in_clean
        return torch.cat([head, hist])
