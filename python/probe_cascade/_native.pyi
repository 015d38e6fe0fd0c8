"""Type stubs for the Rust half of probe_cascade (editor support; see the Rust sources in
python/src/ for what each does)."""

from os import PathLike
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

Hidden = Union[torch.Tensor, np.ndarray]
Config = Union[str, PathLike[str], Mapping[str, Any], None]

CONFIG_PRESETS: List[str]
__version__: str

class ProbeCascadeError(Exception):
    token: Optional[int]
    position: Optional[int]
    key: Optional[str]
    path: Optional[str]

class BadHiddenState(ProbeCascadeError): ...
class ProbeLoadError(ProbeCascadeError): ...
class ConfigError(ProbeCascadeError): ...

class ProbeScore:
    model_layer: int
    logit: float
    prob: float
    calibrated: Optional[float]
    def to_dict(self) -> Dict[str, Any]: ...

class Detection:
    name: str
    layer: int
    prob: float
    logit: float
    path: List[str]
    probes: List[ProbeScore]
    def to_dict(self) -> Dict[str, Any]: ...

class Alert:
    profile: str
    concept: str
    layer: int
    watched: str
    score: float
    logit: float
    path: List[str]
    def to_dict(self) -> Dict[str, Any]: ...

class SimplexReading:
    simplex: str
    pole: str
    prob: float
    logit: float
    deviation: Optional[float]
    def to_dict(self) -> Dict[str, Any]: ...

class Report:
    token: int
    top: List[Detection]
    children: int
    loaded: int
    unloaded: int
    skipped_by_cap: int
    scored: int
    active: int
    stages: Dict[str, float]
    elapsed_us: float
    in_flight: List[str]
    failed_loads: List[str]
    alerts: List[Alert]
    simplex: List[SimplexReading]
    def to_dict(self) -> Dict[str, Any]: ...
    def _repr_html_(self) -> str: ...

class Session:
    @property
    def id(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def observe(self, hidden: Union[Hidden, Dict[int, Hidden], Sequence[Hidden]]) -> Report: ...
    def active(self) -> List[str]: ...
    def settle(self) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> "Session": ...
    def __exit__(self, *args: object) -> bool: ...

class Runtime:
    def __init__(self, pack_dir: Union[str, PathLike[str]], config: Config = None) -> None: ...
    def session(
        self,
        *,
        mode: Literal["exact", "pipelined"] = ...,
        latency_budget_us: int = ...,
        **cascade: Any,
    ) -> Session: ...
    def observe_batch(
        self,
        sessions: Sequence[Session],
        hidden: Union[Hidden, Sequence[Hidden]],
        *,
        errors: Literal["raise", "return"] = "raise",
    ) -> List[Union[Report, ProbeCascadeError]]: ...
    def stats(self) -> Dict[str, Any]: ...
    def pack_info(self) -> Dict[str, Any]: ...
    def _pack_view(self) -> str: ...
    def _score_recordings(
        self,
        recordings: Sequence[Tuple[str, Any]],
        *,
        concurrency: int = 8,
        skip_bad_tokens: bool = False,
    ) -> Dict[str, bytes]: ...
    def close(self) -> None: ...
    def __enter__(self) -> "Runtime": ...
    def __exit__(self, *args: object) -> bool: ...
    @property
    def store_device(self) -> Optional[str]: ...
    @property
    def hidden_dim(self) -> int: ...
    @property
    def concepts(self) -> int: ...
    @property
    def pack_dir(self) -> str: ...
    @property
    def config(self) -> Dict[str, Any]: ...
    @property
    def config_source(self) -> str: ...
    @property
    def open_sessions(self) -> int: ...
    @property
    def closed(self) -> bool: ...

def cpu_info() -> str: ...
def viewer_page(title: str, data: str) -> str: ...
def discover_recordings(spec: str) -> List[Tuple[str, str, Optional[str]]]: ...
def empty_tables() -> Dict[str, bytes]: ...
def report_tables(items: Sequence[Tuple[str, Sequence[Report]]]) -> Dict[str, bytes]: ...
def dataset_manifest(
    pack_dir: Union[str, PathLike[str]], config: Config = None, *, skip_bad_tokens: bool = False
) -> str: ...
def resolve_config(config: Config = None) -> Dict[str, Any]: ...
def inspect(dir: str) -> Dict[str, Any]: ...
def concepts(dir: str) -> List[Dict[str, Any]]: ...
def verify(dir: str, raise_on_defect: bool = False) -> List[str]: ...
def import_hatcat(
    hierarchy_dir: str,
    lenses_dir: str,
    out: str,
    *,
    dtype: str = "f32",
    skip_bad: bool = False,
    probes_per_shard: int = 256,
) -> str: ...
def import_headspace(dir: str, out: str, *, dtype: str = "f32", probes_per_shard: int = 256) -> str: ...
def write(
    out: str,
    concepts: Sequence[Tuple[str, int, Sequence[int]]],
    weights: Mapping[str, Any],
    *,
    dtype: str = "f32",
    input_normalization: str = "none",
    probes_per_shard: int = 256,
    probes: Optional[Sequence[Sequence[Tuple[int, Optional[Sequence[float]]]]]] = None,
    concept_calibration: Optional[Sequence[Optional[Mapping[str, float]]]] = None,
) -> int: ...
def headspace_trace(runs: List[Dict[str, Any]], model: Optional[str] = None, top: int = 8) -> str: ...
