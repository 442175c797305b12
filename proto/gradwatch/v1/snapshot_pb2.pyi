import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SnapshotKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SNAPSHOT_KIND_UNSPECIFIED: _ClassVar[SnapshotKind]
    SNAPSHOT_KIND_WEIGHT_HEATMAP: _ClassVar[SnapshotKind]
    SNAPSHOT_KIND_FEATURE_MAPS: _ClassVar[SnapshotKind]
    SNAPSHOT_KIND_CHANNEL_IMPORTANCE: _ClassVar[SnapshotKind]
    SNAPSHOT_KIND_PROJECTION: _ClassVar[SnapshotKind]
SNAPSHOT_KIND_UNSPECIFIED: SnapshotKind
SNAPSHOT_KIND_WEIGHT_HEATMAP: SnapshotKind
SNAPSHOT_KIND_FEATURE_MAPS: SnapshotKind
SNAPSHOT_KIND_CHANNEL_IMPORTANCE: SnapshotKind
SNAPSHOT_KIND_PROJECTION: SnapshotKind

class SnapshotRequest(_message.Message):
    __slots__ = ("id", "run_id", "kind", "tensor", "request_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    run_id: str
    kind: SnapshotKind
    tensor: str
    request_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., run_id: _Optional[str] = ..., kind: _Optional[_Union[SnapshotKind, str]] = ..., tensor: _Optional[str] = ..., request_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("request_id", "run_id", "rank", "step", "kind", "tensor", "shape", "maps", "rows", "cols", "values", "labels", "error", "capture_time")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    run_id: str
    rank: int
    step: int
    kind: SnapshotKind
    tensor: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    maps: int
    rows: int
    cols: int
    values: _containers.RepeatedScalarFieldContainer[float]
    labels: _containers.RepeatedScalarFieldContainer[str]
    error: str
    capture_time: _timestamp_pb2.Timestamp
    def __init__(self, request_id: _Optional[str] = ..., run_id: _Optional[str] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., kind: _Optional[_Union[SnapshotKind, str]] = ..., tensor: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., maps: _Optional[int] = ..., rows: _Optional[int] = ..., cols: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ..., labels: _Optional[_Iterable[str]] = ..., error: _Optional[str] = ..., capture_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
