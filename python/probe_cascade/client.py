"""A client for `probe-cascade serve` (gRPC), with the same calls as an in-process Runtime.

    from probe_cascade import Client
    with Client("127.0.0.1:50051") as client:            # or "unix:/run/probe-cascade.sock"
        with client.session(mode="pipelined") as s:
            report = s.observe(hidden)                    # torch tensor or numpy array, 1-D
            print([d.name for d in report.top])
        reports = client.observe_batch(sessions, hidden_2d)   # one decode step, many sessions

Reports and detections have the attributes of the in-process ones (`top`, `name`, `prob`,
`logit`, `path`, counts, `stages`, `to_dict()`), so `probe_cascade.hf.monitor` takes a Client in
place of a Runtime. Errors are the package's exception classes, with `token` set where the
server names one. Needs `grpcio` and `protobuf` (the package's `client` extra).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

import grpc

from ._native import BadHiddenState, ConfigError, ProbeCascadeError, ProbeLoadError
from .v1 import probe_cascade_pb2 as pb
from .v1 import probe_cascade_pb2_grpc as pb_grpc

__all__ = [
    "Client",
    "RemoteSession",
    "RemoteReport",
    "RemoteDetection",
    "RemoteAlert",
    "RemoteProbeScore",
    "RemoteSimplexReading",
]

_STAGES = ("initial_scoring", "expansion_lookup", "loading", "new_scoring", "pruning", "sorting")


@dataclass(frozen=True)
class RemoteProbeScore:
    """One probe of a reported lens (as `probe_cascade.ProbeScore`)."""

    model_layer: int
    logit: float
    prob: float
    calibrated: Optional[float]

    def to_dict(self) -> Dict[str, Any]:
        return {"model_layer": self.model_layer, "logit": self.logit, "prob": self.prob, "calibrated": self.calibrated}


@dataclass(frozen=True)
class RemoteDetection:
    """One concept the cascade reported for a token (as `probe_cascade.Detection`)."""

    name: str
    layer: int
    prob: float
    logit: float
    path: List[str]
    concept_id: int
    probes: List[RemoteProbeScore] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        d = {"name": self.name, "layer": self.layer, "prob": self.prob, "logit": self.logit, "path": self.path}
        if self.probes:
            d["probes"] = [p.to_dict() for p in self.probes]
        return d


@dataclass(frozen=True)
class RemoteAlert:
    """A watch profile's alert from the server (as `probe_cascade.Alert`)."""

    profile: str
    concept: str
    layer: int
    watched: str
    score: float
    logit: float
    path: List[str]
    concept_id: int

    def to_dict(self) -> Dict[str, Any]:
        return {
            "profile": self.profile,
            "concept": self.concept,
            "layer": self.layer,
            "watched": self.watched,
            "score": self.score,
            "logit": self.logit,
            "path": self.path,
        }


@dataclass(frozen=True)
class RemoteSimplexReading:
    """One pole of an always-on simplex lens (as `probe_cascade.SimplexReading`)."""

    simplex: str
    pole: str
    prob: float
    logit: float
    deviation: Optional[float]

    def to_dict(self) -> Dict[str, Any]:
        return {"simplex": self.simplex, "pole": self.pole, "prob": self.prob, "logit": self.logit,
                "deviation": self.deviation}


@dataclass(frozen=True)
class RemoteReport:
    """What the server's cascade found for one token (as `probe_cascade.Report`)."""

    token: int
    top: List[RemoteDetection]
    children: int
    loaded: int
    unloaded: int
    skipped_by_cap: int
    scored: int
    active: int
    stages: Dict[str, float]
    elapsed_us: float
    in_flight: List[str] = field(default_factory=list)
    failed_loads: List[str] = field(default_factory=list)
    alerts: List[RemoteAlert] = field(default_factory=list)
    simplex: List[RemoteSimplexReading] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "token": self.token,
            "top": [d.to_dict() for d in self.top],
            "children": self.children,
            "loaded": self.loaded,
            "unloaded": self.unloaded,
            "skipped_by_cap": self.skipped_by_cap,
            "scored": self.scored,
            "active": self.active,
            "stages": dict(self.stages),
            "elapsed_us": self.elapsed_us,
            "in_flight": list(self.in_flight),
            "failed_loads": list(self.failed_loads),
            "alerts": [a.to_dict() for a in self.alerts],
            "simplex": [x.to_dict() for x in self.simplex],
        }

    def _repr_html_(self) -> str:
        from .viewer import report_html

        return report_html(self.to_dict())


