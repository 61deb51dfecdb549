"""Adapters -> 2-D points: UMAP when umap-learn is installed (as in the paper's Fig. 4), else PCA."""

from __future__ import annotations

import numpy as np

METHODS = ("auto", "umap", "pca")


def umap_available() -> bool:
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


def project(vectors: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """(n, d) adapters -> ((n, 2) coordinates, the method used). UMAP needs at least 4 points
    (fewer fall back to PCA); `method="umap"` without umap-learn raises ImportError."""
    if method not in METHODS:
        raise ValueError(f"projection method {method!r}: use one of {METHODS}")
    vectors = np.asarray(vectors, dtype=np.float64)
    n = len(vectors)
    if n == 0:
        return np.zeros((0, 2)), "none"
    use_umap = method == "umap" or (method == "auto" and umap_available())
    if use_umap and n >= 4:
        import warnings

        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed,
                            init="random" if n < 10 else "spectral")
        with warnings.catch_warnings():
            # a seeded UMAP runs single-threaded and says so on every call
            warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
            return np.asarray(reducer.fit_transform(vectors)), "UMAP"
    return pca_2d(vectors), "PCA"


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """The first two principal components (zeros where the data has fewer directions)."""
    centred = vectors - vectors.mean(0, keepdims=True)
    out = np.zeros((len(vectors), 2))
    if len(vectors) < 2:
        return out
    # thin SVD of (n, d) with n << d: the scores are U * S
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    k = min(2, len(s))
    out[:, :k] = u[:, :k] * s[:k]
    return out
