"""Which fused statistics kernel summarizes a device's tensors, and getting it ready without blocking training.

- CPU: agent/cpu_stats.cpp, one read of each tensor for the whole summary row (about 6x faster than the
  dozen passes of the plain-torch path). torch.utils.cpp_extension builds it on first use with the
  machine's C++ compiler and ninja, caches it (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) and
  serialises concurrent builds of several ranks with a lock file; later runs load it in milliseconds. The
  first build takes ~10 s, in a background thread: until it is ready the plain-torch path does the work.
- CUDA: agent/triton_stats.py, one Triton launch per dtype over all tensors, where triton imports.

Where a kernel cannot be had (no compiler, no ninja, no triton, `kernels="torch"`), the plain-torch path of
summarize.py serves, and the reason is logged once. `kernels="sync"` builds at watch() and waits, for
benchmarks and tests that must not start on the slow path.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

log = logging.getLogger("gradwatch.agent")

MODES = ("auto", "sync", "torch")
_SOURCE = Path(__file__).with_name("cpu_stats.cpp")
# dtype -> the code cpu_stats.cpp reads (its Dtype enum); other dtypes take the plain-torch path.
CPU_DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


class _CpuKernel:
    """The compiled CPU kernel: built once per process, shared by every Summarizer."""

    def __init__(self):
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self.module = None
        self.error: str | None = None

    def get(self, mode: str):
        """The module when ready, else None (the build is started, or waited for with mode "sync")."""
        if self.module is not None or mode == "torch":
            return self.module
        with self._lock:
            if self._thread is None and not self._done.is_set():
                self._thread = threading.Thread(target=self._build, name="gradwatch-kernel-build", daemon=True)
                self._thread.start()
        if mode == "sync":
            self._done.wait()
        return self.module

    def _build(self) -> None:
        try:
            from torch.utils import cpp_extension

            from gradwatch.agent.summarize import COL_HIST
            from gradwatch.stats import HIST_BUCKETS, HIST_MIN_EXPONENT

            module = cpp_extension.load(name="gradwatch_cpu_stats", sources=[str(_SOURCE)],
                                        extra_cflags=["-O3"], verbose=False)
            if tuple(module.layout()) != (COL_HIST, HIST_BUCKETS, HIST_MIN_EXPONENT):
                raise RuntimeError(f"built kernel's row layout {module.layout()} does not match this gradwatch")
            self.module = module
        except Exception as err:  # no compiler, no ninja, a read-only cache: the plain path still works
            self.error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
            log.warning("gradwatch: the fused CPU statistics kernel is unavailable (%s); tensors are summarized "
                        "with plain torch ops, about 6x slower. Install a C++ compiler and ninja, or set "
                        "GRADWATCH_KERNELS=torch to silence this.", self.error)
        finally:
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a started build; True when the kernel is ready."""
        self._done.wait(timeout)
        return self.module is not None


cpu = _CpuKernel()


def triton_kernel(device: torch.device, histogram: bool, mode: str):
    """A FusedStats for a CUDA device when triton is there (and mode allows), else None."""
    if mode == "torch":
        return None
    try:
        from gradwatch.agent import triton_stats
    except Exception as err:  # a broken triton install must not stop training
        log.warning("gradwatch: the Triton statistics kernel is unavailable (%s); using plain torch ops", err)
        return None
    if not triton_stats.available(device):
        return None
    return triton_stats.FusedStats(device, histogram)
