"""One stream entry as the collector wrote it: decoding it, and parking it in the run's dead-letter
stream (gradwatch.streams.dead_letter_key) when it cannot be decoded, so a poison entry is acked instead
of redelivered forever."""

from __future__ import annotations

from google.protobuf.message import DecodeError

from gradwatch.streams import FIELD_REGISTRATION, FIELD_REPORT
from gradwatch.v1 import report_pb2, run_pb2


def decode_entry(run: str, fields: dict) -> report_pb2.StepReport | run_pb2.RunRegistration:
    """The report or registration an entry holds; DecodeError when it holds neither, or another run's."""
    raw = fields.get(FIELD_REPORT)
    if raw is not None:
        item = report_pb2.StepReport.FromString(raw)
    elif (raw := fields.get(FIELD_REGISTRATION)) is not None:
        item = run_pb2.RunRegistration.FromString(raw)
    else:
        raise DecodeError(f"entry has neither a {FIELD_REPORT!r} nor a {FIELD_REGISTRATION!r} field")
    if item.run_id and item.run_id != run:
        raise DecodeError(f"entry of run {item.run_id!r} in the stream of run {run!r}")
    return item


def dead_letter(fields: dict, stream: str, entry_id: bytes, reason: str) -> dict:
    """The original fields plus where the entry came from and why it was parked."""
    dead = dict(fields)
    dead.update({b"dead_error": reason, b"dead_stream": stream, b"dead_id": entry_id})
    return dead
