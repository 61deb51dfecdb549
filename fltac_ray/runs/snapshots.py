"""Uploaded adapters saved at a few rounds, for the report's projection figure (paper Fig. 4).

`snapshots/round_NNNNN.safetensors` holds `adapters` (n, adapter_size) float32 as the server
received them, `clients` and `slots` (n,) int64 (the upload keys), `labels` (n,) int64 (the
server's assignment: K-means cluster, IFCA choice, ...) and, as metadata, `tasks`: the true task
of each row (JSON list; "+"-joined for FedIT's multi-task adapters), which the server never saw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

FOLDER = "snapshots"


def snapshot_rounds(rounds: int, count: int) -> list[int]:
    """`count` rounds evenly spaced over 1..rounds, first and last included (fewer when the run
    is shorter)."""
    if count <= 0:
        return []
    if count == 1:
        return [rounds]
    return sorted({int(round(x)) for x in np.linspace(1, rounds, min(count, rounds))})


def sample_rows(n: int, limit: int, seed: int, round_index: int) -> np.ndarray:
    """Sorted row indices to keep: all of them up to `limit`, else a seeded uniform sample."""
    if n <= limit:
        return np.arange(n)
    rng = np.random.default_rng([seed, 9, round_index])
    return np.sort(rng.choice(n, size=limit, replace=False))


@dataclass
class Snapshot:
    round: int
    adapters: np.ndarray  # (n, adapter_size) float32
    clients: np.ndarray  # (n,) int64
    slots: np.ndarray  # (n,) int64
    labels: np.ndarray  # (n,) int64 server assignment
    tasks: list[str]  # (n,) true task of each row


def write_snapshot(run_dir: Path, snapshot: Snapshot) -> Path:
    folder = run_dir / FOLDER
    folder.mkdir(exist_ok=True)
    path = folder / f"round_{snapshot.round:05d}.safetensors"
    save_file({"adapters": np.ascontiguousarray(snapshot.adapters, dtype=np.float32),
               "clients": snapshot.clients.astype(np.int64), "slots": snapshot.slots.astype(np.int64),
               "labels": snapshot.labels.astype(np.int64)},
              str(path), metadata={"round": str(snapshot.round), "tasks": json.dumps(snapshot.tasks)})
    return path


def read_snapshots(run_dir: Path) -> list[Snapshot]:
    """Every snapshot of a run, by round (a resumed run rewrites a redone round's file)."""
    from safetensors import safe_open

    out = []
    for path in sorted((run_dir / FOLDER).glob("round_*.safetensors")):
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
        out.append(Snapshot(int(metadata["round"]), tensors["adapters"], tensors["clients"], tensors["slots"],
                            tensors["labels"], json.loads(metadata["tasks"])))
    return out


def align_cluster_ids(snapshots: list[Snapshot]) -> list[np.ndarray]:
    """Each snapshot's server labels renumbered so that a cluster keeps its id from round to
    round (K-means numbers its clusters afresh every round). Round r's clusters are matched to
    round r-1's, as renumbered, by the Hungarian method on the number of uploads (client, slot)
    each pair shares; a cluster that shares none gets the next id never used. The first snapshot
    keeps its labels."""
    from scipy.optimize import linear_sum_assignment

    aligned: list[np.ndarray] = []
    previous: dict[tuple[int, int], int] = {}
    next_id = 0
    for snap in snapshots:
        keys = list(zip(snap.clients.tolist(), snap.slots.tolist(), strict=True))
        ids = np.unique(snap.labels)
        mapping: dict[int, int] = {}
        if aligned:
            old_ids = sorted(set(previous.values()))
            shared = np.zeros((len(ids), len(old_ids)))  # (this round's clusters, last round's)
            for key, label in zip(keys, snap.labels.tolist(), strict=True):
                if key in previous:
                    shared[np.searchsorted(ids, label), old_ids.index(previous[key])] += 1
            for row, col in zip(*linear_sum_assignment(-shared), strict=True):
                if shared[row, col] > 0:
                    mapping[int(ids[row])] = old_ids[col]
        else:
            mapping = {int(label): int(label) for label in ids}
        for label in ids.tolist():
            if label not in mapping:  # a cluster new this round: an id no round has used
                mapping[label] = next_id
                next_id += 1
        next_id = max(next_id, max(mapping.values()) + 1)
        relabelled = np.array([mapping[label] for label in snap.labels.tolist()], dtype=np.int64)
        aligned.append(relabelled)
        previous = dict(zip(keys, relabelled.tolist(), strict=True))
    return aligned
