"""FL-TAC: low-rank task-specific adapter clustering (Ping et al., 2024, arXiv 2404.15384).

Server step (Algorithm 3): K-means splits all uploaded (client, task) adapters into K clusters
(K = number of tasks by default); each cluster is averaged and every member is replaced by its
cluster's average. The paper averages uniformly; the authors' code weights by sample count, which
is our default (`federation.weighting`). The server never sees task labels.
"""

from __future__ import annotations

from fltac_ray.algorithms.base import Aggregate, FederatedAlgorithm, Uploads
from fltac_ray.clustering import kmeans_labels


class FLTAC(FederatedAlgorithm):
    name = "fltac"
    clusters_tasks = True

    def __init__(self, n_clusters: int, weighting: str, backend: str, n_init: int, seed: int,
                 aggregation: str = "mean", trim: float = 0.0):
        super().__init__(weighting, aggregation, trim)
        self.n_clusters = n_clusters
        self.backend = backend
        self.n_init = n_init
        self.seed = seed

    def aggregate(self, uploads: Uploads, round_index: int) -> Aggregate:
        labels = kmeans_labels(
            uploads.vectors, self.n_clusters, seed=self.seed + round_index, n_init=self.n_init,
            backend=self.backend, scratch=uploads.owned,
        )
        return self.cluster_means(uploads.vectors, labels, uploads.num_samples)
