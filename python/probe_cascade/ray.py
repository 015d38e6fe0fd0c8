"""Scoring recordings on a Ray cluster, into the Parquet dataset ``run --parquet`` writes.

    import ray, probe_cascade.ray as pcr
    ray.init()                                   # or ray.init(address="auto") on a cluster
    ds = pcr.read_recordings("runs/")            # one row per recording: name and file
    totals = pcr.score(ds, "pack/", "out/", config="offline", actors=2)

``score`` maps the dataset's batches through :class:`Scorer`, a callable class: each Ray actor
holds one ``probe_cascade.Runtime`` and scores its batch's recordings as concurrent sessions
(the runtime batches their tokens, as it does any sessions'). Recordings stay whole: a batch
is a list of recordings, never a slice of one. The results are written by a Ray datasink as
the tables of :data:`probe_cascade.dataset.TABLES`, in the schema ``run --parquet`` writes
(it is made once, in Rust), with a ``manifest.json``.

Memory is bounded by the arguments: ``actors`` runtimes, each with ``cache_bytes`` of probe
cache (default: the config's ``runtime.cache_bytes``) and at most ``batch_size`` recordings in
memory; Ray streams batches through (no dataset is materialized).

On a cluster, the pack must be readable by every node. With ``ship_pack=True`` (the default
when the cluster has more than one node) the driver puts the pack's files in Ray's object store
once, and the first actor on each node writes them to that node's
``~/.cache/probe-cascade/ray-packs/<crc>/``, so the pack is fetched and written once per node,
and the node's actors read it from local disk (sharing the page cache).

Needs ``ray[data]`` and pyarrow (``pip install 'probe-cascade[ray]'``).
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import uuid
import zlib
from typing import Any, Optional, Union

from . import _native
from .dataset import TABLES, table

PathLike = Union[str, "os.PathLike[str]"]

#: Rows per Parquet row group, as ``run --parquet`` writes them.
ROW_GROUP_ROWS = 128 * 1024


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:  # pragma: no cover - the dev environment has it
        raise ImportError("probe_cascade.ray needs Ray Data: pip install 'probe-cascade[ray]'") from e
    return ray


def read_recordings(spec: PathLike, **from_items_kwargs: Any):
    """A Ray Dataset with one row per recording a directory or glob names (as ``run --traces``
    finds them): ``recording`` (its name), ``path`` and ``tensor`` ("" for a .npy). Actors read
    the files, so every node must see them. A dataset with a ``hidden`` column of [T, D] arrays
    (and ``recording``) works with :func:`score` too."""
    ray = _ray()
    rows = [
        {"recording": name, "path": path, "tensor": tensor or ""}
        for name, path, tensor in _native.discover_recordings(os.fspath(spec))
    ]
    return ray.data.from_items(rows, **from_items_kwargs)


def _with_cache(config: Any, cache_bytes: Optional[int]) -> Any:
    """``config`` (a preset name, a TOML path or a dict) with ``runtime.cache_bytes`` set."""
    if cache_bytes is None:
        return config
    if isinstance(config, dict):
        merged = copy.deepcopy(config)
    else:
        merged = _native.resolve_config(config)
    merged.setdefault("runtime", {})["cache_bytes"] = int(cache_bytes)
    return merged


def _pack_files(pack: PathLike) -> dict:
    root = os.fspath(pack)
    files = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            full = os.path.join(dirpath, n)
            with open(full, "rb") as f:
                files[os.path.relpath(full, root)] = f.read()
    return files


def _local_pack(pack: PathLike, shipped: Optional[list]) -> str:
    """The pack's directory on this node: ``pack`` itself, or, when it was shipped, this node's
    copy, written by the first actor here (under a file lock) and reused by the others."""
    if not shipped:
        return os.fspath(pack)
    ref, crc = shipped
    cache = os.environ.get("PROBE_CASCADE_CACHE", os.path.expanduser("~/.cache/probe-cascade"))
    target = os.path.join(cache, "ray-packs", crc)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(target, ".complete")):
            files = _ray().get(ref)
            for rel, data in files.items():
                path = os.path.join(target, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
            open(os.path.join(target, ".complete"), "w").close()
    return target


class Scorer:
    """A callable class for ``Dataset.map_batches``: one Runtime per actor, each batch's
    recordings scored as concurrent sessions. A batch has ``recording`` and either ``path`` (and
    ``tensor``) or ``hidden``; each output row is one table's rows of the batch, as Arrow IPC
    (``table``, ``ipc``), which :class:`ParquetTables` writes."""

    def __init__(
        self,
        pack: PathLike,
        config: Any = None,
        *,
        concurrency: int = 8,
        cache_bytes: Optional[int] = None,
        skip_bad_tokens: bool = False,
        shipped: Optional[list] = None,
    ):
        from . import Runtime

        self._runtime = Runtime(_local_pack(pack, shipped), _with_cache(config, cache_bytes))
        self._concurrency = concurrency
        self._skip = skip_bad_tokens

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        names = [str(n) for n in batch["recording"]]
        recordings = []
        for i, name in enumerate(names):
            if "hidden" in batch:
                source: Any = np.asarray(batch["hidden"][i], dtype=np.float32)
            elif "tensor" in batch and str(batch["tensor"][i]):
                source = (str(batch["path"][i]), str(batch["tensor"][i]))
            else:
                source = str(batch["path"][i])
            recordings.append((name, source))
        blobs = self._runtime._score_recordings(
            recordings,
            concurrency=max(1, min(self._concurrency, len(recordings))),
            skip_bad_tokens=self._skip,
        )
        return output_rows(blobs)


def output_rows(blobs: dict) -> dict:
    """``{table: IPC bytes}`` as the rows a ``map_batches`` function returns for
    :func:`ParquetTables`: one row per table, with columns ``table`` and ``ipc``."""
    import numpy as np

    return {"table": np.array(TABLES), "ipc": np.array([blobs[t] for t in TABLES], dtype=object)}


def _datasink_base():
    return _ray().data.Datasink


def ParquetTables(out_dir: PathLike, manifest: dict):  # noqa: N802 - a class factory
    """A Ray datasink writing :class:`Scorer`'s output rows as the dataset's tables: each write
    task writes one file per table (``<table>/part-<task>-<uuid>.parquet``, through a hidden
    temporary name and a rename), and the manifest is written when every task is done."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = os.fspath(out_dir)

    class _Sink(_datasink_base()):
        def on_write_start(self, schema=None) -> None:
            for t in TABLES:
                os.makedirs(os.path.join(out, t), exist_ok=True)
            _write_json(os.path.join(out, "manifest.json"), dict(manifest, complete=False))

        def write(self, blocks, ctx) -> dict:
            parts: dict = {t: [] for t in TABLES}
            for block in blocks:
                tables = block.column("table").to_pylist()
                blobs = block.column("ipc").to_pylist()
                for name, blob in zip(tables, blobs):
                    parts[name].append(blob)
            rows = {}
            tag = f"{ctx.task_idx:05d}-{uuid.uuid4().hex[:8]}"
            for t in TABLES:
                decoded = [table(b) for b in parts[t]] or [table(_native.empty_tables()[t])]
                merged = pa.concat_tables(decoded)
                final = os.path.join(out, t, f"part-{tag}.parquet")
                tmp = os.path.join(out, t, f".part-{tag}.parquet.tmp")
                pq.write_table(merged, tmp, row_group_size=ROW_GROUP_ROWS, compression="snappy")
                os.replace(tmp, final)
                rows[t] = merged.num_rows
            return rows

        def on_write_complete(self, write_result) -> None:
            totals: dict = {t: 0 for t in TABLES}
            for r in write_result.write_returns:
                for t, n in r.items():
                    totals[t] += n
            _write_json(
                os.path.join(out, "manifest.json"),
                dict(manifest, complete=True, totals={"rows": totals}),
            )

        def get_name(self) -> str:
            return "ProbeCascadeParquet"

    return _Sink()


