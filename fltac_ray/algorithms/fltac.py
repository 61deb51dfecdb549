"""FL-TAC: low-rank task-specific adapter clustering (Ping et al., 2024, arXiv 2404.15384).

Server step (Algorithm 3): K-means splits all uploaded (client, task) adapters into K clusters
(K = number of tasks by default); each cluster is averaged and every member is replaced by its
cluster's average. The paper averages uniformly; the authors' code weights by sample count, which
is our default (`federation.weighting`). The server never sees task labels.
"""

from __future__ import annotations

import numpy as np

from fltac_ray.algorithms.base import Aggregate, FederatedAlgorithm, weighted_cluster_means
from fltac_ray.clustering import kmeans_labels


class FLTAC(FederatedAlgorithm):
    name = "fltac"

    def __init__(self, n_clusters: int, weighting: str, backend: str, n_init: int, seed: int):
        self.n_clusters = n_clusters
        self.weighting = weighting
        self.backend = backend
        self.n_init = n_init
        self.seed = seed

    def aggregate(self, vectors: np.ndarray, num_samples: np.ndarray, round_index: int) -> Aggregate:
        labels = kmeans_labels(
            vectors, self.n_clusters, seed=self.seed + round_index, n_init=self.n_init,
            backend=self.backend,
        )
        weights = num_samples if self.weighting == "samples" else np.ones(len(vectors))
        return weighted_cluster_means(vectors, labels, weights)
