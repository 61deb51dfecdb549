"""IFCA: the iterative federated clustering algorithm (Ghosh et al., 2020, arXiv 2006.04088),
here over LoRA adapters.

The server keeps K global adapters and sends all of them to each sampled client (counted in the
download); for each of its tasks the client starts from the global adapter with the lowest loss
on its training data, trains it, and uploads it with the index it chose. The server averages the
uploads of each index (sample-weighted); an index nobody chose keeps its previous adapter.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fltac_ray.algorithms.base import Aggregate, ClientJob, FederatedAlgorithm, Uploads
from fltac_ray.algorithms.fltac import ServerGroups, cluster_count
from fltac_ray.algorithms.options import AggregationOptions, ClusterCount


class IFCAOptions(AggregationOptions):
    n_clusters: ClusterCount


class IFCA(ServerGroups, FederatedAlgorithm):
    name = "ifca"
    recovers_tasks = True
    labels_name_server_models = True  # a choice is one of the K global adapters
    summary = "IFCA: K global adapters; each client task starts from the lowest-loss one"
    Options = IFCAOptions
    heterogeneous_ranks = False  # see FederatedAlgorithm.heterogeneous_ranks

    def __init__(self, config) -> None:
        super().__init__(config)
        self.n_clusters = cluster_count(config)
        self.globals: np.ndarray | None = None  # (K, d) the server's adapters

    # client side: start from the best-fitting global adapter, every round
    def start(self, job: ClientJob, committed: np.ndarray | None, broadcast: np.ndarray,
              probe_loss) -> tuple[np.ndarray, dict[str, Any]]:
        choice = int(np.argmin([probe_loss(candidate) for candidate in broadcast]))
        return broadcast[choice], {"choice": choice}

    # server side
    def num_initial_adapters(self) -> int:
        return self.n_clusters

    def set_initial(self, adapters: np.ndarray) -> None:
        if len(adapters) != self.n_clusters:
            raise ValueError(f"IFCA needs {self.n_clusters} initial adapters, got {len(adapters)}")
        super().set_initial(adapters)
        self.globals = np.array(adapters, dtype=np.float32)

    def broadcast(self) -> np.ndarray:
        return self.globals

    def aggregate(self, uploads: Uploads, round_index: int) -> Aggregate:
        if "choice" not in uploads.meta:
            raise ValueError("IFCA uploads must carry the index of the global adapter they started from")
        if self.globals is None:
            raise ValueError("IFCA server state is missing: set_initial() was never called")
        choices = np.asarray(uploads.meta["choice"], dtype=np.int64)
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
            self.set_initial(state["globals"])

    # traffic: every client that delivered received all K global adapters
    def download_params(self, outcome: Aggregate, clients: int) -> int:
        return int(clients * outcome.adapters.size) if len(outcome.labels) else 0
