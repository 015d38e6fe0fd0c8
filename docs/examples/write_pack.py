#!/usr/bin/env python3
"""Writes a probe pack (format v1) with numpy and safetensors alone.

    python3 write_pack.py OUT_DIR [--dim D]

It builds a four-concept hierarchy (a DAG) with random f32 probes, saves them in one shard
with safetensors.numpy.save_file, then reads the shard's header to find each probe's byte
range and CRC-32. The test suite runs it and opens the result with probe-cascade.
"""
import json
import os
import struct
import sys
import zlib

import numpy as np
from safetensors.numpy import save_file

KEYS = ["net.0.bias", "net.0.weight", "net.3.bias", "net.3.weight", "net.6.bias", "net.6.weight"]


def random_probe(rng, d):
    """A PyTorch-style state_dict of Linear(d,128) ReLU Linear(128,64) ReLU Linear(64,1)."""
    tensors = {
        "net.0.weight": rng.standard_normal((128, d)) / np.sqrt(d),
        "net.0.bias": np.zeros(128),
        "net.3.weight": rng.standard_normal((64, 128)) / np.sqrt(128),
        "net.3.bias": np.zeros(64),
        "net.6.weight": rng.standard_normal((1, 64)) / 8,
        "net.6.bias": np.zeros(1),
    }
    # One dtype for the whole pack (numpy computes in float64 unless told otherwise).
    return {k: v.astype(np.float32) for k, v in tensors.items()}


def main():
    out = sys.argv[1]
    d = int(sys.argv[sys.argv.index("--dim") + 1]) if "--dim" in sys.argv else 16
    os.makedirs(out, exist_ok=True)
    # (name, layer, parent ids). A DAG: "Dog" has two parents.
    concepts = [("Entity", 0, []), ("Animal", 1, [0]), ("Pet", 1, [0]), ("Dog", 2, [1, 2])]
    rng = np.random.default_rng(0)
    tensors = {}
    for cid in range(len(concepts)):
        for key, value in random_probe(rng, d).items():
            tensors[f"{cid}/{key}"] = value
    # save_file sorts tensors by dtype, then name, so each probe's "{id}/" tensors end up
    # back to back: one contiguous byte range per probe.
    shard = "weights-00000.safetensors"
    save_file(tensors, os.path.join(out, shard), metadata={"format": "pt"})

    with open(os.path.join(out, shard), "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    entries = []
    for cid, (name, layer, parents) in enumerate(concepts):
        begin = min(header[f"{cid}/{k}"]["data_offsets"][0] for k in KEYS)
        end = max(header[f"{cid}/{k}"]["data_offsets"][1] for k in KEYS)
        children = [c for c, (_, _, ps) in enumerate(concepts) if cid in ps]
        entries.append({
            "id": cid, "name": name, "layer": layer, "parents": parents, "children": children,
            "weights": {"shard": 0, "offset": 8 + n + begin, "length": end - begin},
            "crc32": zlib.crc32(data[begin:end]),
        })
    manifest = {
        "format": "probe-cascade-pack", "format_version": 1, "hidden_dim": d, "dtype": "f32",
        "architecture": {"kind": "mlp", "hidden": [128, 64], "activation": "relu", "output": "sigmoid"},
        "input_normalization": "none", "shards": [shard], "concepts": entries,
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)


if __name__ == "__main__":
    main()
