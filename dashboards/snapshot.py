"""`Snapshot`: everything a page shows, as one feed holds it (live or from a store)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Snapshot:
    meta: dict
    status: dict
    scan_shape: tuple[int, int]
    block_shape: tuple[int, int]
    flag_names: list[str]
    maps: dict[str, np.ndarray]
    virtual: dict[str, np.ndarray]
    done: np.ndarray
    counts: np.ndarray
    version: int = 0
    # version -> (kind, block rows): ("blocks", rows), ("virtual", scan rows or None for all),
    # ("atoms", None), ("status", set()),
    # ("state", None)
    dirty_rows: dict = field(default_factory=dict)
    # the atom table: positions (n, 2) scan px, confidence, intensity, block, species, anomaly,
    # anomaly_flag (meta["species_names"]: what species indexes); empty when none
    atoms: dict = field(default_factory=lambda: empty_atoms())


ATOM_FIELDS = ("positions", "confidence", "intensity", "block", "species", "anomaly", "anomaly_flag")
# the per-column analyses (species index, -1 unknown; point-defect score, NaN unknown; above the
# flag level): absent from runs without them, filled as unknown
_ANALYSIS_DEFAULTS = {"species": (np.int8, -1), "anomaly": (np.float32, np.nan), "anomaly_flag": (bool, False)}


def empty_atoms() -> dict:
    return {"positions": np.zeros((0, 2), np.float32), "confidence": np.zeros(0, np.float32),
            "intensity": np.zeros(0, np.float32), "block": np.zeros((0, 2), np.int32),
            **{k: np.zeros(0, dt) for k, (dt, _) in _ANALYSIS_DEFAULTS.items()}}


def atoms_from(arrays: dict, prefix: str = "atoms/") -> dict:
    """The atom table out of a message's or a store's arrays (empty when it has none)."""
    if f"{prefix}positions" not in arrays:
        return empty_atoms()
    out = {k: np.array(arrays[f"{prefix}{k}"]) for k in ("positions", "confidence", "intensity", "block")}
    n = len(out["positions"])
    for k, (dt, fill) in _ANALYSIS_DEFAULTS.items():
        out[k] = np.asarray(arrays[f"{prefix}{k}"], dt)[:n] if f"{prefix}{k}" in arrays else np.full(n, fill, dt)
    return out


def snapshot_from_state(header: dict, arrays: dict) -> Snapshot:
    maps = {k.split("/", 1)[1]: np.array(v) for k, v in arrays.items() if k.startswith("maps/")}
    virtual = {k.split("/", 1)[1]: np.array(v) for k, v in arrays.items() if k.startswith("virtual/")}
    meta = dict(header.get("meta", {}), radial=header.get("radial"))  # the profiles' bins and ring scale
    if header.get("atoms", {}).get("species_names"):
        meta["species_names"] = list(header["atoms"]["species_names"])
    return Snapshot(meta=meta, status=header.get("status", {}),
                    scan_shape=tuple(header["scan_shape"]), block_shape=tuple(header["block_shape"]),
                    flag_names=list(header.get("flag_names", [])), maps=maps, virtual=virtual,
                    done=np.array(arrays["blocks/done"]), counts=np.array(arrays["blocks/counts"]),
                    atoms=atoms_from(arrays))