def _write_json(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def manifest(pack: PathLike, config: Any = None, *, skip_bad_tokens: bool = False) -> dict:
    """The ``manifest.json`` of a dataset scored with ``pack`` and ``config``, for
    :func:`ParquetTables` (the config, the pack's identity, the options)."""
    m = json.loads(_native.dataset_manifest(os.fspath(pack), config, skip_bad_tokens=skip_bad_tokens))
    m["writer"] += " (probe_cascade.ray)"
    return m


def score(
    ds: Any,
    pack: PathLike,
    out_dir: PathLike,
    config: Any = None,
    *,
    actors: int = 2,
    batch_size: int = 4,
    concurrency: Optional[int] = None,
    cache_bytes: Optional[int] = None,
    skip_bad_tokens: bool = False,
    ship_pack: Union[bool, str] = "auto",
    num_cpus: float = 1,
) -> dict:
    """Scores a Dataset of recordings (:func:`read_recordings`, or rows with ``recording`` and
    ``hidden``) with ``actors`` Ray actors, ``batch_size`` recordings per batch, each batch's
    recordings as concurrent sessions (``concurrency``, default ``batch_size``), and writes the
    Parquet dataset to ``out_dir`` (which must not hold one already). Returns the row count of
    each table."""
    ray = _ray()
    out = os.fspath(out_dir)
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"{out} already holds files: choose an empty directory")
    m = manifest(pack, config, skip_bad_tokens=skip_bad_tokens)
    if ship_pack == "auto":
        ship_pack = len([n for n in ray.nodes() if n.get("Alive")]) > 1
    shipped = None
    if ship_pack:
        files = _pack_files(pack)
        crc = "%08x" % zlib.crc32(files["manifest.json"])
        shipped = [ray.put(files), crc]
    results = ds.map_batches(
        Scorer,
        fn_constructor_args=(os.fspath(pack), config),
        fn_constructor_kwargs={
            "concurrency": concurrency or batch_size,
            "cache_bytes": cache_bytes,
            "skip_bad_tokens": skip_bad_tokens,
            "shipped": shipped,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=num_cpus,
    )
    sink = ParquetTables(out, m)
    results.write_datasink(sink)
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)["totals"]["rows"]
