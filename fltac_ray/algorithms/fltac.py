"""FL-TAC: low-rank task-specific adapter clustering (Ping et al., 2024, arXiv 2404.15384).

Client side: the default (one adapter per local task, uploaded whole). Server step
(Algorithm 3): K-means splits all uploaded (client, task) adapters into K clusters (K = number
of tasks by default); each cluster is averaged and every member receives its cluster's average.
The paper averages uniformly; the authors' code weights by sample count, which is our default
(option `weighting`). The server never sees task labels.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fltac_ray.algorithms.base import Aggregate, FederatedAlgorithm, Uploads
from fltac_ray.algorithms.options import AggregationOptions, ClusterCount
from fltac_ray.errors import ConfigError, ConfigIssue
from fltac_ray.server.clustering import kmeans_labels, resolve_backend


def cluster_count(config) -> int:
    """K: the algorithm's n_clusters option, or the number of tasks."""
    return config.options.n_clusters or config.num_tasks


def check_cluster_count(config) -> None:
    """K at most the adapters one round can upload: every sampled client holds every task."""
    k, upper = config.options.n_clusters, config.clients_per_round * config.num_tasks
    if k is not None and k > upper:
        raise ValueError(
            f"algorithm.n_clusters = {k}: must be in 1..{upper} (adapters per round at most: "
            f"{config.clients_per_round} sampled clients x {config.num_tasks} tasks)")


def check_clusters_fit(config, data) -> None:
    """K at most the adapters the partition holds: K-means (FL-TAC) and IFCA's K models need as
    many uploads to start from."""
    adapters = sum(len(c.tasks) for c in data.clients)
    k = cluster_count(config)
    if k > adapters:
        raise ConfigError([ConfigIssue(
            "algorithm.n_clusters", k, f"must be in 1..{adapters} (the adapters this partition holds)")])


class ServerGroups:
    """Mixed into an algorithm whose server forms K groups of the uploads (option n_clusters,
    default: the number of tasks): FL-TAC's clusters, IFCA's models. K is checked against the
    uploads a round and the partition can give, and config.yaml records it resolved."""

    @classmethod
    def check_config(cls, config) -> None:
        check_cluster_count(config)

    @classmethod
    def resolved_options(cls, config) -> dict:
        return {**config.options.saved(), "n_clusters": cluster_count(config)}

    def check_data(self, data) -> None:
        check_clusters_fit(self.config, data)

    def upload_groups(self) -> int:
        return cluster_count(self.config)


class FLTACOptions(AggregationOptions):
    n_clusters: ClusterCount
    clustering_backend: Literal["auto", "sklearn", "cuml", "torch"] = Field(
        default="auto",
        description="where K-means runs. auto: cuML when importable and a GPU is visible; else "
        "torch's K-means on the coordinator's GPU when it has one (engine.coordinator_gpus); else "
        "scikit-learn. torch: Lloyd's K-means with k-means++ starts (server/clustering.py) on the "
        "GPU, or the CPU without one")
    # 30, not the reference code's 10: on round 1 of the offline default, 10 restarts missed the
    # true (lower-inertia) partition in 20-30% of seeds, and under FL-TAC a misassigned adapter
    # receives the other cluster's aggregate and stays there. 30 found it in 40 of 40 seeds.
    kmeans_n_init: int = Field(default=30, ge=1, description="K-means restarts (best inertia kept)")
    cluster_on: Literal["adapters", "products"] = Field(
        default="adapters",
        description="what K-means reads: the uploaded adapters (the paper), or a seeded sketch of each LoRA "
        "layer's update B A with the head (server/lora_products.product_sketch): the same shape at every rank, "
        "for clients of different ranks (model.lora.rank_profile)")
    rank_aggregation: Literal["zero_pad", "hetlora", "flexlora"] = Field(
        default="zero_pad",
        description="under model.lora.rank_profile, how each cluster combines adapters of different ranks: the "
        "plain mean of the zero-padded factors, HetLoRA's norm-weighted mean (algorithms/hetlora.py) or "
        "FlexLoRA's SVD of the summed updates (algorithms/flexlora.py); each client keeps its own rank")


class FLTAC(ServerGroups, FederatedAlgorithm):
    name = "fltac"
    recovers_tasks = True
    round_metrics = ("kmeans_backend",)  # what the round's K-means ran on
    summary = "FL-TAC: one low-rank adapter per (client, task); server K-means + per-cluster FedAvg"
    Options = FLTACOptions
    #: scikit-learn until start_server() resolves the option where the server runs
    kmeans_backend = "sklearn"
    clusters_sketches = True

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        rule = config.options.rank_aggregation
        if rule == "zero_pad":
            return
        if config.model.lora.rank_profile is None:
            raise ValueError(f"algorithm.rank_aggregation = {rule!r}: only for adapters of different ranks; set "
                             "model.lora.rank_profile, or leave rank_aggregation at zero_pad")
        if config.privacy.mode == "client_central":
            raise ValueError(f"algorithm.rank_aggregation = {rule!r}: no plain mean, so privacy.mode "
                             "client_central's noise has no stated sensitivity; use zero_pad or client_local")
        if config.options.aggregation != "mean":
            raise ValueError(f"algorithm.rank_aggregation = {rule!r}: its own rule for the LoRA layers; use "
                             f"aggregation: mean (here {config.options.aggregation!r})")

    def start_server(self) -> str:
        # Resolved in the coordinator's process: that is where a GPU must be visible.
        self.kmeans_backend = resolve_backend(self.options.clustering_backend)
        return f"K-means backend: {self.kmeans_backend}"

    def aggregate(self, uploads: Uploads, round_index: int) -> Aggregate:
        # under local DP with privacy.sketch_dim, K-means reads each upload's noised sketch (n, k)
        # rather than its noised adapter (n, p): far less noise per distance (privacy/sketch.py)
        features, scratch = uploads.extras.get("sketch"), False
        if features is None and self.options.cluster_on == "products":
            from fltac_ray.server.lora_products import product_sketch

            features, scratch = product_sketch(uploads.vectors, self.spec.layout, seed=self.config.seed), True
        if features is None:
            features, scratch = uploads.vectors, uploads.owned
        labels = kmeans_labels(
            features, cluster_count(self.config), seed=self.config.seed + round_index,
            n_init=self.options.kmeans_n_init, backend=self.kmeans_backend, scratch=scratch,
        )
        rule = self.options.rank_aggregation
        if rule == "zero_pad":
            result = self.cluster_means(uploads.vectors, labels, uploads.num_samples)
        else:  # only under a rank profile (check_config), never with central noise
            from fltac_ray.algorithms.flexlora import svd_means
            from fltac_ray.algorithms.hetlora import norm_weighted_means

            combine = norm_weighted_means if rule == "hetlora" else svd_means
            result = combine(uploads.vectors, labels, self.weights(uploads.num_samples), self.spec.layout)
        result.metrics["kmeans_backend"] = self.kmeans_backend
        return result
