"""The ExportRequest scanner: exact slices of well-formed input, WireError (and nothing else) for the rest."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradwatch.collector.wire import MAX_GROUP_DEPTH, WireError, read_varint, split_export_request
from gradwatch.v1.ingest_service_pb2 import ExportRequest
from gradwatch.v1.report_pb2 import StepReport, TensorSummary
from gradwatch.v1.run_pb2 import RunRegistration, TensorInfo


def _request(n_reports: int = 3) -> ExportRequest:
    return ExportRequest(
        registrations=[RunRegistration(run_id="r", world_size=2, rank=1, tensors=[TensorInfo(id=1, name="w")])],
        reports=[StepReport(run_id="r", step=i, sequence=i + 1, tensors=[TensorSummary(tensor_id=1, count=i)])
                 for i in range(n_reports)],
    )


def test_splits_into_the_encoded_items():
    request = _request()
    registrations, reports = split_export_request(request.SerializeToString())
    assert registrations == [r.SerializeToString() for r in request.registrations]
    assert reports == [r.SerializeToString() for r in request.reports]


def test_empty_input_is_an_empty_request():
    assert split_export_request(b"") == ([], [])


def test_empty_items_are_kept():
    # An empty report is framing-valid (validation refuses it later, one by one).
    assert split_export_request(b"\x12\x00\x0a\x00") == ([b""], [b""])


@pytest.mark.parametrize("unknown", [
    b"\x48\x96\x01",                      # field 9 varint
    b"\x21" + b"\x00" * 8,                # field 4 fixed64
    b"\x2a\x03abc",                       # field 5 length-delimited
    b"\x35" + b"\x00" * 4,                # field 6 fixed32
    b"\x3b\x08\x01\x43\x44\x3c",          # field 7 group holding a varint and an empty nested group 8
    b"\xf8\xff\xff\xff\x0f\x01",          # the largest field number (2^29 - 1), varint
])
def test_unknown_fields_are_skipped(unknown):
    items = _request(1).SerializeToString()
    assert split_export_request(unknown + items + unknown) == split_export_request(items)


@pytest.mark.parametrize(("data", "why"), [
    (b"\x12\x05abc", "claims 5 bytes, only 3 left"),
    (b"\x0a\x80", "truncated varint"),
    (b"\x12", "truncated varint at byte 1"),
    (b"\x0d\x00\x00\x00\x00", "field 1 (registrations) at byte 0 has wire type 5"),
    (b"\x11" + b"\x00" * 8, "field 2 (reports) at byte 0 has wire type 1"),
    (b"\x13\x14", "field 2 (reports) at byte 0 has wire type 3"),
    (b"\x1e", "invalid wire type 6"),
    (b"\x00", "field number 0"),
    (b"\x3c", "end of group 7 at byte 0 without a start"),
    (b"\x3b\x44", "end of group 8 at byte 1 inside group 7"),
    (b"\x3b", "not closed"),
    (b"\x21\x00\x00", "truncated fixed64"),
    (b"\x25\x00", "truncated fixed32"),
    (b"\x2a\x05ab", "field 5 at byte 0 claims 5 bytes"),
    (b"\x38" + b"\xff" * 10 + b"\x01", "longer than 10 bytes"),
    (b"\x38" + b"\xff" * 9 + b"\x7f", "overflows 64 bits"),
    (b"\x80\x80\x80\x80\x80\x01", "tag at byte 0 overflows 32 bits"),
    (b"\x3b" * (MAX_GROUP_DEPTH + 1), f"nested deeper than {MAX_GROUP_DEPTH}"),
])
def test_malformed_input_raises_a_clear_wire_error(data, why):
    with pytest.raises(WireError, match=why.replace("(", r"\(").replace(")", r"\)")):
        split_export_request(data)


def test_wire_error_is_a_value_error():
    assert issubclass(WireError, ValueError)


def test_deeply_nested_groups_within_the_limit_are_skipped():
    depth = MAX_GROUP_DEPTH
    assert split_export_request(b"\x3b" * depth + b"\x3c" * depth) == ([], [])


def test_read_varint_largest_value():
    assert read_varint(b"\xff" * 9 + b"\x01", 0, 10) == (2**64 - 1, 10)


def test_every_truncation_of_a_valid_request_is_a_prefix_or_a_wire_error():
    data = _request(5).SerializeToString()
    for cut in range(len(data)):
        try:
            registrations, reports = split_export_request(data[:cut])
        except WireError:
            continue
        # Cut exactly between items: what was scanned is the leading items, unchanged.
        full_registrations, full_reports = split_export_request(data)
        assert registrations == full_registrations[:len(registrations)]
        assert reports == full_reports[:len(reports)]


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_never_raise_anything_but_wire_error(data):
    try:
        registrations, reports = split_export_request(data)
    except WireError:
        return
    # Accepted input: the slices are contiguous pieces of it.
    assert sum(len(item) for item in registrations + reports) <= len(data)


_summaries = st.builds(TensorSummary, tensor_id=st.integers(0, 2**32 - 1), count=st.integers(0, 2**64 - 1),
                       sum=st.floats(allow_nan=True, allow_infinity=True),
                       histogram=st.lists(st.integers(0, 2**64 - 1), max_size=8))
_reports = st.builds(StepReport, run_id=st.text(max_size=20), step=st.integers(-(2**63), 2**63 - 1),
                     sequence=st.integers(0, 2**64 - 1), tensors=st.lists(_summaries, max_size=4))
_registrations = st.builds(RunRegistration, run_id=st.text(max_size=20), world_size=st.integers(0, 2**32 - 1))


@settings(max_examples=150, deadline=None)
@given(st.lists(_registrations, max_size=3), st.lists(_reports, max_size=5))
def test_any_encoded_request_splits_into_its_items(registrations, reports):
    request = ExportRequest(registrations=registrations, reports=reports)
    assert split_export_request(request.SerializeToString()) == (
        [r.SerializeToString() for r in registrations], [r.SerializeToString() for r in reports])


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(0, 63))
def test_mutated_valid_requests_never_raise_anything_but_wire_error(noise, position):
    data = bytearray(_request(2).SerializeToString())
    position %= len(data)
    data[position:position + len(noise)] = noise
    try:
        split_export_request(bytes(data))
    except WireError:
        pass
