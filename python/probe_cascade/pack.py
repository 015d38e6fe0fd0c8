"""Pack tools: open, inspect, verify, import HatCat lenses and headspace lens packs, write
trained probes (lenses of several probes and calibration quantiles included).

    from probe_cascade import pack
    info = pack.open("pack/")            # PackInfo: concepts, hidden_dim, dtype, layers, ...
    pack.verify("pack/")                 # [] when every checksum, shape and value is sound
    pack.import_hatcat("hierarchy/", "lenses/", "out/")
    pack.import_headspace("headspace-pack/", "out/")
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from . import _native

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Concept:
    id: int
    name: str
    layer: int
    parents: Tuple[str, ...]
    children: Tuple[str, ...]


@dataclass
class PackInfo:
    """What a pack holds. `concepts` lists every concept with its parents and children."""

    dir: str
    hidden_dim: int
    dtype: str
    input_normalization: str
    bytes_per_probe: int
    shards: int
    layers: List[Dict[str, int]]
    concepts: List[Concept] = field(repr=False)

    def __len__(self) -> int:
        return len(self.concepts)

    def concept(self, name: str, layer: Optional[int] = None) -> Concept:
        """The concept called `name` (in `layer`, if several layers use the name)."""
        for c in self.concepts:
            if c.name == name and (layer is None or c.layer == layer):
                return c
        where = "" if layer is None else f" in layer {layer}"
        raise KeyError(f"{self.dir}: no concept {name!r}{where}")


def inspect(dir: PathLike) -> Dict[str, Any]:
    """The pack's shape as a dict: concepts, hidden_dim, dtype, bytes, shards, per-layer counts."""
    return _native.inspect(os.fspath(dir))


def open(dir: PathLike) -> PackInfo:  # noqa: A001 - the natural name for it
    """Opens a pack's manifest (probe bytes stay on disk) and lists its concepts."""
    summary = _native.inspect(os.fspath(dir))
    concepts = [
        Concept(c["id"], c["name"], c["layer"], tuple(c["parents"]), tuple(c["children"]))
        for c in _native.concepts(os.fspath(dir))
    ]
    return PackInfo(
        dir=summary["dir"],
        hidden_dim=summary["hidden_dim"],
        dtype=summary["dtype"],
        input_normalization=summary["input_normalization"],
        bytes_per_probe=summary["bytes_per_probe"],
        shards=summary["shards"],
        layers=summary["layers"],
        concepts=concepts,
    )


def verify(dir: PathLike, raise_on_defect: bool = False) -> List[str]:
    """Reads every probe (checksums, shapes, finite values); returns the defects found."""
    return _native.verify(os.fspath(dir), raise_on_defect)


def import_hatcat(
    hierarchy_dir: PathLike,
    lenses_dir: PathLike,
    out: PathLike,
    *,
    dtype: str = "f32",
    skip_bad: bool = False,
    probes_per_shard: int = 256,
) -> str:
    """Imports HatCat's hierarchy and lens files, as they are, into a new pack at `out`."""
    return _native.import_hatcat(
        os.fspath(hierarchy_dir),
        os.fspath(lenses_dir),
        os.fspath(out),
        dtype=dtype,
        skip_bad=skip_bad,
        probes_per_shard=probes_per_shard,
    )


def import_headspace(
    dir: PathLike,
    out: PathLike,
    *,
    dtype: str = "f32",
    probes_per_shard: int = 256,
) -> str:
    """Imports a headspace lens pack, as it is on disk (layer<N>/<Concept>@L<m>.pt and
    <Concept>.pt probes, probe_calibration.json, the older calibration.json, the bundled
    hierarchy), into a new pack."""
    return _native.import_headspace(os.fspath(dir), os.fspath(out), dtype=dtype, probes_per_shard=probes_per_shard)


def write(
    out: PathLike,
    concepts: Sequence[Tuple[str, int, Sequence[int]]],
    weights: Dict[str, Any],
    *,
    dtype: str = "f32",
    input_normalization: str = "none",
    probes_per_shard: int = 256,
    probes: Optional[Sequence[Sequence[Tuple[int, Optional[Sequence[float]]]]]] = None,
    concept_calibration: Optional[Sequence[Optional[Dict[str, float]]]] = None,
) -> int:
    """Writes a pack from stacked MLP weights (HatCat's D→128→64→1 shapes):
    w1 [P,128,D], b1 [P,128], w2 [P,64,128], b2 [P,64], w3 [P,1,64], b3 [P,1].
    `concepts[i]` is (name, layer, parent indices). Arrays may be numpy or torch (CPU).

    Without `probes`, one probe per concept (P = number of concepts). With `probes`, a pack
    of lenses: `probes[i]` lists concept i's probes as (model layer, quantiles or None), one
    per model layer, and the weights' rows follow them in order (P = all probes).

    `concept_calibration` (with `probes`) makes the pack concept-calibrated, as headspace's older
    calibration.json does: per concept, a dict of its statistics (self_mean, cross_mean,
    cross_fire_rate, gen_fire_rate, noise_fire_rate) or None; reports and alerts then show each
    lens score through them (docs/cascade-semantics.md, "Reported scores")."""
    arrays = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in weights.items()}
    lenses = None
    if probes is not None:
        lenses = [
            [(int(m), None if q is None else [float(v) for v in q]) for m, q in lens] for lens in probes
        ]
    return _native.write(
        os.fspath(out),
        [(n, int(layer), [int(p) for p in parents]) for n, layer, parents in concepts],
        arrays,
        dtype=dtype,
        input_normalization=input_normalization,
        probes_per_shard=probes_per_shard,
        probes=lenses,
        concept_calibration=None
        if concept_calibration is None
        else [None if c is None else {k: float(v) for k, v in c.items()} for c in concept_calibration],
    )
