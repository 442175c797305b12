"""On-device tensor statistics written into one preallocated buffer, without host syncs.

Each watched tensor owns a row of `buffer` (float64, on the model's device):

  nan, inf, zero, sum, sum of squares, min, max, sum of cubes, checksum (two halves), histogram[64]

over its finite values, the checksum over all of its bits (the row layout: agent/stats/layout.py; buckets:
gradwatch.stats). The sum of cubes (skewness) is computed for input rows only (`cubes=True`); every other
row holds 0 there, so parameters and gradients pay no extra pass. Everything here is device work queued on
the training thread's stream; nothing reads a value back to the host. The fused kernels
(agent/stats/kernels.py) do the work where they are ready: on the CPU one compiled pass per tensor, on CUDA
one Triton launch per dtype for a whole `summarize_many`. The plain-torch path below is the fallback and the
reference: a dozen ops per tensor, chunked so temporaries stay bounded.
Rows merge (`accumulate`) the way the aggregator merges summaries: counts and sums add, min/max fold.
"""

from __future__ import annotations

import logging

import torch

from gradwatch.agent.stats import kernels
from gradwatch.agent.stats.layout import (
    COL_MAX,
    COL_MIN,
    NCOLS,
    checksum,
    flat_elements,
    merge,
)
from gradwatch.stats import HIST_BUCKETS, HIST_MIN_EXPONENT

log = logging.getLogger("gradwatch.agent")
_INF = float("inf")
# dtype -> (integer view, exponent shift, exponent mask, exponent bias) of IEEE formats read bit-wise.
# For a normal number, floor(log2|x|) is exactly the biased exponent minus the bias.
_EXPONENT_BITS = {
    torch.float32: (torch.int32, 23, 0xFF, 127),
    torch.bfloat16: (torch.int16, 7, 0xFF, 127),
    torch.float64: (torch.int64, 52, 0x7FF, 1023),
}


