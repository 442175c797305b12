"""The statistics rows of many tensors in a few Triton launches: the fused CUDA path of `Summarizer._row`.

`FusedStats.summarize_many` overwrites rows of the statistics buffer (layout in gradwatch.agent.stats.layout)
with exactly what `Summarizer._row(x, cubes=False)` computes, for any number of tensors at once.

Launches per call: one per element type present (float32, bfloat16, float64; float16 and every other
dtype is read as a float32 copy, as `_row` does), whatever the tensor count. Each launch covers every block
of every tensor of its type: a block table maps a program to (tensor, first element), and the tensors'
base addresses travel as an int64 table that the kernel casts to pointers. A program writes one partial
row (counts, float64 sums, finite min and max, the checksum's two halves, log2 histogram) to a scratch
tensor; then a fixed handful of torch ops fold the partials into rows and write them into the buffer
(index_add_, scatter_reduce_ for min and max, index_copy_; the checksum's halves add over blocks like the
sums, layout.py). The checksum is summed in the same read as everything else (int64 lanes: wrapping adds);
tensors read as a float32 copy (float16, integers) get theirs from their own bits, one torch sum each
(layout.checksum), written over the copy's.

Memory: the scratch rows (576 bytes per block of 16384 elements: under 1% of what is read), float32 copies
of float16 and other tensors, contiguous copies of strided ones (rare), and the small tables.

No host syncs: nothing is read back. The tables are built on the host, pinned and copied with
non_blocking=True (the caching host allocator keeps a pinned block until its copy is done). The layout
tables (sizes, block table, rows) are kept while the tensors' dtypes, sizes and rows repeat; the address
table while the addresses do, so a steady step copies at most that one small table.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gradwatch.agent.stats.layout import (
    COL_CHECK_HI,
    COL_CHECK_LO,
    COL_CUBE,
    COL_HIST,
    COL_INF,
    COL_MAX,
    COL_MIN,
    COL_NAN,
    COL_SUM,
    COL_SUMSQ,
    COL_ZERO,
    NCOLS,
    checksum,
    checksum_halves,
    flat_elements,
)
from gradwatch.stats import HIST_BUCKETS, HIST_MIN_EXPONENT

# A program reads BLOCK elements (64 KiB of float32) in SUB-lane steps. Big enough that its partial row
# and table reads are noise (<1%), small enough that a 1e9-element model is ~61k programs, many waves over
# an H100's 132 SMs; the loop stops at the tensor's end, so a bias costs one short program. SUB over 8
# warps is 4 lanes a thread (one 16-byte float32 load): 76 registers with the histogram (float64: 97;
# ptxas, sm_90), 3 programs per SM. 8 lanes a thread took 130-180 registers and halved the warps in flight.
# Those counts predate the checksum's int64 accumulator (4 lanes a thread: about 8 more registers), not
# measured on a GPU since: above 85 registers a thread, float32 would drop to 2 programs per SM.
BLOCK = 16384
SUB = 1024
NUM_WARPS = 8
# dtype -> (element type, min/max type, integer type of its bits, exponent shift, exponent mask, exponent
# bias), names in triton.language. floor(log2|x|) of a normal x is its biased exponent minus the bias.
_FORMATS = {
    torch.float32: ("float32", "float32", "int32", 23, 0xFF, 127),
    torch.bfloat16: ("bfloat16", "float32", "int16", 7, 0xFF, 127),
    torch.float64: ("float64", "float64", "int64", 52, 0x7FF, 1023),
}
_COLS = (COL_NAN, COL_INF, COL_ZERO, COL_SUM, COL_SUMSQ, COL_MIN, COL_MAX, COL_CUBE, COL_HIST, NCOLS, COL_CHECK_LO,
         COL_CHECK_HI)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@functools.cache
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install (no libcuda, mismatched wheels) is as good as none
        return False
    return True


def available(device: torch.device) -> bool:
    """Whether FusedStats runs for `device`: CUDA with triton, or anywhere under Triton's interpreter."""
    try:
        return _triton_imports() and (torch.device(device).type == "cuda" or _interpreting())
    except Exception:
        return False


