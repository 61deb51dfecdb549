"""K-means backends (cuML on GPU, scikit-learn otherwise) and clustering-quality metrics.

The quality metrics compare the server's clusters with the hidden true task ids; they are
computed for reporting only and never reach the algorithm.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score

from fltac_ray.errors import ResourceUnavailableError

log = logging.getLogger(__name__)
CUML_HINT = 'pip install "fltac-ray[$(python -m fltac_ray.gpu_extra)]"  (cuML of the CUDA major of your torch: gpu-cu13 or gpu-cu12)'


def _cuml_usable() -> bool:
    try:
        import cuml  # noqa: F401
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or CUDA present but no device
        return False


def resolve_backend(requested: str) -> str:
    """'auto' -> 'cuml' when cuML imports and a GPU is visible, else 'sklearn'."""
    if requested == "sklearn":
        return "sklearn"
    usable = _cuml_usable()
    if requested == "cuml" and not usable:
        raise ResourceUnavailableError(
            "federation.clustering_backend = 'cuml' but cuML or a GPU is not available here; "
            f"use 'auto' or 'sklearn', or install it: {CUML_HINT}"
        )
    return "cuml" if usable else "sklearn"


def kmeans_labels(vectors: np.ndarray, n_clusters: int, seed: int, n_init: int, backend: str,
                  scratch: bool = False) -> np.ndarray:
    """Cluster ids (n,) for vectors (n, d). With n <= n_clusters every vector is its own cluster.
    `scratch`: the caller owns `vectors` and lets scikit-learn centre them in place (restored to
    float rounding afterwards) instead of copying them."""
    n = len(vectors)
    if n <= n_clusters:
        return np.arange(n)
    if backend == "cuml":
        from cuml.cluster import KMeans as CuKMeans

        # cuML copies host arrays to the GPU; float32 C-order is its native layout (anything else
        # costs a conversion pass there), and numpy output avoids a cupy round trip.
        model = CuKMeans(n_clusters=n_clusters, random_state=seed, n_init=n_init, output_type="numpy")
        return np.asarray(model.fit_predict(np.ascontiguousarray(vectors, dtype=np.float32))).astype(np.int64)
    from sklearn.cluster import KMeans

    in_place = scratch and vectors.flags.writeable and vectors.flags.c_contiguous
    model = KMeans(n_clusters=n_clusters, random_state=seed, n_init=n_init, copy_x=not in_place)
    return model.fit_predict(vectors).astype(np.int64)


def hungarian_accuracy(true_labels: Sequence, cluster_labels: Sequence) -> float:
    """Share of items whose cluster maps to their true label under the best one-to-one matching."""
    true_ids, true_idx = np.unique(np.asarray(true_labels), return_inverse=True)
    cluster_ids, cluster_idx = np.unique(np.asarray(cluster_labels), return_inverse=True)
    if len(true_idx) == 0:
        return float("nan")
    counts = np.zeros((len(cluster_ids), len(true_ids)), dtype=np.int64)
    np.add.at(counts, (cluster_idx, true_idx), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(true_idx))


def adjusted_rand(true_labels: Sequence, cluster_labels: Sequence) -> float:
    return float(adjusted_rand_score(np.asarray(true_labels), np.asarray(cluster_labels)))
