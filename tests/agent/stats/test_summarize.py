"""The on-device statistics against a float64 numpy reference, and exact merges of shards: the plain-torch
path and the fused CPU kernel (agent/stats/cpu_stats.cpp, compiled here) alike."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from gradwatch.agent.capture.slots import TensorSlot
from gradwatch.agent.export.encode import step_report
from gradwatch.agent.stats import kernels
from gradwatch.agent.stats.layout import COL_CUBE, NCOLS, checksum_of
from gradwatch.agent.stats.summarize import Summarizer
from gradwatch.cli.processes import wait_until
from gradwatch.stats import HIST_BUCKETS, HIST_MIN_EXPONENT, Stats
from gradwatch.v1 import run_pb2


def reference(x: np.ndarray) -> dict:
    x = x.astype(np.float64).ravel()
    finite = np.isfinite(x)
    f = x[finite]
    nz = f[f != 0]
    idx = np.clip(np.floor(np.log2(np.abs(nz))).astype(np.int64) - HIST_MIN_EXPONENT, 0, HIST_BUCKETS - 1)
    return dict(nan=int(np.isnan(x).sum()), inf=int(np.isinf(x).sum()), zero=int((x == 0).sum()), sum=f.sum(),
                sum_squares=(f * f).sum(), min=f.min() if f.size else math.inf, max=f.max() if f.size else -math.inf,
                hist=np.bincount(idx, minlength=HIST_BUCKETS))


def nasty(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 8)  # magnitudes over ~40 octaves
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-42, -3e-45, 3e38, -2e37, 1e-30])
    x[: len(special)] = special
    return x[torch.randperm(n, generator=g)]


@pytest.fixture(scope="module")
def cpu_kernel():
    """The compiled CPU kernel; a skip where it cannot be built (no C++ compiler or ninja), a failure under
    GRADWATCH_REQUIRE_TOOLS=1 (.ci/run installs g++)."""
    module = kernels.cpu.get("sync")
    if module is None:
        message = f"the fused CPU kernel did not build: {kernels.cpu.error}"
        if os.environ.get("GRADWATCH_REQUIRE_TOOLS", "") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return module


@pytest.fixture(params=["torch", "fused"])
def mode(request):
    """Every statistics test runs on both paths: the plain-torch reference and the fused kernel."""
    if request.param == "fused":
        request.getfixturevalue("cpu_kernel")
        return "sync"
    return "torch"


def summarize(tensors, chunk=1 << 22, histogram=True, mode="torch"):
    s = Summarizer(len(tensors), torch.device("cpu"), histogram, chunk, mode)
    for i, t in enumerate(tensors):
        s.summarize(i, t)
    return s.buffer.numpy()


def to_stats(rows, tensors) -> list[Stats]:
    slots = [TensorSlot(i, f"t{i}", 1, "m", 0, tuple(t.shape), "float32", t.numel()) for i, t in enumerate(tensors)]
    report = step_report("r", 0, 0, 1, 0.0, 1, rows, slots, True, {}, [])
    return [Stats.from_proto(s) for s in report.tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1 << 22, 1000])
def test_statistics_match_float64_reference(dtype, chunk, mode):
    x = nasty(10_007, seed=1).to(dtype)
    (stats,) = to_stats(summarize([x], chunk, mode=mode), [x])
    ref = reference(x.double().numpy())
    assert (stats.nan, stats.inf, stats.zero) == (ref["nan"], ref["inf"], ref["zero"])
    assert stats.count == x.numel()
    assert stats.sum == pytest.approx(ref["sum"], rel=1e-9)
    assert stats.sum_squares == pytest.approx(ref["sum_squares"], rel=1e-9)
    assert stats.min == pytest.approx(np.float32(ref["min"]), rel=1e-6)
    assert stats.max == pytest.approx(np.float32(ref["max"]), rel=1e-6)
    np.testing.assert_array_equal(stats.hist, ref["hist"])


def checksum_reference(x: torch.Tensor) -> int:
    """TensorSummary.checksum from numpy's own reading of the bits: each element's pattern as a signed integer
    of its width, summed exactly in Python, modulo 2^64. bfloat16 (which numpy lacks) is the top half of its
    exact float32 widening."""
    if x.dtype == torch.bfloat16:
        bits = (x.float().numpy().view(np.uint32) >> 16).astype(np.uint16).view(np.int16)
    else:
        bits = x.numpy().view({2: np.int16, 4: np.int32, 8: np.int64}[x.element_size()])
    return sum(int(b) for b in bits.ravel()) % 2**64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1 << 22, 1000])
def test_checksum_matches_numpy_bit_patterns(dtype, chunk, mode):
    """NaN, ±Inf, ±0, denormals and huge values all count by their bits; chunks (summed halves) fold back."""
    x = nasty(10_007, seed=11).to(dtype)
    x[:3] = torch.tensor([-0.0, float("nan"), -float("inf")], dtype=dtype)
    rows = summarize([x, x.neg(), torch.empty(0, dtype=dtype)], chunk, mode=mode)
    assert [checksum_of(r) for r in rows] == [checksum_reference(x), checksum_reference(x.neg()), 0]
    slots = [TensorSlot(i, f"t{i}", run_pb2.TENSOR_KIND_GRADIENT, "m", 0, (t.numel(),), "float32", t.numel())
             for i, t in enumerate([x, x.neg()])]
    report = step_report("r", 0, 0, 1, 0.0, 1, rows, slots, True, {}, [])
    assert [s.checksum for s in report.tensors] == [checksum_reference(x), checksum_reference(x.neg())]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_one_sign_flip_changes_the_checksum_not_the_sum_of_squares(dtype, mode):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(4096, generator=g).to(dtype)
    flipped = x.clone()
    flipped[1234] = -flipped[1234]
    a, b = summarize([x, flipped], mode=mode)
    assert checksum_of(a) != checksum_of(b)
    assert (checksum_of(a), checksum_of(b)) == (checksum_reference(x), checksum_reference(flipped))
    (sa, sb) = to_stats(np.stack([a, b]), [x, flipped])
    assert sa.sum_squares == sb.sum_squares  # what RankDivergence compared before checksums


def test_checksum_is_sent_for_parameters_and_gradients_only():
    x = torch.randn(100)
    kinds = [run_pb2.TENSOR_KIND_PARAMETER, run_pb2.TENSOR_KIND_GRADIENT, run_pb2.TENSOR_KIND_ACTIVATION,
             run_pb2.TENSOR_KIND_INPUT, run_pb2.TENSOR_KIND_UPDATE]
    slots = [TensorSlot(i, f"t{i}", kind, "m", 0, (100,), "float32", 100) for i, kind in enumerate(kinds)]
    report = step_report("r", 0, 0, 1, 0.0, 1, summarize([x] * len(kinds)), slots, True, {}, [])
    assert [s.HasField("checksum") for s in report.tensors] == [True, True, False, False, False]


def test_all_nonfinite_and_empty_rows_merge_as_identity(mode):
    x = torch.tensor([float("nan"), float("inf")])
    (stats,) = to_stats(summarize([x], mode=mode), [x])
    assert (stats.nan, stats.inf, stats.finite_count) == (1, 1, 0)
    assert stats.min == math.inf and stats.max == -math.inf
    assert math.isnan(stats.mean)


def test_shards_merge_to_the_statistics_of_the_whole(mode):
    whole = nasty(9_000, seed=2)
    shards = list(whole.split(2_000))  # uneven: 2000, ..., 1000
    merged = Stats()
    for s in to_stats(summarize(shards, mode=mode), shards):
        merged = merged.merge(s)
    (full,) = to_stats(summarize([whole], mode=mode), [whole])
    assert (merged.count, merged.nan, merged.inf, merged.zero) == (full.count, full.nan, full.inf, full.zero)
    assert merged.sum == pytest.approx(full.sum, rel=1e-12)
    assert merged.sum_squares == pytest.approx(full.sum_squares, rel=1e-12)
    assert (merged.min, merged.max) == (full.min, full.max)
    np.testing.assert_array_equal(merged.hist, full.hist)


def test_histogram_can_be_disabled(mode):
    x = torch.randn(100)
    rows = summarize([x], histogram=False, mode=mode)
    assert rows.shape == (1, NCOLS)  # one row per tensor; scalars live in the host slot only
    (stats,) = to_stats(rows, [x])
    assert stats.hist is None and stats.sum_squares > 0


def test_wire_size_per_summary_meets_the_design_target():
    """docs/architecture.md#performance-targets: <= 48 B plain, <= 160 B with histogram per tensor summary."""
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(768, 768, generator=g) * 0.02, torch.randn(768, generator=g) * 1e-3]
    rows = summarize(tensors)
    slots = [TensorSlot(i, f"t{i}", 1, "m", 0, tuple(t.shape), "float32", t.numel()) for i, t in enumerate(tensors)]
    with_hist = step_report("r", 0, 0, 1, 0.0, 1, rows, slots, True, {}, [])
    plain = step_report("r", 0, 0, 1, 0.0, 1, rows, slots, False, {}, [])
    per_hist = max(s.ByteSize() + 2 for s in with_hist.tensors)   # + field tag and length prefix
    per_plain = max(s.ByteSize() + 2 for s in plain.tensors)
    assert per_plain <= 48, per_plain
    assert per_hist <= 160, per_hist


