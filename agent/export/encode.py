"""Turns a host copy of the statistics buffer into protobuf: the run registration and step reports.

Runs on the agent's reader thread, never on the training thread.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Mapping, Sequence

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from gradwatch import __version__
from gradwatch.agent.capture.slots import TensorSlot
from gradwatch.agent.stats.layout import (
    COL_CUBE,
    COL_HIST,
    COL_INF,
    COL_MAX,
    COL_MIN,
    COL_NAN,
    COL_SUM,
    COL_SUMSQ,
    COL_ZERO,
    checksum_of,
)
from gradwatch.limits import MAX_STRING_BYTES
from gradwatch.names import LOSS
from gradwatch.v1 import report_pb2, run_pb2

# Kinds whose summaries carry the checksum: the replicated ones RankDivergence compares exactly (DDP parameters
# and all-reduced gradients). 9 bytes a summary on the wire; other kinds have no replicas to compare.
CHECKSUM_KINDS = frozenset({run_pb2.TENSOR_KIND_PARAMETER, run_pb2.TENSOR_KIND_GRADIENT})


def _short(value: object) -> str:
    text = str(value)
    return text if len(text.encode()) <= MAX_STRING_BYTES else text.encode()[:MAX_STRING_BYTES].decode(errors="ignore")


def registration(run_id: str, rank: int, world_size: int, slots: Sequence[TensorSlot],
                 hyperparameters: Mapping[str, object] | None, labels: Mapping[str, str] | None,
                 topology: run_pb2.ModelGraph | None, start_time: float) -> run_pb2.RunRegistration:
    reg = run_pb2.RunRegistration(run_id=run_id, rank=rank, world_size=world_size, agent_version=__version__,
                                  host=socket.gethostname())
    reg.start_time.FromNanoseconds(int(start_time * 1e9))
    for key, value in (hyperparameters or {}).items():
        hp = reg.hyperparameters[_short(key)]
        if isinstance(value, bool):
            hp.flag = value
        elif isinstance(value, int):
            hp.integer = value
        elif isinstance(value, float):
            hp.number = value
        else:
            hp.text = _short(value)
    for key, value in (labels or {}).items():
        reg.labels[_short(key)] = _short(value)
    for s in slots:
        reg.tensors.add(id=s.id, name=s.name, kind=s.kind, shape=s.shape, dtype=s.dtype,
                        module_path=s.module_path, order=s.order, partition=s.partition)
    if topology is not None:
        reg.topology.CopyFrom(topology)
    return reg


def step_report(run_id: str, rank: int, step: int, sequence: int, capture_time: float, phase: int,
                rows: np.ndarray, present: Sequence[TensorSlot], histogram: bool,
                scalars: Mapping[str, float], learning_rates: Sequence[float]) -> report_pb2.StepReport:
    """Build the report of one step from the host copy `rows` (one buffer row per slot id)."""
    ts = Timestamp()
    ts.FromNanoseconds(int(capture_time * 1e9))
    report = report_pb2.StepReport(run_id=run_id, rank=rank, step=step, sequence=sequence, capture_time=ts,
                                   phase=phase, learning_rates=learning_rates)
    for key, value in scalars.items():
        if key == LOSS:
            report.loss = value
        else:
            report.scalars[key] = value
    for slot in present:
        r = rows[slot.id]
        c = r[:COL_SUM].astype(np.int64)
        summary = report.tensors.add(
            tensor_id=slot.id, count=slot.numel, nan_count=int(c[COL_NAN]), inf_count=int(c[COL_INF]),
            zero_count=int(c[COL_ZERO]), sum=float(r[COL_SUM]), sum_squares=float(r[COL_SUMSQ]),
            min=_f32(r[COL_MIN]), max=_f32(r[COL_MAX]),
        )
        if slot.kind == run_pb2.TENSOR_KIND_INPUT:  # the only rows summarized with cubes (agent/capture/inputs.py)
            summary.sum_cubes = float(r[COL_CUBE])
        elif slot.kind in CHECKSUM_KINDS:
            summary.checksum = checksum_of(r)
        if histogram:
            hist = r[COL_HIST:]
            nonzero = np.flatnonzero(hist)
            if nonzero.size:
                lo, hi = int(nonzero[0]), int(nonzero[-1])
                summary.histogram_offset = lo
                summary.histogram.extend(hist[lo : hi + 1].astype(np.int64).tolist())  # sync: numpy, reader thread
    return report


def _f32(value: float) -> float:
    """Clamp to float32's range so a huge finite float64 stays finite on the wire."""
    if math.isfinite(value):
        return float(np.clip(value, -3.4028234663852886e38, 3.4028234663852886e38))
    return float(value)
