from google.protobuf import descriptor_pb2 as _descriptor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdapterSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_SOURCE_UNSPECIFIED: _ClassVar[AdapterSource]
    HUB: _ClassVar[AdapterSource]
    LOCAL: _ClassVar[AdapterSource]
    S3: _ClassVar[AdapterSource]

class MergeStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MERGE_STRATEGY_UNSPECIFIED: _ClassVar[MergeStrategy]
    LINEAR: _ClassVar[MergeStrategy]
    TIES: _ClassVar[MergeStrategy]
    DARE_LINEAR: _ClassVar[MergeStrategy]
    DARE_TIES: _ClassVar[MergeStrategy]
    MAGNITUDE_PRUNE: _ClassVar[MergeStrategy]

class MajoritySignMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MAJORITY_SIGN_METHOD_UNSPECIFIED: _ClassVar[MajoritySignMethod]
    TOTAL: _ClassVar[MajoritySignMethod]
    FREQUENCY: _ClassVar[MajoritySignMethod]

class MergeSpace(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MERGE_SPACE_UNSPECIFIED: _ClassVar[MergeSpace]
    DELTA: _ClassVar[MergeSpace]
    FACTORS: _ClassVar[MergeSpace]

class Dtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[Dtype]
    FLOAT32: _ClassVar[Dtype]
    BFLOAT16: _ClassVar[Dtype]
    FLOAT16: _ClassVar[Dtype]
ADAPTER_SOURCE_UNSPECIFIED: AdapterSource
HUB: AdapterSource
LOCAL: AdapterSource
S3: AdapterSource
MERGE_STRATEGY_UNSPECIFIED: MergeStrategy
LINEAR: MergeStrategy
TIES: MergeStrategy
DARE_LINEAR: MergeStrategy
DARE_TIES: MergeStrategy
MAGNITUDE_PRUNE: MergeStrategy
MAJORITY_SIGN_METHOD_UNSPECIFIED: MajoritySignMethod
TOTAL: MajoritySignMethod
FREQUENCY: MajoritySignMethod
MERGE_SPACE_UNSPECIFIED: MergeSpace
DELTA: MergeSpace
FACTORS: MergeSpace
DTYPE_UNSPECIFIED: Dtype
FLOAT32: Dtype
BFLOAT16: Dtype
FLOAT16: Dtype
STRATEGY_PARAMS_FIELD_NUMBER: _ClassVar[int]
strategy_params: _descriptor.FieldDescriptor

class StrategyParams(_message.Message):
    __slots__ = ("density", "majority_sign_method", "seed")
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    MAJORITY_SIGN_METHOD_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    density: bool
    majority_sign_method: bool
    seed: bool
    def __init__(self, density: _Optional[bool] = ..., majority_sign_method: _Optional[bool] = ..., seed: _Optional[bool] = ...) -> None: ...

class AdapterRef(_message.Message):
    __slots__ = ("id", "source", "revision", "weight")
    ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    id: str
    source: AdapterSource
    revision: str
    weight: float
    def __init__(self, id: _Optional[str] = ..., source: _Optional[_Union[AdapterSource, str]] = ..., revision: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class MergeSpec(_message.Message):
    __slots__ = ("adapters", "merge_strategy", "density", "majority_sign_method", "seed", "space", "target_rank", "dtype", "max_rank", "ids", "weights")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    MERGE_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    MAJORITY_SIGN_METHOD_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    TARGET_RANK_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_RANK_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterRef]
    merge_strategy: MergeStrategy
    density: float
    majority_sign_method: MajoritySignMethod
    seed: int
    space: MergeSpace
    target_rank: int
    dtype: Dtype
    max_rank: int
    ids: _containers.RepeatedScalarFieldContainer[str]
    weights: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterRef, _Mapping]]] = ..., merge_strategy: _Optional[_Union[MergeStrategy, str]] = ..., density: _Optional[float] = ..., majority_sign_method: _Optional[_Union[MajoritySignMethod, str]] = ..., seed: _Optional[int] = ..., space: _Optional[_Union[MergeSpace, str]] = ..., target_rank: _Optional[int] = ..., dtype: _Optional[_Union[Dtype, str]] = ..., max_rank: _Optional[int] = ..., ids: _Optional[_Iterable[str]] = ..., weights: _Optional[_Iterable[float]] = ...) -> None: ...