def test_fused_kernel_agrees_with_torch_on_every_path(cpu_kernel):
    """summarize_many (rows out of order, some left alone), accumulate, cubes, non-contiguous, complex and
    empty tensors, and dtypes the kernel does not read (integers), which take the torch path."""
    g = torch.Generator().manual_seed(5)
    tensors = [nasty(5_000, seed=3), torch.randn(64, 33, generator=g).t(),  # non-contiguous
               torch.randn(300, dtype=torch.complex64, generator=g), torch.empty(0),
               nasty(70_000, seed=4).to(torch.bfloat16), torch.randint(-5, 5, (1000,), generator=g),
               nasty(2_000, seed=6).double()]
    rows = [6, 0, 2, 4, 1, 8, 3]
    results = {}
    for mode in ("torch", "sync"):
        s = Summarizer(10, torch.device("cpu"), True, 1 << 22, mode)
        s.buffer[5].fill_(7.0)  # a row nobody writes stays as it was
        s.summarize_many(rows, tensors)
        s.summarize(9, tensors[0], cubes=True)
        s.summarize(9, tensors[1], accumulate=True, cubes=True)
        s.summarize(7, tensors[4])
        s.summarize(7, tensors[6], accumulate=True)
        results[mode] = s.buffer.clone()
    torch.testing.assert_close(results["sync"], results["torch"], rtol=1e-12, atol=0)
    assert torch.equal(results["sync"][5], torch.full((NCOLS,), 7.0, dtype=torch.float64))
    assert results["sync"][9, COL_CUBE] != 0


