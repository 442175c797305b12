"""Checks of one decoded StepReport, RunRegistration or Snapshot: a reason string when it must be refused, else None.

Only what would break Redis keys, the aggregator or dashboards is refused. NaN and Inf inside statistics
are data, never a reason; a report without tensors (a step sent only for its NaN/Inf origins) is valid.
"""

from __future__ import annotations

from collections.abc import Iterable

from gradwatch.limits import BOUNDS, KINDS, LABEL_BYTES, REQUEST_ID_RE, REQUEST_ID_RULE
from gradwatch.names import OUTPUT_GRAD_SUFFIX
from gradwatch.stats import HIST_BUCKETS
from gradwatch.streams import RUN_ID_RULE, valid_run_id
from gradwatch.v1.report_pb2 import StepReport
from gradwatch.v1.run_pb2 import RunRegistration
from gradwatch.v1.snapshot_pb2 import Snapshot


def report_problem(report: StepReport, max_tensors: int, max_string_bytes: int) -> str | None:
    if not valid_run_id(report.run_id):
        return f"run_id {_show(report.run_id)} is not {RUN_ID_RULE}"
    if report.step < 0:
        return f"step {report.step} is negative"
    if report.sequence < 1:
        return "sequence must start at 1 (got 0)"
    if len(report.tensors) > max_tensors:
        return f"{len(report.tensors)} tensors, more than the limit of {max_tensors}"
    too_long = _too_long(report.scalars, max_string_bytes)
    if too_long is not None:
        return f"scalar name {too_long}"
    # NaN/Inf origins: a module path, and the tensor seen, "<module>:output" or "<module>:output.grad".
    origins = report.nonfinite_origins
    too_long = (_too_long((o.module for o in origins), max_string_bytes)
                or _too_long((o.observed for o in origins), max_string_bytes + len(OUTPUT_GRAD_SUFFIX)))
    if too_long is not None:
        return f"NaN/Inf origin {too_long}"
    for summary in report.tensors:
        # A histogram past the last bucket cannot be merged with anyone else's: it is a broken agent.
        if summary.histogram_offset + len(summary.histogram) > HIST_BUCKETS:
            return (f"tensor {summary.tensor_id}: histogram of {len(summary.histogram)} buckets at offset "
                    f"{summary.histogram_offset} runs past bucket {HIST_BUCKETS}")
    return None


def registration_problem(reg: RunRegistration, max_tensors: int, max_string_bytes: int) -> str | None:
    if not valid_run_id(reg.run_id):
        return f"run_id {_show(reg.run_id)} is not {RUN_ID_RULE}"
    if reg.world_size < 1:
        return f"world_size must be at least 1 (got {reg.world_size})"
    if reg.rank >= reg.world_size:
        return f"rank {reg.rank} is not below world_size {reg.world_size}"
    if len(reg.tensors) > max_tensors:
        return f"{len(reg.tensors)} tensors, more than the limit of {max_tensors}"
    if len(reg.topology.nodes) > max_tensors or len(reg.topology.edges) > max_tensors:
        return f"topology with more than {max_tensors} nodes or edges"
    seen: set[int] = set()
    for info in reg.tensors:
        if info.id in seen:
            return f"tensor id {info.id} is used twice (for {_show(info.name)})"
        seen.add(info.id)
        too_long = _too_long((info.name, info.module_path, info.dtype), max_string_bytes)
        if too_long is not None:
            return f"tensor {info.id}: {too_long}"
    checks: list[tuple[str, Iterable[str]]] = [
        ("label", (s for kv in reg.labels.items() for s in kv)),
        ("hyperparameter", (s for k, v in reg.hyperparameters.items() for s in (k, v.text))),
        ("topology", (s for n in reg.topology.nodes for s in (n.module_path, n.module_type))),
        ("topology edge", (s for e in reg.topology.edges for s in (e.source, e.target))),
        ("agent", (reg.agent_version, reg.host)),
    ]
    for what, strings in checks:
        too_long = _too_long(strings, max_string_bytes)
        if too_long is not None:
            return f"{what} {too_long}"
    return None


def _too_long(strings: Iterable[str], limit: int) -> str | None:
    for s in strings:
        # UTF-8 needs at most 4 bytes per character: most strings pass without being encoded.
        if len(s) * 4 > limit and len(s.encode()) > limit:
            return f"{_show(s)} is longer than {limit} bytes"
    return None


def _show(value: str, limit: int = 40) -> str:
    """A bounded repr for error messages: refused input must not blow up logs or statuses."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} characters)"


def snapshot_problem(snap: Snapshot, max_string_bytes: int) -> str | None:
    """Snapshots are bounded pictures (gradwatch.limits): anything bigger is a broken agent."""
    if not valid_run_id(snap.run_id):
        return f"run_id {_show(snap.run_id)} is not {RUN_ID_RULE}"
    if not REQUEST_ID_RE.match(snap.request_id):
        return f"request_id {_show(snap.request_id)} is not {REQUEST_ID_RULE}"
    bounds = BOUNDS.get(snap.kind)
    if bounds is None:
        return f"unknown snapshot kind {snap.kind}"
    too_long = _too_long((snap.tensor, snap.error), max_string_bytes)
    if too_long is not None:
        return f"snapshot {too_long}"
    if len(snap.shape) > 16:
        return f"shape of {len(snap.shape)} dimensions"
    if snap.error:
        return None if not snap.values and not snap.labels else "a snapshot with an error carries no values"
    maps, rows, cols = bounds
    if not (1 <= snap.maps <= maps and 1 <= snap.rows <= rows and 1 <= snap.cols <= cols):
        return (f"{snap.maps} x {snap.rows} x {snap.cols} (maps x rows x cols) is outside 1..{maps} x 1..{rows} "
                f"x 1..{cols} for a {KINDS[snap.kind]} snapshot")
    if len(snap.values) != snap.maps * snap.rows * snap.cols:
        return f"{len(snap.values)} values for {snap.maps} x {snap.rows} x {snap.cols}"
    if snap.labels and len(snap.labels) != snap.rows:
        return f"{len(snap.labels)} labels for {snap.rows} rows"
    too_long = _too_long(snap.labels, LABEL_BYTES)
    if too_long is not None:
        return f"label {too_long}"
    return None
