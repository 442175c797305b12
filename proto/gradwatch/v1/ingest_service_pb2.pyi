from gradwatch.v1 import report_pb2 as _report_pb2
from gradwatch.v1 import run_pb2 as _run_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExportRequest(_message.Message):
    __slots__ = ("registrations", "reports")
    REGISTRATIONS_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    registrations: _containers.RepeatedCompositeFieldContainer[_run_pb2.RunRegistration]
    reports: _containers.RepeatedCompositeFieldContainer[_report_pb2.StepReport]
    def __init__(self, registrations: _Optional[_Iterable[_Union[_run_pb2.RunRegistration, _Mapping]]] = ..., reports: _Optional[_Iterable[_Union[_report_pb2.StepReport, _Mapping]]] = ...) -> None: ...

class ExportResponse(_message.Message):
    __slots__ = ("partial_success",)
    PARTIAL_SUCCESS_FIELD_NUMBER: _ClassVar[int]
    partial_success: ExportPartialSuccess
    def __init__(self, partial_success: _Optional[_Union[ExportPartialSuccess, _Mapping]] = ...) -> None: ...

class ExportPartialSuccess(_message.Message):
    __slots__ = ("rejected_reports", "rejected_registrations", "error_message")
    REJECTED_REPORTS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_REGISTRATIONS_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    rejected_reports: int
    rejected_registrations: int
    error_message: str
    def __init__(self, rejected_reports: _Optional[int] = ..., rejected_registrations: _Optional[int] = ..., error_message: _Optional[str] = ...) -> None: ...
