"""Federated algorithms, one small module each; `create_algorithm` builds one from a config."""

from __future__ import annotations

from fltac_ray.algorithms.base import Aggregate, FederatedAlgorithm
from fltac_ray.algorithms.registry import ALGORITHMS

__all__ = ["ALGORITHMS", "Aggregate", "FederatedAlgorithm", "create_algorithm"]


def create_algorithm(config, backend: str) -> FederatedAlgorithm:
    """Build the configured algorithm; `backend` is the resolved K-means backend."""
    if config.algorithm == "fltac":
        from fltac_ray.algorithms.fltac import FLTAC

        fed = config.federation
        return FLTAC(config.resolved_n_clusters, fed.weighting, backend, fed.kmeans_n_init, config.seed)
    raise ValueError(f"unknown algorithm {config.algorithm!r}; known: {sorted(ALGORITHMS)}")
