"""FL-TAC: low-rank task-specific adapter clustering (Ping et al., 2024, arXiv 2404.15384).

Client side: the default (one adapter per local task, uploaded whole). Server step
(Algorithm 3): K-means splits all uploaded (client, task) adapters into K clusters (K = number
of tasks by default); each cluster is averaged and every member receives its cluster's average.
The paper averages uniformly; the authors' code weights by sample count, which is our default
(`federation.weighting`). The server never sees task labels.
"""

from __future__ import annotations

from fltac_ray.algorithms.base import Aggregate, FederatedAlgorithm, Uploads
from fltac_ray.server.clustering import kmeans_labels


class FLTAC(FederatedAlgorithm):
    name = "fltac"
    recovers_tasks = True
    round_metrics = ("kmeans_backend",)  # what the round's K-means ran on
    summary = "FL-TAC: one low-rank adapter per (client, task); server K-means + per-cluster FedAvg"
    reads = frozenset({"federation.n_clusters", "federation.clustering_backend",
                         "federation.kmeans_n_init", "federation.weighting",
                         "federation.aggregation", "federation.trim_fraction"})

    def aggregate(self, uploads: Uploads, round_index: int) -> Aggregate:
        labels = kmeans_labels(
            uploads.vectors, self.config.resolved_n_clusters, seed=self.config.seed + round_index,
            n_init=self.config.federation.kmeans_n_init, backend=self.kmeans_backend,
            scratch=uploads.owned,
        )
        result = self.cluster_means(uploads.vectors, labels, uploads.num_samples)
        result.metrics["kmeans_backend"] = self.kmeans_backend
        return result