# Bound by _kernel(): importing this module imports no triton. The kernel uses triton.language builtins
# only, never its @jit helpers (tl.sum, tl.zeros, ...): those are compiled or interpreted as TRITON_INTERPRET
# stood when triton was first imported (torch.compile imports it), which breaks the interpreter for us.
tl = None
_fold = None


def _fold_fn(s1, q1, lo1, hi1, c1, k1, s2, q2, lo2, hi2, c2, k2):
    return s1 + s2, q1 + q2, tl.minimum(lo1, lo2), tl.maximum(hi1, hi2), c1 + c2, k1 + k2


def _fused_stats(addrs, numels, block_tensor, block_start, partials, block_base,
                 DTYPE: tl.constexpr, EXTREMES: tl.constexpr, BITS: tl.constexpr, SHIFT: tl.constexpr,
                 MASK: tl.constexpr, BIAS: tl.constexpr, HIST: tl.constexpr, BLOCK: tl.constexpr,
                 SUB: tl.constexpr, COLS: tl.constexpr, BUCKETS: tl.constexpr, MIN_EXPONENT: tl.constexpr):
    """The partial row block_base + program id of `partials`: one block of one tensor. COLS: the buffer's
    columns (nan, inf, zero, sum, sum of squares, min, max, cube, histogram), its width, then the columns of
    the checksum's low and high halves."""
    b = block_base + tl.program_id(0)
    t = tl.load(block_tensor + b)
    start = tl.load(block_start + b)
    end = tl.minimum(tl.load(numels + t), start + BLOCK)
    x_ptr = tl.load(addrs + t).to(tl.pointer_type(DTYPE))
    lanes = tl.arange(0, SUB)
    # Registers bound occupancy, hence bytes in flight: a lane's three counts share one int64 (21 bits
    # each, BLOCK < 2**21), and min/max stay in the narrowest exact type (float32 for bfloat16).
    counts = tl.full([SUB], 0, tl.int64)
    total = tl.full([SUB], 0, tl.float64)
    squares = tl.full([SUB], 0, tl.float64)
    lo = tl.full([SUB], float("inf"), EXTREMES)
    hi = tl.full([SUB], float("-inf"), EXTREMES)
    check = tl.full([SUB], 0, tl.int64)  # the checksum: wrapping int64 adds of the sign-extended bits
    hist = tl.full([BUCKETS], 0, tl.int32)
    for i in range(0, (end - start + SUB - 1) // SUB):
        offs = start + i * SUB + lanes
        inside = offs < end
        bits = tl.load(x_ptr + offs, mask=inside, other=0)
        # The biased exponent from the bits, as _row reads it: all ones is NaN/Inf, zero is 0 or denormal.
        ints = bits.to(BITS, bitcast=True)
        exponent = ((ints >> SHIFT) & MASK).to(tl.int32)
        check += ints.to(tl.int64)  # lanes past the end loaded 0: nothing added
        x = bits.to(EXTREMES)  # compared as float32 at least: the interpreter compares bfloat16 bit patterns
        finite = exponent != MASK
        keep = inside & finite
        counts += ((x != x).to(tl.int64) + ((exponent == MASK).to(tl.int64) << 21)
                   + ((inside & (x == 0)).to(tl.int64) << 42))
        v = tl.where(finite, x.to(tl.float64), 0.0)
        total += v
        squares += v * v
        lo = tl.minimum(lo, tl.where(keep, x, float("inf")))
        hi = tl.maximum(hi, tl.where(keep, x, float("-inf")))
        if HIST:
            # Denormals (exponent 0) clamp into the underflow bucket like the tiniest normals. The GPU
            # lowering ignores bin bits above log2(BUCKETS), so every lane is clamped into range and zeros,
            # NaN/Inf and lanes past the end are left out by the mask, never by an out-of-range bin.
            bucket = tl.minimum(tl.maximum(exponent - (BIAS + MIN_EXPONENT), 0), BUCKETS - 1)
            hist += tl.histogram(bucket, BUCKETS, mask=keep & (x != 0))
    total, squares, lo, hi, counts, check = tl.reduce((total, squares, lo, hi, counts, check), 0, _fold)
    nan = counts & 0x1FFFFF
    row = partials + b * COLS[9]
    tl.store(row + COLS[0], nan.to(tl.float64))
    tl.store(row + COLS[1], (((counts >> 21) & 0x1FFFFF) - nan).to(tl.float64))
    tl.store(row + COLS[2], (counts >> 42).to(tl.float64))
    tl.store(row + COLS[3], total)
    tl.store(row + COLS[4], squares)
    tl.store(row + COLS[5], lo.to(tl.float64))
    tl.store(row + COLS[6], hi.to(tl.float64))
    tl.store(row + COLS[7], 0.0)
    tl.store(row + COLS[8] + tl.arange(0, BUCKETS), hist.to(tl.float64))
    high = check >> 32  # arithmetic: the signed high half; the low half in [0, 2^32) without a wide mask constant
    tl.store(row + COLS[10], (check - (high << 32)).to(tl.float64))
    tl.store(row + COLS[11], high.to(tl.float64))


@functools.cache
def _kernel(interpreted: bool):
    """The jitted kernel and its per-dtype arguments, built on first use: triton.jit chooses the interpreter
    from TRITON_INTERPRET when it decorates (the flag keys this cache)."""
    global tl, _fold
    import triton
    import triton.language

    tl = triton.language
    if _fold is None:  # a JITFunction in both modes: compiled kernels need one, the interpreter calls .fn
        _fold = triton.JITFunction(_fold_fn)
    # One binary per (dtype, histogram) whatever the group's first block or the tables' alignment (slices
    # of one upload): a new specialization would compile on the training thread mid-run.
    kernel = triton.jit(_fused_stats, do_not_specialize=["block_base"],
                        do_not_specialize_on_alignment=["addrs", "numels", "block_tensor", "block_start"])
    formats = {dtype: (*(getattr(tl, name) for name in spec[:3]), *spec[3:]) for dtype, spec in _FORMATS.items()}
    return kernel, formats


@dataclass
class _Layout:
    """What depends only on the tensors' dtypes, sizes and rows: kept across calls while those repeat."""

    order: list[int]  # tensors by dtype group: position in the tables -> index in the caller's lists
    groups: list[tuple[torch.dtype, int, int]]  # (dtype, first block, block count), one launch each
    n_blocks: int
    numels: torch.Tensor  # the tables, on the device
    rows: torch.Tensor
    block_tensor: torch.Tensor
    block_start: torch.Tensor
    converted: list[int]  # positions of the tensors read as a float32 copy: their checksums come from torch
    converted_index: torch.Tensor  # the same positions, on the device


class FusedStats:
    """Writes statistics rows for many tensors with one Triton launch per dtype and no host reads."""

    def __init__(self, device: torch.device, histogram: bool, *, block: int = BLOCK, sub: int = SUB):
        """`block` and `sub` (elements per program and per step) are for tests: the interpreter is slow."""
        if sub & (sub - 1) or block % sub or not sub <= block < 1 << 21:
            raise ValueError(f"sub={sub} must be a power of two dividing block={block} < 2**21")
        self.device = torch.device(device)
        self.histogram = histogram
        self.block, self.sub = block, sub
        self._layout_key: tuple | None = None
        self._layout: _Layout | None = None
        self._addrs_key: tuple | None = None
        self._addrs: torch.Tensor | None = None

    def summarize_many(self, buffer: torch.Tensor, rows: Sequence[int], tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite buffer[rows[i]] with the statistics of tensors[i] (flattened), as `_row` computes them."""
        if len(rows) != len(tensors):
            raise ValueError(f"{len(rows)} rows for {len(tensors)} tensors")
        if not tensors:
            return
        if buffer.is_cuda and _interpreting():  # the table's addresses would be read on the host
            raise RuntimeError("Triton's interpreter reads CPU tensors only")
        originals = [flat_elements(t) for t in tensors]
        flats = [_readable(o) for o in originals]
        key = (tuple(rows), tuple((o.dtype, o.numel()) for o in originals))
        if key != self._layout_key:
            self._layout, self._layout_key = self._build_layout(rows, originals, flats), key
            self._addrs_key = None  # the address table follows the layout's order
        layout = self._layout
        addrs_key = tuple(flats[i].data_ptr() for i in layout.order)
        if addrs_key != self._addrs_key:
            self._addrs, self._addrs_key = self._upload(torch.tensor(addrs_key, dtype=torch.int64)), addrs_key

        partials = torch.empty(layout.n_blocks, NCOLS, dtype=torch.float64, device=buffer.device)
        kernel, formats = _kernel(_interpreting())
        scope = torch.cuda.device(buffer.device) if buffer.is_cuda else contextlib.nullcontext()
        with scope:  # triton launches on the current device
            for dtype, first, count in layout.groups:
                kernel[(count,)](self._addrs, layout.numels, layout.block_tensor, layout.block_start, partials,
                                 first, *formats[dtype], HIST=self.histogram, BLOCK=self.block, SUB=self.sub,
                                 COLS=_COLS, BUCKETS=HIST_BUCKETS, MIN_EXPONENT=HIST_MIN_EXPONENT,
                                 num_warps=NUM_WARPS)
        index = layout.block_tensor
        out = torch.zeros(len(flats), NCOLS, dtype=torch.float64, device=buffer.device).index_add_(0, index, partials)
        # Folds that start from the empty fold, so a tensor without blocks (empty) gets +inf / -inf.
        out[:, COL_MIN].fill_(float("inf")).scatter_reduce_(0, index, partials[:, COL_MIN], "amin")
        out[:, COL_MAX].fill_(float("-inf")).scatter_reduce_(0, index, partials[:, COL_MAX], "amax")
        if layout.converted:  # float16, integers: the checksum of their own bits, not of the float32 copy's
            sums = torch.stack([checksum(originals[layout.order[p]]) for p in layout.converted])
            out[:, COL_CHECK_LO: COL_CHECK_HI + 1].index_copy_(0, layout.converted_index, checksum_halves(sums))
        buffer.index_copy_(0, layout.rows, out)

    def _build_layout(self, rows: Sequence[int], originals: list[torch.Tensor], flats: list[torch.Tensor]) -> _Layout:
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, f in enumerate(flats):
            by_dtype.setdefault(f.dtype, []).append(i)
        order = [i for members in by_dtype.values() for i in members]
        sizes = [flats[i].numel() for i in order]
        blocks = [-(-n // self.block) for n in sizes]
        groups, first, seen = [], 0, 0
        for dtype, members in by_dtype.items():
            count = sum(blocks[seen: seen + len(members)])
            if count:
                groups.append((dtype, first, count))
            first, seen = first + count, seen + len(members)
        # Blocks of one tensor are consecutive, in element order (host tensors: nothing to wait for).
        per_tensor = torch.tensor(blocks, dtype=torch.int64)
        block_tensor = torch.repeat_interleave(torch.arange(len(order)), per_tensor)
        first_block = torch.cumsum(per_tensor, 0) - per_tensor
        block_start = (torch.arange(len(block_tensor)) - first_block[block_tensor]) * self.block
        numels = torch.tensor(sizes, dtype=torch.int64)
        converted = [p for p, i in enumerate(order) if originals[i].dtype != flats[i].dtype]
        table = self._upload(torch.cat([numels, torch.tensor([rows[i] for i in order]), block_tensor, block_start,
                                        torch.tensor(converted, dtype=torch.int64)]))
        n, b = len(order), len(block_tensor)
        return _Layout(order, groups, b, table[:n], table[n: 2 * n], table[2 * n: 2 * n + b],
                       table[2 * n + b: 2 * n + 2 * b], converted, table[2 * n + 2 * b:])

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return host  # the interpreter reads CPU tensors
        # Pinned, so the copy is asynchronous: a copy from pageable memory would block the host.
        return host.pin_memory().to(self.device, non_blocking=True)


def _readable(t: torch.Tensor) -> torch.Tensor:
    """A tensor's elements (`t`: flat_elements) as a contiguous tensor of a dtype the kernel reads: a view
    unless a copy is unavoidable."""
    if t.dtype not in _FORMATS:
        t = t.float()  # float16 (its denormals would be ours to find), integers, fp8: as _row does
    return t.contiguous()
