"""Names and options of the federated algorithms, importable without torch (validation stays fast)."""

from __future__ import annotations

ALGORITHMS: dict[str, str] = {
    "fltac": "FL-TAC: one low-rank adapter per (client, task); server K-means + per-cluster FedAvg",
    "fedit": "FedIT: one adapter per client trained over all its tasks; FedAvg",
    "oracle": "FL-TAC aggregation grouped by the true task ids (ceiling of the clustering step)",
    "ifca": "IFCA: K global adapters; each client task starts from the lowest-loss one",
    "local": "local only: per-task adapters, never communicated (lower reference)",
    "centralized": "centralized LoRA: all data pooled, per-task adapters, same step budget (upper reference)",
    "floral": "FLoRAL: C federated LoRA adaptors per layer mixed by a private per-client router",
}

# Options that only some algorithms read. Setting one explicitly for another algorithm is an
# error, so that a sweep or a typo never silently changes nothing.
ALGORITHM_OPTIONS: dict[str, set[str]] = {
    "federation.n_clusters": {"fltac", "ifca"},
    "federation.clustering_backend": {"fltac"},
    "federation.kmeans_n_init": {"fltac"},
    "federation.weighting": {"fltac", "fedit", "oracle", "ifca", "floral"},
    "federation.aggregation": {"fltac", "fedit", "oracle", "ifca"},
    "federation.trim_fraction": {"fltac", "fedit", "oracle", "ifca"},
    "floral": {"floral"},  # the whole section
}
