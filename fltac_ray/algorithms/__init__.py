"""Federated algorithms, one module each: both halves (client and server) in one class.

`create_algorithm` builds the configured one; `register_algorithm` adds your own (or name it as
`algorithm: package.module:ClassName` in the experiment file).
"""

from __future__ import annotations

from fltac_ray.algorithms.base import (
    AdapterSpec,
    Aggregate,
    ClientJob,
    FederatedAlgorithm,
    Upload,
    Uploads,
)
from fltac_ray.algorithms.local_training import LocalContext, LocalTraining, rows_of
from fltac_ray.algorithms.options import AlgorithmOptions
from fltac_ray.algorithms.registry import (
    BUILTIN,
    UnknownAlgorithm,
    algorithm_summaries,
    register_algorithm,
    resolve_algorithm,
)

__all__ = ["BUILTIN", "AdapterSpec", "Aggregate", "AlgorithmOptions", "ClientJob", "FederatedAlgorithm",
           "LocalContext", "LocalTraining", "UnknownAlgorithm", "Upload", "Uploads", "algorithm_summaries",
           "create_algorithm", "register_algorithm", "resolve_algorithm", "rows_of"]


def create_algorithm(config, cls: type[FederatedAlgorithm] | None = None
                     ) -> FederatedAlgorithm:
    """Build the configured algorithm (`cls`: its class when already resolved, as in a worker
    that received it from the driver)."""
    return (cls or resolve_algorithm(config.algorithm))(config)