class MergeRequest(_message.Message):
    __slots__ = ("spec", "resume_offset", "expected_merge_key", "interference")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    RESUME_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_MERGE_KEY_FIELD_NUMBER: _ClassVar[int]
    INTERFERENCE_FIELD_NUMBER: _ClassVar[int]
    spec: MergeSpec
    resume_offset: int
    expected_merge_key: str
    interference: bool
    def __init__(self, spec: _Optional[_Union[MergeSpec, _Mapping]] = ..., resume_offset: _Optional[int] = ..., expected_merge_key: _Optional[str] = ..., interference: _Optional[bool] = ...) -> None: ...

class ModuleStats(_message.Message):
    __slots__ = ("name", "rank", "relative_error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    rank: int
    relative_error: float
    def __init__(self, name: _Optional[str] = ..., rank: _Optional[int] = ..., relative_error: _Optional[float] = ...) -> None: ...

class MergeHeader(_message.Message):
    __slots__ = ("merge_key", "adapter_config_json", "total_bytes", "sha256", "rank", "modules", "cache_hit", "build_seconds", "base_model", "offset", "file_name")
    MERGE_KEY_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    BUILD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    merge_key: str
    adapter_config_json: str
    total_bytes: int
    sha256: str
    rank: int
    modules: _containers.RepeatedCompositeFieldContainer[ModuleStats]
    cache_hit: bool
    build_seconds: float
    base_model: str
    offset: int
    file_name: str
    def __init__(self, merge_key: _Optional[str] = ..., adapter_config_json: _Optional[str] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., rank: _Optional[int] = ..., modules: _Optional[_Iterable[_Union[ModuleStats, _Mapping]]] = ..., cache_hit: _Optional[bool] = ..., build_seconds: _Optional[float] = ..., base_model: _Optional[str] = ..., offset: _Optional[int] = ..., file_name: _Optional[str] = ...) -> None: ...

class MergeProgress(_message.Message):
    __slots__ = ("stage", "done", "total")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    stage: str
    done: int
    total: int
    def __init__(self, stage: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class DataChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class MergeTrailer(_message.Message):
    __slots__ = ("total_bytes", "sha256")
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    total_bytes: int
    sha256: str
    def __init__(self, total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class MergeChunk(_message.Message):
    __slots__ = ("progress", "header", "data", "trailer")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    progress: MergeProgress
    header: MergeHeader
    data: DataChunk
    trailer: MergeTrailer
    def __init__(self, progress: _Optional[_Union[MergeProgress, _Mapping]] = ..., header: _Optional[_Union[MergeHeader, _Mapping]] = ..., data: _Optional[_Union[DataChunk, _Mapping]] = ..., trailer: _Optional[_Union[MergeTrailer, _Mapping]] = ...) -> None: ...

class ResolvedAdapter(_message.Message):
    __slots__ = ("id", "source", "revision", "digest", "weight", "rank", "alpha", "use_rslora", "base_model", "target_modules")
    ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    USE_RSLORA_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    id: str
    source: AdapterSource
    revision: str
    digest: str
    weight: float
    rank: int
    alpha: float
    use_rslora: bool
    base_model: str
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., source: _Optional[_Union[AdapterSource, str]] = ..., revision: _Optional[str] = ..., digest: _Optional[str] = ..., weight: _Optional[float] = ..., rank: _Optional[int] = ..., alpha: _Optional[float] = ..., use_rslora: _Optional[bool] = ..., base_model: _Optional[str] = ..., target_modules: _Optional[_Iterable[str]] = ...) -> None: ...

class PlanResponse(_message.Message):
    __slots__ = ("merge_key", "rank", "estimated_bytes", "cached", "adapters", "base_model", "effective_spec", "interference", "estimated_build_seconds")
    MERGE_KEY_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_SPEC_FIELD_NUMBER: _ClassVar[int]
    INTERFERENCE_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_BUILD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    merge_key: str
    rank: int
    estimated_bytes: int
    cached: bool
    adapters: _containers.RepeatedCompositeFieldContainer[ResolvedAdapter]
    base_model: str
    effective_spec: MergeSpec
    interference: InterferenceReport
    estimated_build_seconds: float
    def __init__(self, merge_key: _Optional[str] = ..., rank: _Optional[int] = ..., estimated_bytes: _Optional[int] = ..., cached: _Optional[bool] = ..., adapters: _Optional[_Iterable[_Union[ResolvedAdapter, _Mapping]]] = ..., base_model: _Optional[str] = ..., effective_spec: _Optional[_Union[MergeSpec, _Mapping]] = ..., interference: _Optional[_Union[InterferenceReport, _Mapping]] = ..., estimated_build_seconds: _Optional[float] = ...) -> None: ...

class InterferenceStats(_message.Message):
    __slots__ = ("module", "cosine", "norm_ratio", "sign_conflict", "top_overlap")
    MODULE_FIELD_NUMBER: _ClassVar[int]
    COSINE_FIELD_NUMBER: _ClassVar[int]
    NORM_RATIO_FIELD_NUMBER: _ClassVar[int]
    SIGN_CONFLICT_FIELD_NUMBER: _ClassVar[int]
    TOP_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    module: str
    cosine: float
    norm_ratio: float
    sign_conflict: float
    top_overlap: float
    def __init__(self, module: _Optional[str] = ..., cosine: _Optional[float] = ..., norm_ratio: _Optional[float] = ..., sign_conflict: _Optional[float] = ..., top_overlap: _Optional[float] = ...) -> None: ...

class InterferencePair(_message.Message):
    __slots__ = ("first", "second", "overall", "modules")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    SECOND_FIELD_NUMBER: _ClassVar[int]
    OVERALL_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    first: int
    second: int
    overall: InterferenceStats
    modules: _containers.RepeatedCompositeFieldContainer[InterferenceStats]
    def __init__(self, first: _Optional[int] = ..., second: _Optional[int] = ..., overall: _Optional[_Union[InterferenceStats, _Mapping]] = ..., modules: _Optional[_Iterable[_Union[InterferenceStats, _Mapping]]] = ...) -> None: ...

class InterferenceReport(_message.Message):
    __slots__ = ("pairs", "adapter_norms", "density", "max_sampled_entries", "seconds")
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_NORMS_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLED_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    pairs: _containers.RepeatedCompositeFieldContainer[InterferencePair]
    adapter_norms: _containers.RepeatedScalarFieldContainer[float]
    density: float
    max_sampled_entries: int
    seconds: float
    def __init__(self, pairs: _Optional[_Iterable[_Union[InterferencePair, _Mapping]]] = ..., adapter_norms: _Optional[_Iterable[float]] = ..., density: _Optional[float] = ..., max_sampled_entries: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class ListCachedRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CachedMerge(_message.Message):
    __slots__ = ("merge_key", "bytes", "in_memory", "on_disk", "rank", "base_model", "hits")
    MERGE_KEY_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    IN_MEMORY_FIELD_NUMBER: _ClassVar[int]
    ON_DISK_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    merge_key: str
    bytes: int
    in_memory: bool
    on_disk: bool
    rank: int
    base_model: str
    hits: int
    def __init__(self, merge_key: _Optional[str] = ..., bytes: _Optional[int] = ..., in_memory: _Optional[bool] = ..., on_disk: _Optional[bool] = ..., rank: _Optional[int] = ..., base_model: _Optional[str] = ..., hits: _Optional[int] = ...) -> None: ...

class ListCachedResponse(_message.Message):
    __slots__ = ("entries", "memory_bytes", "memory_limit_bytes", "disk_bytes", "disk_limit_bytes")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[CachedMerge]
    memory_bytes: int
    memory_limit_bytes: int
    disk_bytes: int
    disk_limit_bytes: int
    def __init__(self, entries: _Optional[_Iterable[_Union[CachedMerge, _Mapping]]] = ..., memory_bytes: _Optional[int] = ..., memory_limit_bytes: _Optional[int] = ..., disk_bytes: _Optional[int] = ..., disk_limit_bytes: _Optional[int] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("merge_key", "all")
    MERGE_KEY_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    merge_key: str
    all: bool
    def __init__(self, merge_key: _Optional[str] = ..., all: _Optional[bool] = ...) -> None: ...

class EvictResponse(_message.Message):
    __slots__ = ("evicted",)
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    evicted: int
    def __init__(self, evicted: _Optional[int] = ...) -> None: ...
