"""Split a serialized ExportRequest into the raw bytes of its registrations, reports and snapshots, without
re-encoding.

The collector stores exactly the bytes the agent encoded, so it only needs the framing of the top level:
field 1 (registrations), field 2 (reports) and field 3 (snapshots), all length-delimited. Everything else
is skipped by its wire type, as a protobuf parser would skip unknown fields. Any framing error raises WireError (a
ValueError) with a reason fit for a gRPC status; nothing here may raise anything else on any input.
"""

from __future__ import annotations

FIELD_REGISTRATIONS = 1
FIELD_REPORTS = 2
FIELD_SNAPSHOTS = 3

WIRE_VARINT = 0
WIRE_FIXED64 = 1
WIRE_LEN = 2
WIRE_START_GROUP = 3
WIRE_END_GROUP = 4
WIRE_FIXED32 = 5

# Same nesting limit as protobuf's own parsers: deeper group nesting is an attack, not data.
MAX_GROUP_DEPTH = 100
_MAX_VARINT_BYTES = 10
_NAMES = {FIELD_REGISTRATIONS: "registrations", FIELD_REPORTS: "reports", FIELD_SNAPSHOTS: "snapshots"}


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def split_export_request(data: bytes) -> tuple[list[bytes], list[bytes]]:
    """(registrations, reports): each the encoded bytes of one item, in wire order."""
    registrations, reports, _ = split_export(data)
    return registrations, reports


def split_export(data: bytes) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """(registrations, reports, snapshots): each the encoded bytes of one item, in wire order."""
    items: dict[int, list[bytes]] = {FIELD_REGISTRATIONS: [], FIELD_REPORTS: [], FIELD_SNAPSHOTS: []}
    end = len(data)
    pos = 0
    while pos < end:
        tag_pos = pos
        tag, pos = _read_tag(data, pos, end)
        number, wire_type = tag >> 3, tag & 7
        if number in _NAMES:
            if wire_type != WIRE_LEN:
                raise WireError(
                    f"field {number} ({_NAMES[number]}) at byte {tag_pos} has wire type {wire_type}, "
                    f"expected {WIRE_LEN} (length-delimited)"
                )
            length, pos = read_varint(data, pos, end)
            if length > end - pos:
                raise WireError(
                    f"field {number} ({_NAMES[number]}) at byte {tag_pos} claims {length} bytes, "
                    f"only {end - pos} left"
                )
            items[number].append(data[pos:pos + length])
            pos += length
        else:
            pos = _skip_field(data, pos, end, number, wire_type, tag_pos)
    return items[FIELD_REGISTRATIONS], items[FIELD_REPORTS], items[FIELD_SNAPSHOTS]


def read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, next position) of the base-128 varint at `pos`."""
    result = 0
    shift = 0
    start = pos
    while True:
        if pos >= end:
            raise WireError(f"truncated varint at byte {start}")
        if pos - start >= _MAX_VARINT_BYTES:
            raise WireError(f"varint at byte {start} is longer than {_MAX_VARINT_BYTES} bytes")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            if result >> 64:
                raise WireError(f"varint at byte {start} overflows 64 bits")
            return result, pos
        shift += 7


def _read_tag(data: bytes, pos: int, end: int) -> tuple[int, int]:
    start = pos
    tag, pos = read_varint(data, pos, end)
    if tag > 0xFFFFFFFF:
        raise WireError(f"tag at byte {start} overflows 32 bits")
    if tag >> 3 == 0:
        raise WireError(f"field number 0 at byte {start} (not a protobuf message)")
    wire_type = tag & 7
    if wire_type > WIRE_FIXED32:
        raise WireError(f"invalid wire type {wire_type} at byte {start}")
    return tag, pos


def _skip_field(data: bytes, pos: int, end: int, number: int, wire_type: int, tag_pos: int) -> int:
    """Position after the value of an unknown field whose tag ended at `pos`."""
    if wire_type == WIRE_VARINT:
        return read_varint(data, pos, end)[1]
    if wire_type in (WIRE_FIXED64, WIRE_FIXED32):
        size = 8 if wire_type == WIRE_FIXED64 else 4
        if size > end - pos:
            raise WireError(f"truncated fixed{size * 8} field {number} at byte {tag_pos}")
        return pos + size
    if wire_type == WIRE_LEN:
        length, pos = read_varint(data, pos, end)
        if length > end - pos:
            raise WireError(f"field {number} at byte {tag_pos} claims {length} bytes, only {end - pos} left")
        return pos + length
    if wire_type == WIRE_END_GROUP:
        raise WireError(f"end of group {number} at byte {tag_pos} without a start")
    return _skip_group(data, pos, end, number, tag_pos)


def _skip_group(data: bytes, pos: int, end: int, number: int, tag_pos: int) -> int:
    # Iterative with an explicit stack: deeply nested input must not exhaust Python's recursion limit.
    open_groups = [number]
    while open_groups:
        if len(open_groups) > MAX_GROUP_DEPTH:
            raise WireError(f"groups nested deeper than {MAX_GROUP_DEPTH} at byte {pos}")
        if pos >= end:
            raise WireError(f"group {open_groups[-1]} starting at byte {tag_pos} is not closed")
        inner_pos = pos
        tag, pos = _read_tag(data, pos, end)
        inner_number, wire_type = tag >> 3, tag & 7
        if wire_type == WIRE_START_GROUP:
            open_groups.append(inner_number)
        elif wire_type == WIRE_END_GROUP:
            if inner_number != open_groups[-1]:
                raise WireError(
                    f"end of group {inner_number} at byte {inner_pos} inside group {open_groups[-1]}"
                )
            open_groups.pop()
        else:
            pos = _skip_field(data, pos, end, inner_number, wire_type, inner_pos)
    return pos
