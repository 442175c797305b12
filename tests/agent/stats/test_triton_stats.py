"""The fused Triton statistics against the plain-torch rows of Summarizer (itself checked against a float64
numpy reference in test_summarize.py): under Triton's interpreter on CPU tensors, and on CUDA when present."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from gradwatch.agent.stats.layout import (
    COL_CHECK_HI,
    COL_CHECK_LO,
    COL_CUBE,
    COL_HIST,
    COL_MAX,
    COL_MIN,
    COL_NAN,
    COL_SUM,
    COL_SUMSQ,
    NCOLS,
    checksum_of,
)
from gradwatch.agent.stats.summarize import Summarizer
from gradwatch.agent.stats.triton_stats import BLOCK, SUB, FusedStats, available

# Squares of 1e300 overflow to inf in the interpreter's numpy as in the plain path: the same row, no news.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
# counts, min, max, cube, histogram; the checksum is exact too, compared folded (its halves add over blocks)
EXACT = [c for c in range(NCOLS) if c not in (COL_SUM, COL_SUMSQ, COL_CHECK_LO, COL_CHECK_HI)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Blocks of SMALL_BLOCK elements in SMALL_SUB-lane steps keep the interpreter quick: its reductions run an
# element at a time in Python. Sizes: several blocks ending mid-block after several steps, exactly one
# block, odd, one, none.
SMALL_BLOCK, SMALL_SUB = 1024, 128
SIZES = [2 * SMALL_BLOCK + 3 * SMALL_SUB + 17, SMALL_BLOCK, 77, 1, 0]
CPU = torch.device("cpu")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def nasty(n: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Magnitudes over ~40 octaves, with NaN, +-Inf, +-0, huge values and denormals of `dtype`."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 8)).double()
    special = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-42, -3e-45, 3e38, -2e37, 1e-30]
    if dtype == torch.float64:
        special += [1e-310, -5e-320, 1e300]
    if dtype == torch.float16:
        special += [1e-6, -3e-7]  # float16 denormals
    x[: min(n, len(special))] = torch.tensor(special[:n], dtype=torch.float64)
    return x[torch.randperm(n, generator=g)].to(dtype)


def plain(tensors, histogram=True) -> torch.Tensor:
    s = Summarizer(len(tensors), CPU, histogram, 1 << 22, kernels_mode="torch")  # the plain-torch path
    for i, t in enumerate(tensors):
        s.summarize(i, t)
    return s.buffer


def small(histogram=True) -> FusedStats:
    return FusedStats(CPU, histogram, block=SMALL_BLOCK, sub=SMALL_SUB)


def fused(tensors, stats: FusedStats) -> torch.Tensor:
    buffer = torch.zeros(len(tensors), NCOLS, dtype=torch.float64, device=stats.device)
    stats.summarize_many(buffer, list(range(len(tensors))), tensors)
    return buffer.cpu()


def assert_rows_match(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got[:, EXACT], want[:, EXACT], rtol=0, atol=0)
    torch.testing.assert_close(got[:, [COL_SUM, COL_SUMSQ]], want[:, [COL_SUM, COL_SUMSQ]], rtol=1e-9, atol=0)
    assert [checksum_of(r) for r in got.numpy()] == [checksum_of(r) for r in want.numpy()]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_match_the_plain_path(interpret, dtype):
    tensors = [nasty(n, seed, dtype) for seed, n in enumerate(SIZES)] + [torch.full((50,), float("nan"), dtype=dtype)]
    got = fused(tensors, small())
    assert_rows_match(got, plain(tensors))
    assert got[:, COL_HIST:].sum() > 0 and (got[:, COL_CUBE] == 0).all()
    assert got[-2, COL_MIN] == float("inf") and got[-2, COL_MAX] == float("-inf")  # the empty tensor
    assert got[-1, COL_NAN] == 50 and got[-1, COL_MIN] == float("inf")  # all NaN


def test_mixed_dtypes_in_one_call_to_rows_out_of_order(interpret):
    tensors = [nasty(n, seed, dtype) for seed, (n, dtype) in enumerate(zip(SIZES[:4] * 2, DTYPES * 2, strict=True))]
    rows = [9, 2, 7, 0, 4, 1, 8, 5]  # rows 3 and 6 are not ours
    buffer = torch.full((10, NCOLS), 7.0, dtype=torch.float64)
    small().summarize_many(buffer, rows, tensors)
    assert_rows_match(buffer[rows], plain(tensors))
    assert (buffer[[3, 6]] == 7.0).all()


def test_without_histogram(interpret):
    tensors = [nasty(n, seed, torch.float32) for seed, n in enumerate(SIZES)]
    got, want = fused(tensors, small(histogram=False)), plain(tensors, histogram=False)
    assert_rows_match(got, want)
    assert (got[:, COL_HIST:] == 0).all()


def test_strided_complex_and_integer_tensors(interpret):
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(64, 300, generator=g).t(), torch.randn(5000, generator=g)[::3],
               torch.randn(200, 3, dtype=torch.complex64, generator=g), torch.arange(-50, 1000)]
    assert_rows_match(fused(tensors, small()), plain(tensors))


def test_production_block_sizes(interpret):
    tensors = [nasty(BLOCK + 3 * SUB + 5, 0, torch.float32), nasty(SUB + 1, 1, torch.bfloat16)]
    assert_rows_match(fused(tensors, FusedStats(CPU, True)), plain(tensors))


def test_repeated_calls_read_new_tensors_and_new_layouts(interpret):
    stats = small()
    buffer = torch.zeros(3, NCOLS, dtype=torch.float64)
    tensors = [nasty(1000, 0, torch.float32), nasty(300, 1, torch.bfloat16)]
    stats.summarize_many(buffer, [0, 1], tensors)
    tensors[0].mul_(-3)  # same addresses, new values
    stats.summarize_many(buffer, [0, 1], tensors)
    assert_rows_match(buffer[:2], plain(tensors))
    tensors = [nasty(1000, 5, torch.float32), nasty(300, 6, torch.bfloat16)]  # same layout, new addresses
    stats.summarize_many(buffer, [0, 1], tensors)
    assert_rows_match(buffer[:2], plain(tensors))
    tensors = [nasty(40, 7, torch.float64), nasty(SMALL_BLOCK + 1, 8, torch.float32), nasty(9, 9, torch.float16)]
    stats.summarize_many(buffer, [2, 0, 1], tensors)
    assert_rows_match(buffer[[2, 0, 1]], plain(tensors))


def test_available(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert available(CPU)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not available(CPU)
    assert available(torch.device("cuda"))  # triton imports here; whether a GPU is present is not its question
    assert not available("no such device")


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", reason="needs CUDA")
def test_cuda_rows_without_host_syncs_in_one_launch_per_dtype():
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device("cuda")
    sizes = [2 * BLOCK + 3 * SUB + 17, BLOCK, 777, 1, 0]
    tensors = [nasty(n, seed, dtype) for seed, (n, dtype) in enumerate(zip(sizes * 4, DTYPES * 5, strict=True))]
    want = plain(tensors)
    assert_rows_match(fused([t.to(cuda) for t in tensors], FusedStats(cuda, True)), want)

    kinds = (torch.float32, torch.bfloat16, torch.float64)
    many = [nasty(seed * 37 % 5000, seed, kinds[seed % 3]).to(cuda) for seed in range(1000)]
    stats, buffer = FusedStats(cuda, True), torch.zeros(1000, NCOLS, dtype=torch.float64, device=cuda)
    rows = list(range(1000))[::-1]
    stats.summarize_many(buffer, rows, many)  # compiles
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda.set_sync_debug_mode("error")
        try:
            stats.summarize_many(buffer, rows, many)  # the cached layout and addresses: no uploads
            stats.summarize_many(buffer, rows[::-1], many)  # a new layout: pinned, asynchronous uploads
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    assert_rows_match(buffer.cpu()[rows[::-1]], plain([t.cpu() for t in many]))
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sum("_fused_stats" in n for n in names) == 2 * 3  # one launch per dtype per call
    assert len(names) < 2 * 20, names  # and a handful of reductions, whatever the tensor count
    assert not [n for n in names if "Pageable" in n]