class Summarizer:
    """Owns the device buffer: one row per watched tensor."""

    def __init__(self, n_rows: int, device: torch.device, histogram: bool, chunk_elements: int,
                 kernels_mode: str = "auto"):
        self.n_rows = n_rows
        self.device = device
        self.histogram = histogram
        self.chunk_elements = chunk_elements
        self.buffer = torch.zeros(n_rows, NCOLS, dtype=torch.float64, device=device)
        self._maps: dict[torch.dtype, torch.Tensor] = {}
        self._zero = torch.zeros((), dtype=torch.float64, device=device)  # COL_CUBE of rows without cubes
        self._cpu = device.type == "cpu" and kernels_mode != "torch"
        if self._cpu:  # start the build (or wait for it once, "sync"); torch ops until kernels.cpu.module is set
            kernels.cpu.get(kernels_mode)
        self._fused = kernels.triton_kernel(device, histogram, kernels_mode) if device.type != "cpu" else None

    def grow(self, n_rows: int) -> None:
        """Make room for more rows (new tensors seen after watch()), keeping the rows written so far."""
        if n_rows <= self.n_rows:
            return
        buffer = torch.zeros(n_rows, NCOLS, dtype=torch.float64, device=self.device)
        buffer[: self.n_rows].copy_(self.buffer)
        self.buffer, self.n_rows = buffer, n_rows

    def summarize_many(self, rows: list[int], tensors: list[torch.Tensor]) -> None:
        """Queue the statistics of tensors[i] into buffer[rows[i]]: the per-step path for parameters, gradients,
        updates and optimizer state, one fused kernel call for all of them where a kernel is ready."""
        if self._cpu:
            module = kernels.cpu.module  # never waits: the hot path
            if module is not None:
                self._cpu_kernel(module, rows, tensors, False, False)
                return
        elif self._fused is not None:  # CUDA: one Triton launch per dtype, any tensor count
            try:
                self._fused.summarize_many(self.buffer, rows, tensors)
                return
            except Exception as err:  # e.g. a GPU Triton cannot compile for: every row is rewritten below
                log.warning("gradwatch: the Triton statistics kernel failed (%s: %s); plain torch ops from now on",
                            type(err).__name__, err)
                self._fused = None
        for r, t in zip(rows, tensors, strict=True):
            self.summarize(r, t)

    def _cpu_kernel(self, module, rows: list[int], tensors: list[torch.Tensor], accumulate: bool,
                    cubes: bool) -> None:
        """The compiled one-pass kernel for the tensors it reads (floating point, host memory); others take
        the torch path. `flats` holds every tensor the kernel reads until it returns."""
        krows, flats, codes, rest = [], [], [], []
        for r, t in zip(rows, tensors, strict=True):
            flat = flat_elements(t)
            code = kernels.CPU_DTYPES.get(flat.dtype)
            if code is None or flat.device.type != "cpu":
                rest.append((r, flat))
                continue
            krows.append(r)
            flats.append(flat.contiguous())  # a copy only for non-contiguous tensors: rare
            codes.append(code)
        if krows:
            module.summarize_many(self.buffer.data_ptr(), krows, [f.data_ptr() for f in flats],
                                  [f.numel() for f in flats], codes, self.histogram, accumulate, cubes)
        for r, flat in rest:
            self._summarize_torch(r, flat, accumulate, cubes)

    def summarize(self, row: int, tensor: torch.Tensor, accumulate: bool = False, cubes: bool = False) -> None:
        """Queue the statistics of `tensor` into buffer[row] (merged into what is there with `accumulate`),
        with the sum of cubes when `cubes`. A DTensor's are its local shard's (no collective)."""
        if self._cpu:
            module = kernels.cpu.module  # never waits: the hot path
            if module is not None:
                self._cpu_kernel(module, [row], [tensor], accumulate, cubes)
                return
        self._summarize_torch(row, flat_elements(tensor), accumulate, cubes)

    def _summarize_torch(self, row: int, flat: torch.Tensor, accumulate: bool, cubes: bool) -> None:
        n = flat.numel()
        if n == 0:  # an empty shard (more ranks than rows): nothing counted, min/max the empty fold
            if not accumulate:
                self.buffer[row].zero_()
                self.buffer[row, COL_MIN] = _INF
                self.buffer[row, COL_MAX] = -_INF
            return
        if n <= self.chunk_elements:
            result = self._row(flat, cubes)
        else:
            result = merge(torch.stack([self._row(c, cubes) for c in flat.split(self.chunk_elements)]))
        if accumulate:
            self._store(slice(row, row + 1), result, accumulate)
        else:  # the per-step path for every watched tensor: as few Python-level ops as possible
            self.buffer[row].copy_(result, non_blocking=True)

    def summarize_channels(self, whole: int, first: int, x: torch.Tensor, accumulate: bool = False,
                           cubes: bool = False) -> None:
        """Queue the statistics of each channel (dim 1) of the floating-point `x` into
        buffer[first : first + channels], and of all of `x` into buffer[whole], their merge (with the sums
        of cubes when `cubes`).

        One pass whatever the channel count: every statistic is a reduction over the other dims, and the
        exponent histogram counts (channel, exponent) pairs at once. Chunked along dim 0 (the batch).
        """
        x = x.detach()
        per_item = max(x[0].numel(), 1) if x.shape[0] else 1
        chunks = x.split(max(1, self.chunk_elements // per_item))
        rows = self._channel_rows(chunks[0], cubes) if len(chunks) == 1 else merge(
            torch.stack([self._channel_rows(c, cubes) for c in chunks]))
        self._store(slice(first, first + x.shape[1]), rows, accumulate)
        self._store(slice(whole, whole + 1), merge(rows), accumulate)

    def _store(self, rows: slice, result: torch.Tensor, accumulate: bool) -> None:
        target = self.buffer[rows]
        if accumulate:
            result = merge(torch.stack([target, result.reshape(target.shape)]))
        target.copy_(result.reshape(target.shape), non_blocking=True)

    def _row(self, x: torch.Tensor, cubes: bool) -> torch.Tensor:
        # The checksum reads the bits as they are, before half or integers become float32 below.
        sums = checksum(x)
        high = sums >> 32
        spec = _EXPONENT_BITS.get(x.dtype)
        if spec is None:
            x = x.float()  # half (5-bit exponent: denormals matter), integers, fp8: a bounded temporary
            spec = _EXPONENT_BITS[torch.float32]
        view, shift, mask, _ = spec
        n = x.numel()
        # Biased IEEE exponent of every element, straight from the bits: all ones marks NaN/Inf, zero marks
        # zeros and denormals. Its histogram gives the non-finite count and the log2 histogram in one pass.
        exponent = (x.view(view) >> shift) & mask
        counts = self._count(exponent, mask + 1)
        nonfinite = counts[mask]
        nan = torch.count_nonzero(torch.isnan(x))
        clean = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)  # non-finite values count, never sum
        zero = n - nonfinite - torch.count_nonzero(clean)
        cd = clean.double()  # float64 accumulation (docs/architecture.md#summary-statistics)
        head = torch.stack([
            nan, nonfinite - nan, zero, cd.sum(), torch.dot(cd, cd),
            torch.nan_to_num(x, nan=_INF, posinf=_INF, neginf=_INF).amin(),
            torch.nan_to_num(x, nan=-_INF, posinf=-_INF, neginf=-_INF).amax(),
            torch.dot(cd * cd, cd) if cubes else self._zero,
            sums - (high << 32), high,  # the checksum's halves (layout.checksum_halves)
        ]).double()
        if not self.histogram:
            return torch.cat([head, head.new_zeros(HIST_BUCKETS)])
        # Fold exponents into the 64 log2 buckets; the map sends zeros/denormals and NaN/Inf to a discard
        # slot, and denormals (exponent 0 minus true zeros) join the underflow bucket.
        hist = counts.new_zeros(HIST_BUCKETS + 1).index_add_(0, self._bucket_map(x.dtype), counts)[:HIST_BUCKETS]
        hist[0] += counts[0] - zero
        return torch.cat([head, hist.double()])

    def _channel_rows(self, x: torch.Tensor, cubes: bool) -> torch.Tensor:
        """(channels, NCOLS) statistics of x (batch, channels, ...): the row-wise twin of `_row`."""
        spec = _EXPONENT_BITS.get(x.dtype)
        if spec is None:
            x = x.float()
            spec = _EXPONENT_BITS[torch.float32]
        view, shift, mask, _ = spec
        channels = x.shape[1]
        dims = (0, *range(2, x.dim()))
        n = x.numel() // channels
        # Exponent of every element, offset by its channel's block of bins: one histogram for all channels.
        exponent = ((x.view(view) >> shift) & mask).long()
        offsets = torch.arange(channels, device=x.device).mul_(mask + 1).view(1, channels, *([1] * (x.dim() - 2)))
        counts = self._count((exponent + offsets).reshape(-1), channels * (mask + 1)).view(channels, mask + 1)
        nonfinite = counts[:, mask]
        nan = torch.isnan(x).sum(dims)
        clean = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        zero = n - nonfinite - torch.count_nonzero(clean, dim=dims)
        cd = clean.double()
        squares = cd * cd
        head = torch.stack([
            nan, nonfinite - nan, zero, cd.sum(dims), squares.sum(dims),
            torch.nan_to_num(x, nan=_INF, posinf=_INF, neginf=_INF).amin(dims),
            torch.nan_to_num(x, nan=-_INF, posinf=-_INF, neginf=-_INF).amax(dims),
            squares.mul_(cd).sum(dims) if cubes else self._zero.expand(channels),
            self._zero.expand(channels), self._zero.expand(channels),  # no checksums for input channels
        ], dim=1).double()
        if not self.histogram:
            return torch.cat([head, head.new_zeros(channels, HIST_BUCKETS)], dim=1)
        hist = counts.new_zeros(channels, HIST_BUCKETS + 1).index_add_(1, self._bucket_map(x.dtype), counts)
        hist = hist[:, :HIST_BUCKETS]
        hist[:, 0] += counts[:, 0] - zero
        return torch.cat([head, hist.double()], dim=1)

    def _count(self, values: torch.Tensor, bins: int) -> torch.Tensor:
        if values.device.type == "cpu":
            return torch.bincount(values, minlength=bins)  # host memory: nothing to sync with
        # bincount on an accelerator reads the maximum back to size its output: a sync. Fixed-size
        # scatter_add_ is not.
        ones = torch.ones(1, dtype=torch.int64, device=values.device).expand(values.numel())
        return torch.zeros(bins, dtype=torch.int64, device=values.device).scatter_add_(0, values.long(), ones)

    def _bucket_map(self, dtype: torch.dtype) -> torch.Tensor:
        cached = self._maps.get(dtype)
        if cached is None:
            _, _, mask, bias = _EXPONENT_BITS.get(dtype, _EXPONENT_BITS[torch.float32])
            b = torch.arange(mask + 1)
            buckets = (b - bias - HIST_MIN_EXPONENT).clamp(0, HIST_BUCKETS - 1)
            buckets[0] = buckets[mask] = HIST_BUCKETS  # zeros/denormals, NaN/Inf: handled apart
            cached = self._maps[dtype] = buckets.to(self.device)
        return cached

