from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Dtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[Dtype]
    DTYPE_F32: _ClassVar[Dtype]
    DTYPE_BF16: _ClassVar[Dtype]
    DTYPE_F16: _ClassVar[Dtype]

class ErrorKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_KIND_UNSPECIFIED: _ClassVar[ErrorKind]
    ERROR_KIND_BAD_HIDDEN: _ClassVar[ErrorKind]
    ERROR_KIND_PROBE_LOAD: _ClassVar[ErrorKind]
    ERROR_KIND_LIMIT: _ClassVar[ErrorKind]
    ERROR_KIND_DEADLINE: _ClassVar[ErrorKind]
    ERROR_KIND_SHUTTING_DOWN: _ClassVar[ErrorKind]
    ERROR_KIND_UNKNOWN_SESSION: _ClassVar[ErrorKind]
    ERROR_KIND_INTERNAL: _ClassVar[ErrorKind]
DTYPE_UNSPECIFIED: Dtype
DTYPE_F32: Dtype
DTYPE_BF16: Dtype
DTYPE_F16: Dtype
ERROR_KIND_UNSPECIFIED: ErrorKind
ERROR_KIND_BAD_HIDDEN: ErrorKind
ERROR_KIND_PROBE_LOAD: ErrorKind
ERROR_KIND_LIMIT: ErrorKind
ERROR_KIND_DEADLINE: ErrorKind
ERROR_KIND_SHUTTING_DOWN: ErrorKind
ERROR_KIND_UNKNOWN_SESSION: ErrorKind
ERROR_KIND_INTERNAL: ErrorKind

class SessionOptions(_message.Message):
    __slots__ = ("mode", "latency_budget_us", "cascade_json", "label")
    MODE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUDGET_US_FIELD_NUMBER: _ClassVar[int]
    CASCADE_JSON_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    mode: str
    latency_budget_us: int
    cascade_json: str
    label: str
    def __init__(self, mode: _Optional[str] = ..., latency_budget_us: _Optional[int] = ..., cascade_json: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "hidden_dim")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_DIM_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    hidden_dim: int
    def __init__(self, session_id: _Optional[int] = ..., hidden_dim: _Optional[int] = ...) -> None: ...

