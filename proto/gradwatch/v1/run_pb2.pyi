import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_KIND_UNSPECIFIED: _ClassVar[TensorKind]
    TENSOR_KIND_PARAMETER: _ClassVar[TensorKind]
    TENSOR_KIND_GRADIENT: _ClassVar[TensorKind]
    TENSOR_KIND_ACTIVATION: _ClassVar[TensorKind]
    TENSOR_KIND_ACTIVATION_GRADIENT: _ClassVar[TensorKind]
    TENSOR_KIND_UPDATE: _ClassVar[TensorKind]
    TENSOR_KIND_INPUT: _ClassVar[TensorKind]
    TENSOR_KIND_OPTIMIZER_STATE: _ClassVar[TensorKind]

class Partition(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PARTITION_UNSPECIFIED: _ClassVar[Partition]
    PARTITION_REPLICATED: _ClassVar[Partition]
    PARTITION_SHARDED: _ClassVar[Partition]
    PARTITION_PER_RANK: _ClassVar[Partition]
TENSOR_KIND_UNSPECIFIED: TensorKind
TENSOR_KIND_PARAMETER: TensorKind
TENSOR_KIND_GRADIENT: TensorKind
TENSOR_KIND_ACTIVATION: TensorKind
TENSOR_KIND_ACTIVATION_GRADIENT: TensorKind
TENSOR_KIND_UPDATE: TensorKind
TENSOR_KIND_INPUT: TensorKind
TENSOR_KIND_OPTIMIZER_STATE: TensorKind
PARTITION_UNSPECIFIED: Partition
PARTITION_REPLICATED: Partition
PARTITION_SHARDED: Partition
PARTITION_PER_RANK: Partition

class RunRegistration(_message.Message):
    __slots__ = ("run_id", "rank", "world_size", "hyperparameters", "labels", "tensors", "topology", "start_time", "agent_version", "host")
    class HyperparametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: HyperparameterValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[HyperparameterValue, _Mapping]] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rank: int
    world_size: int
    hyperparameters: _containers.MessageMap[str, HyperparameterValue]
    labels: _containers.ScalarMap[str, str]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    topology: ModelGraph
    start_time: _timestamp_pb2.Timestamp
    agent_version: str
    host: str
    def __init__(self, run_id: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., hyperparameters: _Optional[_Mapping[str, HyperparameterValue]] = ..., labels: _Optional[_Mapping[str, str]] = ..., tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., topology: _Optional[_Union[ModelGraph, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., agent_version: _Optional[str] = ..., host: _Optional[str] = ...) -> None: ...

class HyperparameterValue(_message.Message):
    __slots__ = ("number", "integer", "text", "flag")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    INTEGER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    number: float
    integer: int
    text: str
    flag: bool
    def __init__(self, number: _Optional[float] = ..., integer: _Optional[int] = ..., text: _Optional[str] = ..., flag: _Optional[bool] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("id", "name", "kind", "shape", "dtype", "module_path", "order", "partition")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MODULE_PATH_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    kind: TensorKind
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    module_path: str
    order: int
    partition: Partition
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ..., kind: _Optional[_Union[TensorKind, str]] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., module_path: _Optional[str] = ..., order: _Optional[int] = ..., partition: _Optional[_Union[Partition, str]] = ...) -> None: ...

class ModelGraph(_message.Message):
    __slots__ = ("nodes", "edges")
    NODES_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[GraphNode]
    edges: _containers.RepeatedCompositeFieldContainer[GraphEdge]
    def __init__(self, nodes: _Optional[_Iterable[_Union[GraphNode, _Mapping]]] = ..., edges: _Optional[_Iterable[_Union[GraphEdge, _Mapping]]] = ...) -> None: ...

class GraphNode(_message.Message):
    __slots__ = ("module_path", "module_type")
    MODULE_PATH_FIELD_NUMBER: _ClassVar[int]
    MODULE_TYPE_FIELD_NUMBER: _ClassVar[int]
    module_path: str
    module_type: str
    def __init__(self, module_path: _Optional[str] = ..., module_type: _Optional[str] = ...) -> None: ...

class GraphEdge(_message.Message):
    __slots__ = ("source", "target")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    source: str
    target: str
    def __init__(self, source: _Optional[str] = ..., target: _Optional[str] = ...) -> None: ...
