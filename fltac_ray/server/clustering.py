"""K-means backends (cuML or torch on a GPU, scikit-learn otherwise) and clustering-quality metrics.

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


def _torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_backend(requested: str) -> str:
    """'auto' -> 'cuml' when cuML imports and a GPU is visible, else 'torch' when a GPU is
    visible (torch is always installed; cuML is ~3.8 GB), else 'sklearn'."""
    if requested in ("sklearn", "torch"):
        return requested
    usable = _cuml_usable()
    if requested == "cuml" and not usable:
        raise ResourceUnavailableError(
            "algorithm.clustering_backend = 'cuml' but cuML or a GPU is not available here; "
            f"use 'auto', 'torch' or 'sklearn', or install it: {CUML_HINT}"
        )
    if usable:
        return "cuml"
    return "torch" if _torch_cuda() else "sklearn"


def torch_kmeans(vectors: np.ndarray, n_clusters: int, seed: int, n_init: int, max_iter: int = 300,
                 tol: float = 1e-4, device: str | None = None) -> np.ndarray:
    """K-means in torch, on the GPU when one is visible: Lloyd's iterations from k-means++ starts
    (Arthur & Vassilvitskii, 2007), `n_init` seeded restarts, the lowest inertia kept; stops when
    the centres move less than `tol` x the data's mean variance (scikit-learn's rule). Vectors
    are centred first (distances unchanged; less cancellation in |x|^2 - 2 x.c + |c|^2). An
    emptied cluster keeps its centre. Returns (n,) int64 cluster ids."""
    import torch

    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(where)  # (n, d)
    x = x - x.mean(dim=0)
    squares = (x * x).sum(dim=1)  # (n,)
    threshold = tol * float(x.var(dim=0).mean())
    generator = torch.Generator().manual_seed(seed)  # on the host: the same draws on any device
    best_inertia, best_labels = float("inf"), None
    for _ in range(n_init):
        centres = _kmeans_plus_plus(x, squares, n_clusters, generator)  # (k, d)
        for _ in range(max_iter):
            labels = _squared_distances(x, squares, centres).argmin(dim=1)  # (n,)
            sums = torch.zeros_like(centres).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=n_clusters).to(x.dtype)[:, None]
            moved = torch.where(counts > 0, sums / counts.clamp(min=1.0), centres)
            shift = float(((moved - centres) ** 2).sum())
            centres = moved
            if shift <= threshold:
                break
        closest, labels = _squared_distances(x, squares, centres).min(dim=1)
        inertia = float(closest.clamp(min=0.0).sum())
        if inertia < best_inertia:
            best_inertia, best_labels = inertia, labels
    return best_labels.cpu().numpy().astype(np.int64)


def _squared_distances(x, squares, centres):
    """(n, k) squared distances of x (n, d) to centres (k, d), from |x|^2 (n,) already known."""
    return squares[:, None] - 2.0 * (x @ centres.T) + (centres * centres).sum(dim=1)[None, :]


def _kmeans_plus_plus(x, squares, n_clusters: int, generator):
    """k-means++ starts: the first centre uniformly at random, each next one drawn with
    probability proportional to the squared distance to the nearest centre chosen so far."""
    import torch

    n = x.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = (squares - 2.0 * (x @ x[chosen[0]]) + squares[chosen[0]]).clamp(min=0.0)  # (n,)
    for _ in range(1, n_clusters):
        weights = nearest.double().cpu()
        pick = int(torch.multinomial(weights, 1, generator=generator)) if float(weights.sum()) > 0 else \
            int(torch.randint(n, (1,), generator=generator))
        chosen.append(pick)
        nearest = torch.minimum(nearest, (squares - 2.0 * (x @ x[pick]) + squares[pick]).clamp(min=0.0))
    return x[chosen].clone()


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
    if backend == "torch":
        return torch_kmeans(vectors, n_clusters, seed, n_init)
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
