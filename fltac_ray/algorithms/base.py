"""The small interface every federated algorithm implements, and the shared FedAvg arithmetic.

The engine owns the round loop; an algorithm decides
  (1) which of a client's tasks each of its adapters trains on (`client_adapters`),
  (2) how the server turns one round's uploads into the adapters it sends back (`aggregate`),
and declares, through class attributes, what the engine must do around those two hooks.
No Ray in here: algorithms are plain, testable numpy code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass
class Uploads:
    """One round's accepted uploads, sorted by (client, slot)."""

    vectors: np.ndarray  # (n, d) float32 adapters
    num_samples: np.ndarray  # (n,) training examples behind each adapter
    task_labels: list[str] | None = None  # true tasks: filled only for needs_task_labels
    choices: np.ndarray | None = None  # (n,) global adapter each client started from (IFCA)
    mixture: np.ndarray | None = None  # (n, C) router mixture weights behind each upload (FLoRAL)
    owned: bool = False  # `vectors` is the server's own scratch copy (clustering may centre it in place)


@dataclass
class Aggregate:
    labels: np.ndarray  # (n,) which row of `adapters` each upload receives back
    adapters: np.ndarray  # (k, d) float32 adapters the server holds after the round
    weights: np.ndarray  # (k,) total aggregation weight behind each row (0: kept unchanged)


class FederatedAlgorithm(ABC):
    name: str = "base"
    #: False for algorithms that never talk to a server (local-only, centralized)
    communicates: bool = True
    #: uploads carry each adapter's true task (only the oracle may see them)
    needs_task_labels: bool = False
    #: clients receive every global adapter and start from the one that fits them best (IFCA)
    client_selects_global: bool = False
    #: the server's grouping is meant to recover tasks: report clustering accuracy / ARI
    clusters_tasks: bool = False
    #: all clients' data pooled into one client (centralized reference)
    pools_data: bool = False
    #: uploads carry their router's mixture weights; models carry private routers (FLoRAL)
    uses_mixture: bool = False

    def __init__(self, weighting: str = "samples", aggregation: str = "mean", trim: float = 0.0) -> None:
        self.weighting = weighting
        self.aggregation = aggregation  # inside each cluster: mean, median or trimmed_mean
        self.trim = trim

    def client_adapters(self, tasks: list[str]) -> list[list[str]]:
        """Group a client's tasks into adapters (default: one adapter per task, as in FL-TAC)."""
        return [[task] for task in tasks]

    def num_global_adapters(self) -> int:
        """How many distinct initial adapters the server draws (IFCA: one per cluster)."""
        return 1

    def set_globals(self, adapters: np.ndarray) -> None:
        """Receive the server's initial adapters (K, d); stateless algorithms ignore them."""
        return None

    def weights(self, num_samples: np.ndarray) -> np.ndarray:
        """FedAvg weights: sample counts (the authors' code) or uniform (the FL-TAC paper)."""
        return np.asarray(num_samples, dtype=np.float64) if self.weighting == "samples" else np.ones(len(num_samples))

    @abstractmethod
    def aggregate(self, uploads: Uploads, round_index: int) -> Aggregate:
        """Turn one round's uploads into the adapters the server sends back."""

    def cluster_means(self, vectors: np.ndarray, labels: np.ndarray, num_samples: np.ndarray) -> Aggregate:
        """Each cluster's aggregate by the configured rule (FedAvg or a robust one)."""
        from fltac_ray.algorithms.robust import cluster_aggregate

        return cluster_aggregate(vectors, labels, self.weights(num_samples), self.aggregation, self.trim)

    def state(self) -> dict[str, np.ndarray]:
        """Server state a checkpoint must hold to continue the run (stateless: nothing)."""
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what state() returned."""
        return None


# Rows per float64 block of the weighted sums: bounds the server's extra memory to a few MB
# whatever the number of uploads (a float64 copy of 2,000 MiniLM adapters would be 300 MB).
SUM_BLOCK_ROWS = 256


def weighted_cluster_means(
    vectors: np.ndarray, labels: np.ndarray, weights: np.ndarray
) -> Aggregate:
    """Per-cluster weighted mean of `vectors` (n, d); clusters are renumbered 0..k-1 in order of
    first id, so an id that K-means left empty simply does not appear. Sums in float64."""
    weights = np.asarray(weights, dtype=np.float64)
    if np.any(weights <= 0):
        raise ValueError("aggregation weights must be positive")
    cluster_ids, compact = np.unique(labels, return_inverse=True)
    k = len(cluster_ids)
    totals = np.bincount(compact, weights=weights, minlength=k)  # (k,)
    # (k, n) weight of each upload in each cluster's sum; applied block by block in float64
    membership = np.zeros((k, len(weights)))
    membership[compact, np.arange(len(weights))] = weights
    sums = np.zeros((k, vectors.shape[1]))
    for lo in range(0, len(weights), SUM_BLOCK_ROWS):
        block = np.asarray(vectors[lo:lo + SUM_BLOCK_ROWS], dtype=np.float64)
        sums += membership[:, lo:lo + SUM_BLOCK_ROWS] @ block
    return Aggregate(compact, (sums / totals[:, None]).astype(np.float32), totals)
