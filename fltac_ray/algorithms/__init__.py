"""Federated algorithms, one small module each; `create_algorithm` builds one from a config."""

from __future__ import annotations

from fltac_ray.algorithms.base import Aggregate, FederatedAlgorithm, Uploads
from fltac_ray.algorithms.registry import ALGORITHMS

__all__ = ["ALGORITHMS", "Aggregate", "FederatedAlgorithm", "Uploads", "create_algorithm"]


def create_algorithm(config, backend: str = "sklearn", adaptor_index=None) -> FederatedAlgorithm:
    """Build the configured algorithm; `backend` is the resolved K-means backend (FL-TAC),
    `adaptor_index` the adaptor of every adapter entry (FLoRAL's server)."""
    fed = config.federation
    name = config.algorithm
    if name == "fltac":
        from fltac_ray.algorithms.fltac import FLTAC

        return FLTAC(config.resolved_n_clusters, fed.weighting, backend, fed.kmeans_n_init, config.seed,
                     fed.aggregation, fed.trim_fraction)
    if name == "fedit":
        from fltac_ray.algorithms.fedit import FedIT

        return FedIT(fed.weighting, fed.aggregation, fed.trim_fraction)
    if name == "oracle":
        from fltac_ray.algorithms.oracle import OracleClustering

        return OracleClustering(fed.weighting, fed.aggregation, fed.trim_fraction)
    if name == "ifca":
        from fltac_ray.algorithms.ifca import IFCA

        return IFCA(config.resolved_n_clusters, fed.weighting, fed.aggregation, fed.trim_fraction)
    if name == "local":
        from fltac_ray.algorithms.local import LocalOnly

        return LocalOnly()
    if name == "floral":
        from fltac_ray.algorithms.floral import FLoRAL

        return FLoRAL(fed.weighting, adaptor_index)
    if name == "centralized":
        from fltac_ray.algorithms.centralized import Centralized

        return Centralized()
    raise ValueError(f"unknown algorithm {name!r}; known: {sorted(ALGORITHMS)}")
