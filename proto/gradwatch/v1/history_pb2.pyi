from gradwatch.v1 import report_pb2 as _report_pb2
from gradwatch.v1 import run_pb2 as _run_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StepRecord(_message.Message):
    __slots__ = ("step", "time", "eval", "loss", "grad_norm", "grad_norms", "param_norms", "scalars")
    class GradNormsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    class ParamNormsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    class ScalarsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORMS_FIELD_NUMBER: _ClassVar[int]
    PARAM_NORMS_FIELD_NUMBER: _ClassVar[int]
    SCALARS_FIELD_NUMBER: _ClassVar[int]
    step: int
    time: float
    eval: bool
    loss: float
    grad_norm: float
    grad_norms: _containers.ScalarMap[int, float]
    param_norms: _containers.ScalarMap[int, float]
    scalars: _containers.ScalarMap[str, float]
    def __init__(self, step: _Optional[int] = ..., time: _Optional[float] = ..., eval: _Optional[bool] = ..., loss: _Optional[float] = ..., grad_norm: _Optional[float] = ..., grad_norms: _Optional[_Mapping[int, float]] = ..., param_norms: _Optional[_Mapping[int, float]] = ..., scalars: _Optional[_Mapping[str, float]] = ...) -> None: ...

class NormStats(_message.Message):
    __slots__ = ("min", "max", "sum", "count", "nonfinite")
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_FIELD_NUMBER: _ClassVar[int]
    min: float
    max: float
    sum: float
    count: int
    nonfinite: int
    def __init__(self, min: _Optional[float] = ..., max: _Optional[float] = ..., sum: _Optional[float] = ..., count: _Optional[int] = ..., nonfinite: _Optional[int] = ...) -> None: ...

class TierRecord(_message.Message):
    __slots__ = ("first_step", "steps", "time", "loss", "grad_norm", "grad_norms", "param_norms")
    class GradNormsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: NormStats
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[NormStats, _Mapping]] = ...) -> None: ...
    class ParamNormsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: NormStats
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[NormStats, _Mapping]] = ...) -> None: ...
    FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORMS_FIELD_NUMBER: _ClassVar[int]
    PARAM_NORMS_FIELD_NUMBER: _ClassVar[int]
    first_step: int
    steps: int
    time: float
    loss: NormStats
    grad_norm: NormStats
    grad_norms: _containers.MessageMap[int, NormStats]
    param_norms: _containers.MessageMap[int, NormStats]
    def __init__(self, first_step: _Optional[int] = ..., steps: _Optional[int] = ..., time: _Optional[float] = ..., loss: _Optional[_Union[NormStats, _Mapping]] = ..., grad_norm: _Optional[_Union[NormStats, _Mapping]] = ..., grad_norms: _Optional[_Mapping[int, NormStats]] = ..., param_norms: _Optional[_Mapping[int, NormStats]] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("step", "tensors", "summaries")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SUMMARIES_FIELD_NUMBER: _ClassVar[int]
    step: int
    tensors: _containers.RepeatedScalarFieldContainer[int]
    summaries: _containers.RepeatedCompositeFieldContainer[_report_pb2.TensorSummary]
    def __init__(self, step: _Optional[int] = ..., tensors: _Optional[_Iterable[int]] = ..., summaries: _Optional[_Iterable[_Union[_report_pb2.TensorSummary, _Mapping]]] = ...) -> None: ...

class FrameTensors(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[_run_pb2.TensorInfo]
    def __init__(self, tensors: _Optional[_Iterable[_Union[_run_pb2.TensorInfo, _Mapping]]] = ...) -> None: ...
