import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Direction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIRECTION_UNSPECIFIED: _ClassVar[Direction]
    DIRECTION_FORWARD: _ClassVar[Direction]
    DIRECTION_BACKWARD: _ClassVar[Direction]

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PHASE_TRAIN: _ClassVar[Phase]
    PHASE_EVAL: _ClassVar[Phase]
DIRECTION_UNSPECIFIED: Direction
DIRECTION_FORWARD: Direction
DIRECTION_BACKWARD: Direction
PHASE_UNSPECIFIED: Phase
PHASE_TRAIN: Phase
PHASE_EVAL: Phase

class StepReport(_message.Message):
    __slots__ = ("run_id", "rank", "step", "sequence", "capture_time", "step_seconds", "phase", "loss", "learning_rates", "scalars", "tensors", "dropped_reports", "final", "nonfinite_origins")
    class ScalarsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIME_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATES_FIELD_NUMBER: _ClassVar[int]
    SCALARS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_REPORTS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_ORIGINS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rank: int
    step: int
    sequence: int
    capture_time: _timestamp_pb2.Timestamp
    step_seconds: float
    phase: Phase
    loss: float
    learning_rates: _containers.RepeatedScalarFieldContainer[float]
    scalars: _containers.ScalarMap[str, float]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSummary]
    dropped_reports: int
    final: bool
    nonfinite_origins: _containers.RepeatedCompositeFieldContainer[NonFiniteOrigin]
    def __init__(self, run_id: _Optional[str] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., sequence: _Optional[int] = ..., capture_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., step_seconds: _Optional[float] = ..., phase: _Optional[_Union[Phase, str]] = ..., loss: _Optional[float] = ..., learning_rates: _Optional[_Iterable[float]] = ..., scalars: _Optional[_Mapping[str, float]] = ..., tensors: _Optional[_Iterable[_Union[TensorSummary, _Mapping]]] = ..., dropped_reports: _Optional[int] = ..., final: _Optional[bool] = ..., nonfinite_origins: _Optional[_Iterable[_Union[NonFiniteOrigin, _Mapping]]] = ...) -> None: ...

class NonFiniteOrigin(_message.Message):
    __slots__ = ("direction", "module", "order", "observed", "nonfinite_count")
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_COUNT_FIELD_NUMBER: _ClassVar[int]
    direction: Direction
    module: str
    order: int
    observed: str
    nonfinite_count: int
    def __init__(self, direction: _Optional[_Union[Direction, str]] = ..., module: _Optional[str] = ..., order: _Optional[int] = ..., observed: _Optional[str] = ..., nonfinite_count: _Optional[int] = ...) -> None: ...

class TensorSummary(_message.Message):
    __slots__ = ("tensor_id", "count", "nan_count", "inf_count", "zero_count", "sum", "sum_squares", "min", "max", "histogram", "histogram_offset", "sum_cubes", "checksum")
    TENSOR_ID_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    NAN_COUNT_FIELD_NUMBER: _ClassVar[int]
    INF_COUNT_FIELD_NUMBER: _ClassVar[int]
    ZERO_COUNT_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    SUM_SQUARES_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SUM_CUBES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    tensor_id: int
    count: int
    nan_count: int
    inf_count: int
    zero_count: int
    sum: float
    sum_squares: float
    min: float
    max: float
    histogram: _containers.RepeatedScalarFieldContainer[int]
    histogram_offset: int
    sum_cubes: float
    checksum: int
    def __init__(self, tensor_id: _Optional[int] = ..., count: _Optional[int] = ..., nan_count: _Optional[int] = ..., inf_count: _Optional[int] = ..., zero_count: _Optional[int] = ..., sum: _Optional[float] = ..., sum_squares: _Optional[float] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., histogram: _Optional[_Iterable[int]] = ..., histogram_offset: _Optional[int] = ..., sum_cubes: _Optional[float] = ..., checksum: _Optional[int] = ...) -> None: ...