def _raise(e: ProbeCascadeError, token: Optional[int] = None, position: Optional[int] = None) -> ProbeCascadeError:
    e.token = token
    e.position = position
    e.key = None
    e.path = None
    return e


def _status_error(err: grpc.RpcError, what: str) -> ProbeCascadeError:
    """A gRPC status as the package's exception: limits, auth and bad options named."""
    code = err.code() if hasattr(err, "code") else None
    detail = err.details() if hasattr(err, "details") else str(err)
    name = code.name if code is not None else "UNKNOWN"
    message = f"{what}: {detail} (gRPC {name})"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return _raise(ConfigError(message))
    return _raise(ProbeCascadeError(message))


def _encode(hidden: Any, where: str) -> pb.HiddenState:
    """One hidden state (1-D torch tensor or numpy array) as raw little-endian bytes."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of the package
        torch = None
    if torch is not None and isinstance(hidden, torch.Tensor):
        t = hidden.detach()
        if t.dim() != 1:
            raise _raise(BadHiddenState(f"{where}: a hidden state is 1-D, this tensor has shape {tuple(t.shape)}"))
        t = t.to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            return pb.HiddenState(dtype=pb.DTYPE_BF16, len=t.numel(), data=t.view(torch.int16).numpy().tobytes())
        if t.dtype == torch.float16:
            return pb.HiddenState(dtype=pb.DTYPE_F16, len=t.numel(), data=t.numpy().astype("<f2").tobytes())
        if not t.dtype.is_floating_point:
            raise _raise(BadHiddenState(f"{where}: a hidden state is floating point, this tensor is {t.dtype}"))
        a = t.to(torch.float32).numpy()
    else:
        a = np.asarray(hidden)
        if a.ndim != 1:
            raise _raise(BadHiddenState(f"{where}: a hidden state is 1-D, this array has shape {a.shape}"))
        if a.dtype == np.float16:
            return pb.HiddenState(dtype=pb.DTYPE_F16, len=a.size, data=a.astype("<f2").tobytes())
        if a.dtype.kind != "f":
            raise _raise(BadHiddenState(f"{where}: a hidden state is floating point, this array is {a.dtype}"))
    a = np.ascontiguousarray(a, dtype="<f4")
    return pb.HiddenState(dtype=pb.DTYPE_F32, len=a.size, data=a.tobytes())


def _encode_token(hidden: Any, where: str) -> Any:
    """One token: a HiddenState, or for a dict {model_layer: state} a list of LayerStates."""
    if isinstance(hidden, dict):
        return [pb.LayerState(model_layer=int(m), hidden=_encode(h, f"{where}: model layer {m}")) for m, h in hidden.items()]
    return _encode(hidden, where)


def _rows(hidden: Any, n: int) -> List[Any]:
    if isinstance(hidden, dict):
        # {model_layer: [sessions, D]}: per session, {model_layer: its row}.
        per_layer = {m: _rows(rows, n) for m, rows in hidden.items()}
        return [{m: rows[i] for m, rows in per_layer.items()} for i in range(n)]
    if isinstance(hidden, (list, tuple)):
        rows = list(hidden)
    else:
        shape = tuple(getattr(hidden, "shape", ()))
        if len(shape) != 2:
            raise _raise(BadHiddenState(f"observe_batch: hidden is a [sessions, D] batch or a list, not shape {shape}"))
        rows = [hidden[i] for i in range(shape[0])]
    if len(rows) != n:
        raise _raise(BadHiddenState(f"observe_batch: {n} sessions but {len(rows)} hidden states"))
    return rows


class RemoteSession:
    """One stream of tokens on the server (opened by `Client.session`)."""

    def __init__(self, client: "Client", session_id: int) -> None:
        self._client = client
        self.id = session_id
        self.closed = False

    def observe(self, hidden: Any, text: Optional[str] = None) -> RemoteReport:
        """One token: a 1-D state, or {model_layer: 1-D state} for a pack of several layers.
        `text`, the token's text where the caller has it, goes to the server's live viewers."""
        texts = None if text is None else [text]
        return self._client._batch([self], [_encode_token(hidden, "observe")], errors="raise", texts=texts)[0]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._client._call("CloseSession", pb.CloseSessionRequest(session_id=self.id))
        except ProbeCascadeError:
            # Gone already (idle, drained, the server restarted): nothing left to free.
            pass

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, *args: object) -> bool:
        self.close()
        return False

    def __repr__(self) -> str:
        return f"RemoteSession(id={self.id}, closed={self.closed})"


class Client:
    """A connection to `probe-cascade serve`.

    address: "host:port" or "unix:/path/to.sock". token: the server's bearer token, if it
    requires one. timeout: seconds per call (None: none).
    """

    def __init__(self, address: str, *, token: Optional[str] = None, timeout: Optional[float] = 30.0) -> None:
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        if address.startswith("unix:"):
            # gRPC would send the socket path as :authority, which is not a valid authority
            # (the server's HTTP/2 stack resets such streams).
            options.append(("grpc.default_authority", "localhost"))
        self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.ProbeCascadeStub(self._channel)
        self.closed = False
        info = self._call("Info", pb.InfoRequest())
        self.hidden_dim: int = info.hidden_dim
        self.server_version: str = info.version
        self.limits: Dict[str, int] = {
            "max_message_bytes": info.max_message_bytes,
            "max_sessions": info.max_sessions,
            "stream_queue": info.stream_queue,
            "request_deadline_ms": info.request_deadline_ms,
            "max_batch_items": info.max_batch_items,
        }
        self._concepts = {c.id: c for c in info.concepts}
        self._paths: Dict[int, List[str]] = {}

    @property
    def concepts(self) -> int:
        return len(self._concepts)

    def _call(self, method: str, request: Any) -> Any:
        if self.closed:
            raise _raise(ProbeCascadeError(f"{method}: this Client is closed"))
        try:
            return getattr(self._stub, method)(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as e:
            raise _status_error(e, f"{method} on {self.address}") from None

    def _path(self, concept_id: int) -> List[str]:
        """Names from a root down to the concept, following first parents (as in-process)."""
        path = self._paths.get(concept_id)
        if path is None:
            path, at = [], concept_id
            for _ in range(len(self._concepts) + 1):
                c = self._concepts.get(at)
                if c is None:
                    break
                path.append(c.name)
                if not c.parents:
                    break
                at = c.parents[0]
            path.reverse()
            self._paths[concept_id] = path
        return path

    def _report(self, r: Any) -> RemoteReport:
        top = [
            RemoteDetection(
                d.name,
                d.layer,
                d.prob,
                d.logit,
                self._path(d.concept_id),
                d.concept_id,
                [
                    RemoteProbeScore(p.model_layer, p.logit, p.prob, p.calibrated if p.HasField("calibrated") else None)
                    for p in d.probes
                ],
            )
            for d in r.top
        ]
        stages = {name: getattr(r.stages, name + "_ns") / 1e6 for name in _STAGES}
        return RemoteReport(
            token=r.token,
            top=top,
            children=r.children,
            loaded=r.loaded,
            unloaded=r.unloaded,
            skipped_by_cap=r.skipped_by_cap,
            scored=r.scored,
            active=r.active,
            stages=stages,
            elapsed_us=r.elapsed_ns / 1e3,
            in_flight=list(r.in_flight),
            failed_loads=list(r.failed_loads),
            alerts=[
                RemoteAlert(a.profile, a.concept, a.layer, a.watched, a.score, a.logit, self._path(a.concept_id),
                            a.concept_id)
                for a in r.alerts
            ],
            simplex=[
                RemoteSimplexReading(x.simplex, x.pole, x.prob, x.logit, x.deviation if x.HasField("deviation") else None)
                for x in r.simplex
            ],
        )

    @staticmethod
    def _error(e: Any, position: Optional[int]) -> ProbeCascadeError:
        token = e.token if e.HasField("token") else None
        cls = {pb.ERROR_KIND_BAD_HIDDEN: BadHiddenState, pb.ERROR_KIND_PROBE_LOAD: ProbeLoadError}.get(
            e.kind, ProbeCascadeError
        )
        return _raise(cls(e.message), token=token, position=position)

    def pack_info(self) -> Dict[str, Any]:
        """The pack as headspace's `GET /v1/pack` describes it, as `Runtime.pack_info` gives it."""
        r = self._call("PackInfo", pb.PackInfoRequest())
        return {
            "model": r.model if r.HasField("model") else None,
            "pack": r.pack,
            "total_lenses": r.total_lenses,
            "calibrated": r.calibrated,
            "alert_threshold": r.alert_threshold,
            "fields": list(r.fields),
            "concepts": {
                name: {"label": c.label, "level": c.level, "parent": c.parent if c.HasField("parent") else None,
                       "description": c.description}
                for name, c in sorted(r.concepts.items())
            },
            "watch": [{"name": w.name, "threshold": w.threshold} for w in r.watch],
        }

    def session(
        self,
        *,
        mode: Optional[str] = None,
        latency_budget_us: Optional[int] = None,
        label: str = "",
        **cascade: Any,
    ) -> RemoteSession:
        """Opens a session: `mode`, `latency_budget_us` and any [cascade] key override the
        server's config for it, as `Runtime.session` does."""
        options = pb.SessionOptions(label=label, cascade_json=json.dumps(cascade) if cascade else "")
        if mode is not None:
            options.mode = mode
        if latency_budget_us is not None:
            options.latency_budget_us = latency_budget_us
        opened = self._call("OpenSession", options)
        return RemoteSession(self, opened.session_id)

    def observe_batch(
        self,
        sessions: Sequence[RemoteSession],
        hidden: Any,
        *,
        errors: str = "raise",
        texts: Optional[Sequence[Optional[str]]] = None,
    ) -> List[Union[RemoteReport, ProbeCascadeError]]:
        """One decode step of many sessions, in one call: `hidden` is a [len(sessions), D]
        tensor or array, or a list of 1-D ones; for a pack of several model layers, a dict
        {model_layer: that}. errors="return" puts each failed item's exception in its place
        instead of raising the first. `texts`, one per session (or None), are the tokens' texts
        for the server's live viewers."""
        if errors not in ("raise", "return"):
            raise ValueError(f'errors must be "raise" or "return", not {errors!r}')
        if texts is not None and len(texts) != len(sessions):
            raise ValueError(f"texts has {len(texts)} entries for {len(sessions)} sessions")
        rows = _rows(hidden, len(sessions))
        encoded = [_encode_token(h, f"observe_batch: position {i}") for i, h in enumerate(rows)]
        return self._batch(sessions, encoded, errors=errors, texts=texts)

    def _batch(
        self,
        sessions: Sequence[RemoteSession],
        encoded: List[Any],
        errors: str,
        texts: Optional[Sequence[Optional[str]]] = None,
    ) -> List[Any]:
        for s in sessions:
            if s.closed:
                raise _raise(ProbeCascadeError(f"session {s.id} is closed"))
        items = []
        for i, (s, h) in enumerate(zip(sessions, encoded)):
            item = pb.BatchItem(session_id=s.id, layers=h) if isinstance(h, list) else pb.BatchItem(session_id=s.id, hidden=h)
            if texts is not None and texts[i] is not None:
                item.text = texts[i]
            items.append(item)
        request = pb.BatchRequest(items=items)
        response = self._call("ObserveBatch", request)
        out: List[Any] = []
        for i, r in enumerate(response.results):
            if r.WhichOneof("outcome") == "report":
                out.append(self._report(r.report))
                continue
            err = self._error(r.error, i if len(sessions) > 1 else None)
            if errors == "raise":
                raise err
            out.append(err)
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *args: object) -> bool:
        self.close()
        return False

    def __repr__(self) -> str:
        return f"Client({self.address!r}, concepts={self.concepts}, hidden_dim={self.hidden_dim})"
