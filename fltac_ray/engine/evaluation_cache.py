"""The driver's memory of what it evaluated: each adapter key's records, with the digest of the
committed state they were computed from (StateView.evaluation_digests). No Ray.

A key whose digest is unchanged keeps its records; only changed keys are evaluated again. The
cache goes into every checkpoint (group "evaluated"), so a resumed run re-evaluates exactly the
keys the uninterrupted run would have: batched evaluation groups many adapters per forward pass,
and the floats of a result depend (in the last bits) on what shares its pass, so the same
groups must be formed for the results to be equal.
"""

from __future__ import annotations

import numpy as np

from fltac_ray.algorithms.base import AdapterKey
from fltac_ray.engine.messages import EvalRecord

GROUP = "evaluated"
_INTS = ("correct", "count", "predictions")
_FLOATS = ("loss_sum", "rouge_sum", "judge_sum")


class EvaluationCache:
    def __init__(self) -> None:
        self.entries: dict[AdapterKey, tuple[bytes, list[EvalRecord]]] = {}

    def is_current(self, key: AdapterKey, digest: bytes) -> bool:
        entry = self.entries.get(key)
        return entry is not None and entry[0] == digest

    def put(self, key: AdapterKey, digest: bytes, records: list[EvalRecord]) -> None:
        self.entries[key] = (digest, records)

    def records(self, key: AdapterKey) -> list[EvalRecord]:
        return self.entries[key][1]

    def to_group(self, task_names: list[str]) -> dict[str, np.ndarray]:
        """As checkpoint arrays: keys (n, 2), digests (n, 16) uint8, and one row per record
        (its entry, its task's index in `task_names`, its counts and sums)."""
        keys = list(self.entries)
        task_index = {name: index for index, name in enumerate(task_names)}
        flat = [(entry, record) for entry, key in enumerate(keys) for record in self.entries[key][1]]
        group = {
            "keys": np.asarray(keys, dtype=np.int64).reshape(-1, 2),
            "digests": np.frombuffer(b"".join(self.entries[key][0] for key in keys), dtype=np.uint8)
            .reshape(len(keys), -1).copy() if keys else np.zeros((0, 16), np.uint8),
            "record_entry": np.asarray([entry for entry, _ in flat], dtype=np.int64),
            "record_task": np.asarray([task_index[record.task] for _, record in flat], dtype=np.int64),
            "record_client": np.asarray([record.client_id for _, record in flat], dtype=np.int64),
        }
        for name in _INTS:
            group[f"record_{name}"] = np.asarray([getattr(record, name) for _, record in flat], dtype=np.int64)
        for name in _FLOATS:
            group[f"record_{name}"] = np.asarray([getattr(record, name) for _, record in flat], dtype=np.float64)
        return group

    @classmethod
    def from_group(cls, group: dict[str, np.ndarray], task_names: list[str]) -> EvaluationCache:
        cache = cls()
        keys = [tuple(int(v) for v in key) for key in np.asarray(group["keys"]).reshape(-1, 2)]
        digests = np.asarray(group["digests"], dtype=np.uint8)
        records: list[list[EvalRecord]] = [[] for _ in keys]
        for row, entry in enumerate(np.asarray(group["record_entry"], dtype=np.int64)):
            records[int(entry)].append(EvalRecord(
                client_id=int(group["record_client"][row]), task=task_names[int(group["record_task"][row])],
                **{name: int(group[f"record_{name}"][row]) for name in _INTS},
                **{name: float(group[f"record_{name}"][row]) for name in _FLOATS}))
        for key, digest, items in zip(keys, digests, records, strict=True):
            cache.entries[key] = (digest.tobytes(), items)
        return cache