class HiddenState(_message.Message):
    __slots__ = ("dtype", "len", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LEN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: Dtype
    len: int
    data: bytes
    def __init__(self, dtype: _Optional[_Union[Dtype, str]] = ..., len: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class LayerState(_message.Message):
    __slots__ = ("model_layer", "hidden")
    MODEL_LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    model_layer: int
    hidden: HiddenState
    def __init__(self, model_layer: _Optional[int] = ..., hidden: _Optional[_Union[HiddenState, _Mapping]] = ...) -> None: ...

class LayerStates(_message.Message):
    __slots__ = ("layers",)
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[LayerState]
    def __init__(self, layers: _Optional[_Iterable[_Union[LayerState, _Mapping]]] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("open", "hidden", "layers", "text")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    open: SessionOptions
    hidden: HiddenState
    layers: LayerStates
    text: str
    def __init__(self, open: _Optional[_Union[SessionOptions, _Mapping]] = ..., hidden: _Optional[_Union[HiddenState, _Mapping]] = ..., layers: _Optional[_Union[LayerStates, _Mapping]] = ..., text: _Optional[str] = ...) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("opened", "result")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    result: TokenResult
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., result: _Optional[_Union[TokenResult, _Mapping]] = ...) -> None: ...

class TokenResult(_message.Message):
    __slots__ = ("seq", "report", "error")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    seq: int
    report: Report
    error: Error
    def __init__(self, seq: _Optional[int] = ..., report: _Optional[_Union[Report, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("kind", "message", "token")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    kind: ErrorKind
    message: str
    token: int
    def __init__(self, kind: _Optional[_Union[ErrorKind, str]] = ..., message: _Optional[str] = ..., token: _Optional[int] = ...) -> None: ...

class Detection(_message.Message):
    __slots__ = ("concept_id", "name", "layer", "prob", "logit", "probes")
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PROB_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    PROBES_FIELD_NUMBER: _ClassVar[int]
    concept_id: int
    name: str
    layer: int
    prob: float
    logit: float
    probes: _containers.RepeatedCompositeFieldContainer[ProbeScore]
    def __init__(self, concept_id: _Optional[int] = ..., name: _Optional[str] = ..., layer: _Optional[int] = ..., prob: _Optional[float] = ..., logit: _Optional[float] = ..., probes: _Optional[_Iterable[_Union[ProbeScore, _Mapping]]] = ...) -> None: ...

class ProbeScore(_message.Message):
    __slots__ = ("model_layer", "logit", "prob", "calibrated")
    MODEL_LAYER_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    PROB_FIELD_NUMBER: _ClassVar[int]
    CALIBRATED_FIELD_NUMBER: _ClassVar[int]
    model_layer: int
    logit: float
    prob: float
    calibrated: float
    def __init__(self, model_layer: _Optional[int] = ..., logit: _Optional[float] = ..., prob: _Optional[float] = ..., calibrated: _Optional[float] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("profile", "concept_id", "concept", "layer", "watched", "score", "logit")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    WATCHED_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    profile: str
    concept_id: int
    concept: str
    layer: int
    watched: str
    score: float
    logit: float
    def __init__(self, profile: _Optional[str] = ..., concept_id: _Optional[int] = ..., concept: _Optional[str] = ..., layer: _Optional[int] = ..., watched: _Optional[str] = ..., score: _Optional[float] = ..., logit: _Optional[float] = ...) -> None: ...

class Stages(_message.Message):
    __slots__ = ("initial_scoring_ns", "expansion_lookup_ns", "loading_ns", "new_scoring_ns", "pruning_ns", "sorting_ns")
    INITIAL_SCORING_NS_FIELD_NUMBER: _ClassVar[int]
    EXPANSION_LOOKUP_NS_FIELD_NUMBER: _ClassVar[int]
    LOADING_NS_FIELD_NUMBER: _ClassVar[int]
    NEW_SCORING_NS_FIELD_NUMBER: _ClassVar[int]
    PRUNING_NS_FIELD_NUMBER: _ClassVar[int]
    SORTING_NS_FIELD_NUMBER: _ClassVar[int]
    initial_scoring_ns: int
    expansion_lookup_ns: int
    loading_ns: int
    new_scoring_ns: int
    pruning_ns: int
    sorting_ns: int
    def __init__(self, initial_scoring_ns: _Optional[int] = ..., expansion_lookup_ns: _Optional[int] = ..., loading_ns: _Optional[int] = ..., new_scoring_ns: _Optional[int] = ..., pruning_ns: _Optional[int] = ..., sorting_ns: _Optional[int] = ...) -> None: ...

class Report(_message.Message):
    __slots__ = ("token", "top", "children", "loaded", "unloaded", "skipped_by_cap", "scored", "active", "stages", "elapsed_ns", "in_flight", "failed_loads", "alerts", "simplex")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    CHILDREN_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    UNLOADED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_BY_CAP_FIELD_NUMBER: _ClassVar[int]
    SCORED_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_NS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    FAILED_LOADS_FIELD_NUMBER: _ClassVar[int]
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    SIMPLEX_FIELD_NUMBER: _ClassVar[int]
    token: int
    top: _containers.RepeatedCompositeFieldContainer[Detection]
    children: int
    loaded: int
    unloaded: int
    skipped_by_cap: int
    scored: int
    active: int
    stages: Stages
    elapsed_ns: int
    in_flight: _containers.RepeatedScalarFieldContainer[str]
    failed_loads: _containers.RepeatedScalarFieldContainer[str]
    alerts: _containers.RepeatedCompositeFieldContainer[Alert]
    simplex: _containers.RepeatedCompositeFieldContainer[SimplexReading]
    def __init__(self, token: _Optional[int] = ..., top: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ..., children: _Optional[int] = ..., loaded: _Optional[int] = ..., unloaded: _Optional[int] = ..., skipped_by_cap: _Optional[int] = ..., scored: _Optional[int] = ..., active: _Optional[int] = ..., stages: _Optional[_Union[Stages, _Mapping]] = ..., elapsed_ns: _Optional[int] = ..., in_flight: _Optional[_Iterable[str]] = ..., failed_loads: _Optional[_Iterable[str]] = ..., alerts: _Optional[_Iterable[_Union[Alert, _Mapping]]] = ..., simplex: _Optional[_Iterable[_Union[SimplexReading, _Mapping]]] = ...) -> None: ...

class SimplexReading(_message.Message):
    __slots__ = ("simplex", "pole", "prob", "logit", "deviation")
    SIMPLEX_FIELD_NUMBER: _ClassVar[int]
    POLE_FIELD_NUMBER: _ClassVar[int]
    PROB_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    DEVIATION_FIELD_NUMBER: _ClassVar[int]
    simplex: str
    pole: str
    prob: float
    logit: float
    deviation: float
    def __init__(self, simplex: _Optional[str] = ..., pole: _Optional[str] = ..., prob: _Optional[float] = ..., logit: _Optional[float] = ..., deviation: _Optional[float] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    def __init__(self, session_id: _Optional[int] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BatchItem(_message.Message):
    __slots__ = ("session_id", "hidden", "layers", "text")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    hidden: HiddenState
    layers: _containers.RepeatedCompositeFieldContainer[LayerState]
    text: str
    def __init__(self, session_id: _Optional[int] = ..., hidden: _Optional[_Union[HiddenState, _Mapping]] = ..., layers: _Optional[_Iterable[_Union[LayerState, _Mapping]]] = ..., text: _Optional[str] = ...) -> None: ...

class BatchRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[BatchItem]
    def __init__(self, items: _Optional[_Iterable[_Union[BatchItem, _Mapping]]] = ...) -> None: ...

class BatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[TokenResult]
    def __init__(self, results: _Optional[_Iterable[_Union[TokenResult, _Mapping]]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Concept(_message.Message):
    __slots__ = ("id", "name", "layer", "parents")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    layer: int
    parents: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ..., layer: _Optional[int] = ..., parents: _Optional[_Iterable[int]] = ...) -> None: ...

class PackInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PackConcept(_message.Message):
    __slots__ = ("label", "level", "parent", "description")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    label: str
    level: int
    parent: str
    description: str
    def __init__(self, label: _Optional[str] = ..., level: _Optional[int] = ..., parent: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class WatchInfo(_message.Message):
    __slots__ = ("name", "threshold")
    NAME_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    name: str
    threshold: float
    def __init__(self, name: _Optional[str] = ..., threshold: _Optional[float] = ...) -> None: ...

class PackInfoResponse(_message.Message):
    __slots__ = ("model", "pack", "total_lenses", "calibrated", "alert_threshold", "fields", "concepts", "watch")
    class ConceptsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: PackConcept
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[PackConcept, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PACK_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LENSES_FIELD_NUMBER: _ClassVar[int]
    CALIBRATED_FIELD_NUMBER: _ClassVar[int]
    ALERT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    WATCH_FIELD_NUMBER: _ClassVar[int]
    model: str
    pack: str
    total_lenses: int
    calibrated: bool
    alert_threshold: float
    fields: _containers.RepeatedScalarFieldContainer[str]
    concepts: _containers.MessageMap[str, PackConcept]
    watch: _containers.RepeatedCompositeFieldContainer[WatchInfo]
    def __init__(self, model: _Optional[str] = ..., pack: _Optional[str] = ..., total_lenses: _Optional[int] = ..., calibrated: bool = ..., alert_threshold: _Optional[float] = ..., fields: _Optional[_Iterable[str]] = ..., concepts: _Optional[_Mapping[str, PackConcept]] = ..., watch: _Optional[_Iterable[_Union[WatchInfo, _Mapping]]] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("version", "hidden_dim", "concepts", "max_message_bytes", "max_sessions", "stream_queue", "request_deadline_ms", "max_batch_items", "model_layers")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_DIM_FIELD_NUMBER: _ClassVar[int]
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    STREAM_QUEUE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_LAYERS_FIELD_NUMBER: _ClassVar[int]
    version: str
    hidden_dim: int
    concepts: _containers.RepeatedCompositeFieldContainer[Concept]
    max_message_bytes: int
    max_sessions: int
    stream_queue: int
    request_deadline_ms: int
    max_batch_items: int
    model_layers: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, version: _Optional[str] = ..., hidden_dim: _Optional[int] = ..., concepts: _Optional[_Iterable[_Union[Concept, _Mapping]]] = ..., max_message_bytes: _Optional[int] = ..., max_sessions: _Optional[int] = ..., stream_queue: _Optional[int] = ..., request_deadline_ms: _Optional[int] = ..., max_batch_items: _Optional[int] = ..., model_layers: _Optional[_Iterable[int]] = ...) -> None: ...
