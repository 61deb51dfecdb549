"""fltac-ray: federated multi-task fine-tuning with low-rank adapters, simulated on Ray.

`fltac_ray.run(config) -> Result` runs an experiment from Python (see fltac_ray/api.py);
`fltac_ray.load_result(run_dir)` reads one back. The command line is `fltac-ray` (cli.py).
`fltac_ray.FederatedAlgorithm` and `fltac_ray.register_algorithm` bring your own algorithm.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

# Installs the algorithm resolver the schema validates `algorithm:` with (numpy and pydantic only):
# every `import fltac_ray.<anything>` runs this file first, so a config never meets an empty registry.
import fltac_ray.algorithms.registry  # noqa: F401

try:
    __version__ = metadata.version("fltac-ray")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["ComparisonResult", "FederatedAlgorithm", "Result", "SweepResult", "__version__", "load_result",
           "register_algorithm", "resume", "run"]
_ALGORITHMS = {"FederatedAlgorithm", "register_algorithm"}


def __getattr__(name: str) -> Any:
    if name in _ALGORITHMS:  # numpy only
        from fltac_ray import algorithms

        return getattr(algorithms, name)
    # Lazy: Ray workers import fltac_ray.* modules and should not pay for the API's imports.
    if name in __all__:
        from fltac_ray import api

        return getattr(api, name)
    raise AttributeError(f"module 'fltac_ray' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names (lazy ones included), so tab completion offers them."""
    return sorted(__all__)
