"""FL-TAC: low-rank task-specific adapter clustering (Ping et al., 2024, arXiv 2404.15384).

Client side: the default (one adapter per local task, uploaded whole). Server step
(Algorithm 3): K-means splits all uploaded (client, task) adapters into K clusters (K = number
of tasks by default); each cluster is averaged and every member receives its cluster's average.
The paper averages uniformly; the authors' code weights by sample count, which is our default
(`federation.weighting`). The server never sees task labels.
"""

from __future__ import annotations

from fltac_ray.algorithms.base import Aggregate, FederatedAlgorithm, Uploads
from fltac_ray.errors import ConfigError, ConfigIssue
from fltac_ray.server.clustering import kmeans_labels


def check_clusters_fit(config, data) -> None:
    """K (federation.n_clusters, default: the task count) at most the adapters the partition
    holds: K-means (FL-TAC) and IFCA's K models need as many uploads to start from."""
    adapters = sum(len(c.tasks) for c in data.clients)
    k = config.resolved_n_clusters
    if k > adapters:
        raise ConfigError([ConfigIssue(
            "federation.n_clusters", k, f"must be in 1..{adapters} (the adapters this partition holds)")])


class FLTAC(FederatedAlgorithm):
    name = "fltac"
    recovers_tasks = True
    round_metrics = ("kmeans_backend",)  # what the round's K-means ran on
    summary = "FL-TAC: one low-rank adapter per (client, task); server K-means + per-cluster FedAvg"
    reads = frozenset({"federation.n_clusters", "federation.clustering_backend",
                         "federation.kmeans_n_init", "federation.weighting",
                         "federation.aggregation", "federation.trim_fraction"})

    def check_data(self, data) -> None:
        check_clusters_fit(self.config, data)

    def upload_groups(self) -> int:
        return self.config.resolved_n_clusters

    def aggregate(self, uploads: Uploads, round_index: int) -> Aggregate:
        labels = kmeans_labels(
            uploads.vectors, self.config.resolved_n_clusters, seed=self.config.seed + round_index,
            n_init=self.config.federation.kmeans_n_init, backend=self.kmeans_backend,
            scratch=uploads.owned,
        )
        result = self.cluster_means(uploads.vectors, labels, uploads.num_samples)
        result.metrics["kmeans_backend"] = self.kmeans_backend
        return result
