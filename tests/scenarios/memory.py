"""The memory bounds of docs/sizing.md#memory-bounds as functions, and the peak resident set of a process read from
/proc, for scenario tests that check a real process stays within its bound.

The coefficients are read from the doc's table, so the bound a test checks is the one the doc states (one home);
the live view's frame limits and the join's open-step cap are read from the code that applies them.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

from gradwatch.aggregator.config import DEFAULT_HISTORY_MEMORY_CELLS
from gradwatch.aggregator.http.live import FRAME_SUMMARY_BUDGET, MAX_FRAMES, MIN_FRAMES
from gradwatch.aggregator.state import history_rows

REPO = Path(__file__).resolve().parents[2]
SIZING = REPO / "docs" / "sizing.md"
MIB = 1 << 20
_UNITS = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": MIB}
# A row of the coefficient table: | `k_c` | 8 | ... or | `B_c` | 72 MiB | ...
_ROW = re.compile(r"^\| `(\w+)` \| ([0-9.]+) ?(B|KiB|MiB)? \|")


def coefficients(path: Path = SIZING) -> dict[str, float]:
    """symbol -> value (bytes where the doc gives a unit) from the table of the doc's "Memory bounds" section."""
    text = path.read_text()
    start = text.index("\n## Memory bounds")
    end = text.find("\n## ", start + 1)
    out = {}
    for line in text[start:end if end > 0 else None].splitlines():
        if match := _ROW.match(line):
            out[match.group(1)] = float(match.group(2)) * _UNITS[match.group(3) or ""]
    missing = {"B_c", "k_c", "m_c", "B_a", "k_b", "k_r", "h", "m_t", "m_rt"} - set(out)
    assert not missing, f"{path}: the Memory bounds table lacks {sorted(missing)}"
    return out


def collector_bound(calls: int, request_bytes: int) -> float:
    """Bytes: a collector holding `calls` Export calls at once, none over `request_bytes` (all admitted)."""
    c = coefficients()
    return c["B_c"] + calls * (c["k_c"] * request_bytes + c["m_c"])


@dataclass(frozen=True)
class RunShape:
    ranks: int
    tensors: int  # per report
    layers: int
    steps: int  # applied so far
    open_steps: int  # the join's open steps at most (the ranks' spread + 1 while every rank reports)
    frame_ranks: int = 1  # ranks whose reports a kept frame holds: 1 when every tensor is replicated (DDP), else ranks


def frames_kept(run: RunShape, runs: int) -> int:
    """Frames of the live view a run keeps (aggregator/http/live.py), not counting the newest one."""
    return min(MAX_FRAMES, max(MIN_FRAMES, FRAME_SUMMARY_BUDGET // runs // run.tensors), run.steps)


def aggregator_bound(runs: list[RunShape], entry_bytes: int, read_count: int, history_reports: int,
                     history_cells: int = DEFAULT_HISTORY_MEMORY_CELLS) -> float:
    """Bytes: one aggregator process holding `runs`, stream entries of at most `entry_bytes`."""
    c = coefficients()
    # a batch: read_count entries shared out among the streams, ceil(read_count / runs) of each (ingest/read.py)
    total = c["B_a"] + c["k_b"] * entry_bytes * -(-read_count // len(runs)) * len(runs)
    for run in runs:
        reports = run.frame_ranks * (frames_kept(run, len(runs)) + 1) + run.ranks * (run.open_steps + 1)
        total += c["k_r"] * entry_bytes * reports + c["h"] * run.layers * min(run.steps, history_rows(
            history_cells, len(runs), run.layers, history_reports))
        total += run.tensors * (c["m_t"] + c["m_rt"] * run.ranks)
    return total


def status_kib(pid: int, field: str) -> int:
    """A field of /proc/<pid>/status in KiB: VmRSS now, VmHWM the peak since the process started."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class RssSampler(threading.Thread):
    """Samples VmRSS of some processes every `interval` s until stopped; `peak()` adds the kernel's own peak (VmHWM,
    which no sample can miss) read at that moment."""

    def __init__(self, pids: dict[str, int], interval: float = 0.1):
        super().__init__(daemon=True, name="rss-sampler")
        self.pids, self.interval = pids, interval
        self.samples: dict[str, list[int]] = {name: [] for name in pids}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            for name, pid in self.pids.items():
                try:
                    self.samples[name].append(status_kib(pid, "VmRSS") * 1024)
                except (OSError, KeyError):
                    pass

    def stop(self) -> None:
        self._done.set()
        self.join(5)

    def peak(self, name: str) -> tuple[int, int]:
        """(highest sampled VmRSS, VmHWM) in bytes; the process must still be running."""
        return max(self.samples[name], default=0), status_kib(self.pids[name], "VmHWM") * 1024
