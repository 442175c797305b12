from gradwatch.v1 import report_pb2 as _report_pb2
from gradwatch.v1 import run_pb2 as _run_pb2
from gradwatch.v1 import snapshot_pb2 as _snapshot_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExportRequest(_message.Message):
    __slots__ = ("registrations", "reports", "snapshots")
    REGISTRATIONS_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    registrations: _containers.RepeatedCompositeFieldContainer[_run_pb2.RunRegistration]
    reports: _containers.RepeatedCompositeFieldContainer[_report_pb2.StepReport]
    snapshots: _containers.RepeatedCompositeFieldContainer[_snapshot_pb2.Snapshot]
    def __init__(self, registrations: _Optional[_Iterable[_Union[_run_pb2.RunRegistration, _Mapping]]] = ..., reports: _Optional[_Iterable[_Union[_report_pb2.StepReport, _Mapping]]] = ..., snapshots: _Optional[_Iterable[_Union[_snapshot_pb2.Snapshot, _Mapping]]] = ...) -> None: ...

class ExportResponse(_message.Message):
    __slots__ = ("partial_success", "snapshot_requests")
    PARTIAL_SUCCESS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    partial_success: ExportPartialSuccess
    snapshot_requests: _containers.RepeatedCompositeFieldContainer[_snapshot_pb2.SnapshotRequest]
    def __init__(self, partial_success: _Optional[_Union[ExportPartialSuccess, _Mapping]] = ..., snapshot_requests: _Optional[_Iterable[_Union[_snapshot_pb2.SnapshotRequest, _Mapping]]] = ...) -> None: ...

class ExportPartialSuccess(_message.Message):
    __slots__ = ("rejected_reports", "rejected_registrations", "error_message", "rejected_snapshots")
    REJECTED_REPORTS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_REGISTRATIONS_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REJECTED_SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    rejected_reports: int
    rejected_registrations: int
    error_message: str
    rejected_snapshots: int
    def __init__(self, rejected_reports: _Optional[int] = ..., rejected_registrations: _Optional[int] = ..., error_message: _Optional[str] = ..., rejected_snapshots: _Optional[int] = ...) -> None: ...