def test_a_kernel_that_cannot_build_leaves_the_torch_path_and_says_why(tmp_path, monkeypatch, caplog):
    """A real failed build (a source with a syntax error): logged once, no exception, summaries still right."""
    broken = tmp_path / "broken_stats.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    kernel = kernels._CpuKernel(broken, "gradwatch_broken_stats")
    monkeypatch.setattr(kernels, "cpu", kernel)
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        s = Summarizer(1, torch.device("cpu"), True, 1 << 22, "sync")
    assert kernel.module is None and kernel.error
    assert [r for r in caplog.records if "fused CPU statistics kernel is unavailable" in r.getMessage()]
    x = nasty(1_000, seed=7)
    s.summarize_many([0], [x])
    np.testing.assert_array_equal(s.buffer.numpy(), summarize([x]))


def test_a_build_killed_midway_does_not_stall_the_next(tmp_path, monkeypatch):
    """A rank SIGKILLed while compiling leaves cpp_extension's lock file (which it would wait on forever) and
    maybe half a build; the next process builds and loads the kernel all the same."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    directory = kernels.build_directory("gradwatch_cpu_stats", kernels._SOURCE)
    child = subprocess.Popen([sys.executable, "-c", "from gradwatch.agent import kernels; kernels.cpu.get('sync')"],
                             env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    try:
        wait_until(lambda: (directory / "lock").exists() or child.poll() is not None, 60, "the child's build")
        if child.poll() is not None:
            pytest.skip("the child finished before it could be killed mid-build")
        child.kill()
        child.wait(10)
    finally:
        child.kill()
    assert (directory / "lock").exists()  # what cpp_extension would wait on forever
    kernel = kernels._CpuKernel()
    module = kernel.get("sync")
    if module is None and os.environ.get("GRADWATCH_REQUIRE_TOOLS", "") != "1":
        pytest.skip(f"the fused CPU kernel did not build: {kernel.error}")
    assert module is not None, kernel.error
    assert not (directory / "lock").exists()


def test_a_failing_triton_kernel_falls_back_to_torch_ops_for_good(caplog):
    """A GPU the Triton kernel cannot compile for: one warning, this step's rows from torch ops, no retry."""
    class Broken:
        calls = 0

        def summarize_many(self, buffer, rows, tensors):
            Broken.calls += 1
            buffer[rows].fill_(float("nan"))  # half-written rows must not survive
            raise RuntimeError("no kernel for this GPU")

    tensors = [nasty(100, seed=8), nasty(50, seed=9)]
    s = Summarizer(2, torch.device("cpu"), True, 1 << 22, "torch")
    s._fused = Broken()  # the CUDA branch, on the CPU
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        s.summarize_many([0, 1], tensors)
        s.summarize_many([0, 1], tensors)
    np.testing.assert_array_equal(s.buffer.numpy(), summarize(tensors))
    assert Broken.calls == 1 and s._fused is None
    assert len([r for r in caplog.records if "Triton statistics kernel failed" in r.getMessage()]) == 1
