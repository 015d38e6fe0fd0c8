"""Many recordings, scored as sessions of one Runtime, as Arrow tables.

    import probe_cascade, probe_cascade.dataset as pds
    rt = probe_cascade.Runtime("pack/", config="offline")
    tables = pds.score(rt, pds.find("runs/*.npy"), concurrency=8)
    tables["detections"].to_pandas()

The tables and their schema are the ones ``probe-cascade run --traces ... --parquet OUT`` writes
(detections, tokens, alerts, simplex, failures; the schema is made in Rust, once, and arrives
here as Arrow IPC). ``probe_cascade.ray`` runs the same scoring in Ray actors. ``read(OUT)``
reads a dataset written by either.

A recording is one sequence: it is never split, and it is scored whole or listed in
``failures`` (a wrong width, a NaN; with ``skip_bad_tokens=True`` a bad token is a failure row
and the rest of its recording is kept). Needs pyarrow (``pip install probe-cascade[dataset]``).
"""

from __future__ import annotations

import collections
import os
from typing import Any, Iterable, Sequence, Tuple, Union

from . import _native

#: The dataset's tables, in the order they are written.
TABLES = ("detections", "tokens", "alerts", "simplex", "failures")

#: A recording's states: a ``.npy`` path, a ``(safetensors path, tensor name)`` pair, or a
#: [T, D] array (numpy or torch).
Source = Union[str, "os.PathLike[str]", Tuple[str, str], Any]


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
    except ImportError as e:  # pragma: no cover - the dev environment has it
        raise ImportError(
            "probe_cascade.dataset needs pyarrow: pip install 'probe-cascade[dataset]'"
        ) from e
    return pyarrow


def find(spec: Union[str, "os.PathLike[str]"]) -> list[tuple[str, Source]]:
    """The recordings a directory (its .npy and .safetensors files) or a glob names, sorted by
    name, as ``(name, source)`` pairs: what ``run --traces`` scores. A .npy is named by its file
    stem; each tensor of a safetensors file is ``<stem>/<tensor>``."""
    out: list[tuple[str, Source]] = []
    for name, path, tensor in _native.discover_recordings(os.fspath(spec)):
        out.append((name, path if tensor is None else (path, tensor)))
    return out


def table(blob: bytes):
    """One table's Arrow IPC stream (what the runtime returns) as a pyarrow.Table."""
    return _pyarrow().ipc.open_stream(blob).read_all()


def from_ipc(blobs: dict) -> dict:
    """``{table: IPC bytes}`` (what the runtime returns) as ``{table: pyarrow.Table}``."""
    return {name: table(blobs[name]) for name in TABLES}


def from_reports(reports: Any) -> dict:
    """Reports already made (a ``hf.monitor``'s, a session's) as the dataset's tables:
    ``reports`` is ``{recording: [Report, ...]}`` or a list of ``(recording, reports)``, each
    recording's reports in token order. In-process reports only (a ``Client``'s live in the
    server)."""
    items = list(reports.items()) if isinstance(reports, dict) else list(reports)
    return from_ipc(_native.report_tables([(str(n), list(r)) for n, r in items]))


def score(
    runtime: Any,
    recordings: Iterable[tuple[str, Source]],
    *,
    concurrency: int = 8,
    skip_bad_tokens: bool = False,
) -> dict:
    """Scores ``recordings`` (``(name, source)`` pairs; names unique) on ``runtime``, each its
    own session, ``concurrency`` at once (at most the config's ``runtime.max_sessions``).
    Returns ``{table: pyarrow.Table}`` for every table of :data:`TABLES`."""
    recordings = list(recordings)
    counts = collections.Counter(n for n, _ in recordings)
    dup = next((n for n, c in counts.items() if c > 1), None)
    if dup is not None:
        raise ValueError(f"two recordings are named {dup!r}: names key every table's rows")
    blobs = runtime._score_recordings(
        recordings, concurrency=concurrency, skip_bad_tokens=skip_bad_tokens
    )
    return from_ipc(blobs)


def read(out_dir: Union[str, "os.PathLike[str]"], tables: Sequence[str] = TABLES) -> dict:
    """A dataset directory (from ``run --parquet`` or ``probe_cascade.ray.score``) as
    ``{table: pyarrow.Table}``, each sorted by recording and token (and rank)."""
    pa = _pyarrow()
    import pyarrow.parquet as pq

    out = {}
    for name in tables:
        d = os.path.join(os.fspath(out_dir), name)
        if not os.path.isdir(d):
            continue
        files = sorted(f for f in os.listdir(d) if f.endswith(".parquet") and not f.startswith("."))
        if not files:
            continue
        t = pa.concat_tables(pq.read_table(os.path.join(d, f)) for f in files)
        keys = [k for k in ("recording", "token", "rank") if k in t.column_names]
        out[name] = t.sort_by([(k, "ascending") for k in keys])
    return out
