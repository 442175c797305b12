"""Which fused statistics kernel summarizes a device's tensors, and getting it ready without blocking training.

- CPU: agent/stats/cpu_stats.cpp, one read of each tensor for the whole summary row (about 6x faster than the
  dozen passes of the plain-torch path). torch.utils.cpp_extension builds it on first use with the
  machine's C++ compiler and ninja and caches it (build_directory()); concurrent ranks wait for one build
  on a lock the OS releases if its holder dies; later runs import the cached library in milliseconds. The
  first build takes ~10 s, in a background thread: until it is ready the plain-torch path does the work.
- CUDA: agent/stats/triton_stats.py, one Triton launch per dtype over all tensors, where triton imports.

Where a kernel cannot be had (no compiler, no ninja, no triton, `kernels="torch"`), the plain-torch path of
summarize.py serves, and the reason is logged once. `kernels="sync"` builds at watch() and waits, for
benchmarks and tests that must not start on the slow path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
import threading
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: builds of several processes are not serialised there
    fcntl = None

import torch

log = logging.getLogger("gradwatch.agent")

MODES = ("auto", "sync", "torch")
_SOURCE = Path(__file__).with_name("cpu_stats.cpp")
# dtype -> the code cpu_stats.cpp reads (its Dtype enum); other dtypes take the plain-torch path.
CPU_DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


BUILD_WAIT_S = 300.0  # "sync" waits this long for a build (a first build takes ~10 s), then goes on without
_CFLAGS = ["-O3"]


def build_directory(name: str, source: Path) -> Path:
    """Where the kernel is built and cached: one directory per source, flags, torch and Python version,
    under TORCH_EXTENSIONS_DIR when set, else ~/.cache/torch_extensions (cpp_extension's default root)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    digest = hashlib.sha256(source.read_bytes() + repr(_CFLAGS).encode()).hexdigest()[:12]
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.replace('+', '-')}"
    return Path(root) / f"{name}-{digest}-{tag}"


class _CpuKernel:
    """The compiled CPU kernel: built once per process, shared by every Summarizer."""

    def __init__(self, source: Path = _SOURCE, name: str = "gradwatch_cpu_stats"):
        self.source, self.name = source, name
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
        if mode == "sync" and not self._done.wait(BUILD_WAIT_S):
            log.warning("gradwatch: the fused CPU kernel's build is taking over %.0f s; going on with plain "
                        "torch ops until it is ready", BUILD_WAIT_S)
        return self.module

    def _build(self) -> None:
        try:
            from gradwatch.agent.stats.layout import COL_CHECK_HI, COL_CHECK_LO, COL_HIST
            from gradwatch.stats import HIST_BUCKETS, HIST_MIN_EXPONENT

            module = self._load()
            if tuple(module.layout()) != (COL_CHECK_LO, COL_CHECK_HI, COL_HIST, HIST_BUCKETS, HIST_MIN_EXPONENT):
                raise RuntimeError(f"built kernel's row layout {module.layout()} does not match this gradwatch")
            self.module = module
        except Exception as err:  # no compiler, no ninja, a read-only cache: the plain path still works
            lines = str(err).strip().splitlines()
            self.error = f"{type(err).__name__}: {lines[-1] if lines else ''}"
            log.warning("gradwatch: the fused CPU statistics kernel is unavailable (%s); tensors are summarized "
                        "with plain torch ops, about 6x slower. Install a C++ compiler and ninja, or set "
                        "GRADWATCH_KERNELS=torch to silence this.", self.error)
        finally:
            self._done.set()

    def _load(self):
        """Import the cached library, building it first when there is none. Processes (ranks) serialise on
        an flock, which the kernel releases when its holder dies; cpp_extension's own lock file, which a
        process killed mid-build leaves behind and which cpp_extension would wait on forever, is stale
        whenever the flock is ours, and removed."""
        directory = build_directory(self.name, self.source)
        directory.mkdir(parents=True, exist_ok=True)
        library = directory / f"{self.name}{'.pyd' if os.name == 'nt' else '.so'}"
        with open(directory / "gradwatch.lock", "w") as held:
            if fcntl is not None:
                fcntl.flock(held, fcntl.LOCK_EX)
            (directory / "lock").unlink(missing_ok=True)
            if library.exists():
                try:
                    return _import(self.name, library)
                except ImportError:  # a library cut short by a killed build: build it again
                    library.unlink()
            from torch.utils import cpp_extension

            return cpp_extension.load(name=self.name, sources=[str(self.source)], extra_cflags=_CFLAGS,
                                      build_directory=str(directory), verbose=False)


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cpu = _CpuKernel()


def triton_kernel(device: torch.device, histogram: bool, mode: str):
    """A FusedStats for a CUDA device when triton is there (and mode allows), else None."""
    if mode == "torch":
        return None
    try:
        from gradwatch.agent.stats import triton_stats
    except Exception as err:  # a broken triton install must not stop training
        log.warning("gradwatch: the Triton statistics kernel is unavailable (%s); using plain torch ops", err)
        return None
    if not triton_stats.available(device):
        return None
    return triton_stats.FusedStats(device, histogram)
