"""The small interface every federated algorithm implements, and the shared FedAvg arithmetic.

The engine owns the round loop; an algorithm decides (1) which tasks each client adapter is
trained on and (2) how the server turns the round's uploads into the adapters it sends back.
No Ray in here: algorithms are plain, testable numpy code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass
class Aggregate:
    labels: np.ndarray  # (n_uploads,) cluster id of each upload, compact in 0..k-1
    adapters: np.ndarray  # (k, d) the adapter each cluster's members receive
    weights: np.ndarray  # (k,) total aggregation weight of each cluster


class FederatedAlgorithm(ABC):
    name: str = "base"

    def client_adapters(self, tasks: list[str]) -> list[list[str]]:
        """Group a client's tasks into adapters (default: one adapter per task, as in FL-TAC)."""
        return [[task] for task in tasks]

    @abstractmethod
    def aggregate(self, vectors: np.ndarray, num_samples: np.ndarray, round_index: int) -> Aggregate:
        """vectors: (n, d) uploaded adapters; num_samples: (n,) their clients' example counts."""


def weighted_cluster_means(
    vectors: np.ndarray, labels: np.ndarray, weights: np.ndarray
) -> Aggregate:
    """Per-cluster weighted mean of `vectors` (n, d); clusters are renumbered 0..k-1 in order of
    first id, so an id that K-means left empty simply does not appear."""
    vectors = np.asarray(vectors, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if np.any(weights <= 0):
        raise ValueError("aggregation weights must be positive")
    cluster_ids, compact = np.unique(labels, return_inverse=True)
    k = len(cluster_ids)
    totals = np.bincount(compact, weights=weights, minlength=k)  # (k,)
    sums = np.zeros((k, vectors.shape[1]))
    np.add.at(sums, compact, vectors * weights[:, None])
    return Aggregate(compact, (sums / totals[:, None]).astype(np.float32), totals)
