"""Many recordings as a Parquet dataset: `probe-cascade run --traces --parquet` (one process),
`probe_cascade.dataset.score` (in process) and `probe_cascade.ray.score` (a local Ray cluster,
`ray.init(num_cpus=2)`) give the same rows, bit for bit for logits and scores, whatever the
recordings' order and the batch sizes; bad recordings are `failures` rows and the rest go on.
The output is read back with pyarrow and DuckDB."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from conftest import EXACT, cli

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
duckdb = pytest.importorskip("duckdb")

import probe_cascade as pc  # noqa: E402
import probe_cascade.dataset as pds  # noqa: E402

FLOATS = ("prob", "logit", "score", "deviation")


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """A tiny pack and a directory of recordings: seven busy .npy traces of 40 to 160 tokens, a
    safetensors file of two, one with a NaN at token 9 and one of the wrong width."""
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("recordings")
    pack = d / "pack"
    cli("pack", "synth", "--preset", "tiny", "--out", pack)
    recs = d / "recs"
    recs.mkdir()
    for i in range(7):
        cli("trace", "synth", "--preset", "busy", "--pack", pack, "--tokens", 40 + 20 * i, "--seed", i, "--out", recs / f"r{i}.npy")
    r0 = np.load(recs / "r0.npy")
    save_file({"first": r0[:25].copy(), "second": np.load(recs / "r1.npy")[5:35].copy()}, recs / "pair.safetensors")
    bad = r0[:20].copy()
    bad[9, 3] = np.nan
    np.save(recs / "nan.npy", bad)
    np.save(recs / "narrow.npy", np.zeros((4, 7), np.float32))
    out = d / "cli"
    printed = cli("run", "--config", EXACT, "--pack", pack, "--traces", recs, "--parquet", out, "--concurrency", "4")
    return {"dir": d, "pack": pack, "recs": recs, "cli": out, "printed": printed}


def rows(tables: dict) -> dict:
    """Each table's rows as sorted tuples (floats by their f32 bits), the wall-time `ms` left out."""
    out = {}
    for name, t in tables.items():
        cols = []
        for c in t.column_names:
            if c == "ms":
                continue
            col = t.column(c)
            if c in FLOATS:
                arr = col.to_numpy(zero_copy_only=False)
                bits = np.where(np.isnan(arr), 0xFFFFFFFF, arr.astype(np.float32).view(np.uint32).astype(np.int64))
                cols.append([int(b) for b in bits])
            else:
                cols.append([json.dumps(v, sort_keys=True) for v in col.to_pylist()])
        out[name] = sorted(zip(*cols)) if cols else []
    return out


def test_run_parquet_writes_every_table_and_names_bad_recordings_in_failures(recordings):
    t = pds.read(recordings["cli"])
    assert set(t) == set(pds.TABLES)
    names = set(t["tokens"].column("recording").to_pylist())
    assert names == {f"r{i}" for i in range(7)} | {"pair/first", "pair/second"}
    assert t["tokens"].num_rows == sum(40 + 20 * i for i in range(7)) + 25 + 30
    failures = {r["recording"]: r for r in t["failures"].to_pylist()}
    assert set(failures) == {"nan", "narrow"}
    assert failures["nan"]["token"] == 9 and "NaN" in failures["nan"]["error"]
    assert failures["narrow"]["token"] is None and "7 values per token" in failures["narrow"]["error"]
    manifest = json.loads((recordings["cli"] / "manifest.json").read_text())
    assert manifest["complete"] and manifest["totals"]["recordings"] == 11 and manifest["totals"]["failed"] == 2
    # DuckDB reads it as it is: the strongest concept of each token is rank 1.
    con = duckdb.connect()
    top = con.execute(
        f"SELECT count(*), count(DISTINCT recording) FROM read_parquet('{recordings['cli']}/detections/*.parquet') WHERE rank = 1"
    ).fetchone()
    assert top == (t["tokens"].num_rows, 9)


def test_in_process_scoring_gives_the_command_lines_rows(recordings):
    rt = pc.Runtime(recordings["pack"], EXACT)
    found = pds.find(recordings["recs"])
    # The same recordings, some as arrays, in another order.
    mixed = [(n, np.load(s) if isinstance(s, str) and n.startswith("r") else s) for n, s in reversed(found)]
    got = pds.score(rt, mixed, concurrency=3)
    assert rows(got) == rows(pds.read(recordings["cli"]))
    for name in pds.TABLES:
        assert got[name].schema == pds.read(recordings["cli"])[name].schema.remove_metadata(), name


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_ray_writes_the_same_dataset_as_run_parquet_in_any_order_and_batch_size(recordings, ray_cluster):
    import probe_cascade.ray as pcr

    want = rows(pds.read(recordings["cli"]))
    cli_schemas = {t: pq.read_schema(next((recordings["cli"] / t).glob("*.parquet"))) for t in pds.TABLES}
    # Files, three recordings a batch on two actors, the pack shipped through the object store
    # to the node's cache.
    out_a = recordings["dir"] / "ray-a"
    ds = pcr.read_recordings(recordings["recs"])
    totals = pcr.score(ds, recordings["pack"], out_a, EXACT, actors=2, batch_size=3, ship_pack=True)
    assert totals["tokens"] == len(want["tokens"]) and totals["failures"] == 2
    got = pds.read(out_a)
    assert rows(got) == want
    for t in pds.TABLES:
        schema = pq.read_schema(next((out_a / t).glob("*.parquet")))
        assert schema.remove_metadata() == cli_schemas[t].remove_metadata(), t
    manifest = json.loads((out_a / "manifest.json").read_text())
    assert manifest["complete"] and manifest["pack"]["concepts"] == 60
    # Arrays in the dataset itself (a `hidden` column), shuffled, one a batch on one actor.
    found = pds.find(recordings["recs"])
    random.Random(7).shuffle(found)
    items = []
    for name, source in found:
        if isinstance(source, tuple):
            from safetensors.numpy import load_file

            hidden = load_file(source[0])[source[1]]
        else:
            hidden = np.load(source)
        items.append({"recording": name, "hidden": hidden})
    out_b = recordings["dir"] / "ray-b"
    pcr.score(ray_cluster.data.from_items(items), recordings["pack"], out_b, EXACT, actors=1, batch_size=1, cache_bytes=64 << 20)
    assert rows(pds.read(out_b)) == want
    # DuckDB over both directories agrees per recording.
    con = duckdb.connect()
    q = "SELECT recording, count(*), sum(logit) FROM read_parquet('{}/detections/*.parquet') GROUP BY 1 ORDER BY 1"
    assert con.execute(q.format(out_a)).fetchall() == con.execute(q.format(recordings["cli"])).fetchall()
    # A directory that holds a dataset is not overwritten.
    with pytest.raises(FileExistsError, match="ray-a"):
        pcr.score(pcr.read_recordings(recordings["recs"]), recordings["pack"], out_a, EXACT)
