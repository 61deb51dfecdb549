"""IFCA: the iterative federated clustering algorithm (Ghosh et al., 2020, arXiv 2006.04088),
here over LoRA adapters.

The server keeps K global adapters and sends all of them to each sampled client; for each of its
tasks the client starts from the global adapter with the lowest loss on its training data, trains
it, and uploads it with the index it chose. The server averages the uploads of each index
(sample-weighted); an index nobody chose keeps its previous adapter.
"""

from __future__ import annotations

import numpy as np

from fltac_ray.algorithms.base import Aggregate, FederatedAlgorithm, Uploads


class IFCA(FederatedAlgorithm):
    name = "ifca"
    client_selects_global = True
    clusters_tasks = True

    def __init__(self, n_clusters: int, weighting: str, aggregation: str = "mean", trim: float = 0.0) -> None:
        super().__init__(weighting, aggregation, trim)
        self.n_clusters = n_clusters
        self.globals: np.ndarray | None = None  # (K, d) the server's adapters

    def num_global_adapters(self) -> int:
        return self.n_clusters

    def set_globals(self, adapters: np.ndarray) -> None:
        if len(adapters) != self.n_clusters:
            raise ValueError(f"IFCA needs {self.n_clusters} initial adapters, got {len(adapters)}")
        self.globals = np.array(adapters, dtype=np.float32)

    def aggregate(self, uploads: Uploads, round_index: int) -> Aggregate:
        if uploads.choices is None:
            raise ValueError("IFCA uploads must carry the index of the global adapter they started from")
        if self.globals is None:
            raise ValueError("IFCA server state is missing: set_globals() was never called")
        choices = np.asarray(uploads.choices, dtype=np.int64)
        if choices.min(initial=0) < 0 or choices.max(initial=0) >= self.n_clusters:
            raise ValueError(f"IFCA choices must be in 0..{self.n_clusters - 1}")
        per_choice = self.cluster_means(uploads.vectors, choices, uploads.num_samples)
        chosen = np.unique(choices)  # per_choice rows are these indices, in this order
        # An index no client chose this round keeps its adapter (explicit empty-cluster rule).
        self.globals[chosen] = per_choice.adapters
        totals = np.zeros(self.n_clusters)
        totals[chosen] = per_choice.weights
        return Aggregate(choices, self.globals.copy(), totals)

    def state(self) -> dict[str, np.ndarray]:
        return {"globals": self.globals.copy()} if self.globals is not None else {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        if "globals" in state:
            self.set_globals(state["globals"])
