"""The committed state of every simulated client, kept on the server side and deduplicated.

Workers are stateless: each round they read the state from here (a StateView) and the round's
results are committed back here. Adapters are stored as distinct rows plus an index from
(client, slot) to row: under FL-TAC every member of a cluster holds the cluster's aggregate, so
1000 clients x 3 tasks take K rows, not 3000 (a checkpoint grows with the distinct adapters, not
with the clients). Identical rows are found by content (a BLAKE2 digest of the row's bytes).
Private state (FLoRAL's routers) is small and kept per key. Pure numpy, no Ray.
"""

from __future__ import annotations

import numpy as np

from fltac_ray.algorithms.base import AdapterKey
from fltac_ray.engine.messages import StateView, content_digest


class ClientStateStore:
    def __init__(self, size: int) -> None:
        self.size = size
        self.rows = np.zeros((0, size), np.float32)  # (m, d) distinct committed adapters
        self.index: dict[AdapterKey, int] = {}
        self.private: dict[AdapterKey, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.index)

    def view(self, broadcast: np.ndarray, states: ClientStateStore | None = None) -> StateView:
        """The state for a round's workers; `states`: the algorithm's client state (a second store)."""
        view = StateView(self.rows, dict(self.index), dict(self.private), broadcast)
        if states is not None:
            view.state_rows, view.state_index = states.rows, dict(states.index)
        return view

    def adapter(self, key: AdapterKey) -> np.ndarray | None:
        row = self.index.get(key)
        return None if row is None else self.rows[row]

    def commit(self, adapters: dict[AdapterKey, np.ndarray], private: dict[AdapterKey, np.ndarray]) -> None:
        """Set the given keys' adapters and private state; rows no key uses any more are dropped
        and identical rows stored once."""
        index = dict(self.index)
        kept: list[np.ndarray] = []
        row_of: dict[bytes, int] = {}

        def place(vector: np.ndarray) -> int:
            digest = content_digest(vector)
            if digest not in row_of:
                row_of[digest] = len(kept)
                kept.append(np.asarray(vector, dtype=np.float32))
            return row_of[digest]

        old_rows: dict[int, int] = {}  # old row -> new row, for keys left unchanged
        for key, old in sorted(index.items()):
            if key in adapters:
                continue
            if old not in old_rows:
                old_rows[old] = place(self.rows[old])
            index[key] = old_rows[old]
        for key in sorted(adapters):
            index[key] = place(adapters[key])
        self.rows = np.stack(kept) if kept else np.zeros((0, self.size), np.float32)
        self.index = index
        self.private.update(private)

    # --- checkpoints: named arrays for safetensors ----------------------------------------------
    def to_groups(self) -> dict[str, dict[str, np.ndarray]]:
        keys = sorted(self.index)
        table = np.asarray([[c, s, self.index[(c, s)]] for c, s in keys], dtype=np.int64).reshape(-1, 3)
        return {"clients": {"rows": self.rows, "index": table},
                "private": {f"{c}/{s}": v for (c, s), v in self.private.items()}}

    def load_groups(self, groups: dict[str, dict[str, np.ndarray]]) -> None:
        clients = groups["clients"]
        rows = np.array(clients["rows"], dtype=np.float32).reshape(-1, self.size)
        table = np.asarray(clients["index"], dtype=np.int64).reshape(-1, 3)
        if len(table) and (table[:, 2].min() < 0 or table[:, 2].max() >= len(rows)):
            raise ValueError("client state index points outside its rows")
        self.rows = rows
        self.index = {(int(c), int(s)): int(r) for c, s, r in table}
        self.private = {tuple(int(p) for p in name.split("/")): np.array(v, dtype=np.float32)
                        for name, v in groups.get("private", {}).items()}
