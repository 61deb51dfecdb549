"""Server-side checks on uploaded adapters, run before anything is clustered."""

from __future__ import annotations

import numpy as np


def upload_problem(vector: np.ndarray, num_samples: int, adapter_size: int) -> str | None:
    """Why an upload must be rejected, or None when it is usable."""
    if vector.shape != (adapter_size,):
        return f"shape {vector.shape}, expected ({adapter_size},)"
    if vector.dtype != np.float32:
        return f"dtype {vector.dtype}, expected float32"
    if not np.isfinite(vector).all():
        return "non-finite values (NaN or Inf)"
    if num_samples <= 0:
        return f"non-positive sample count {num_samples}"
    return None


def answer_problem(labels: np.ndarray, adapters: np.ndarray, uploads: int) -> str | None:
    """Why an algorithm's Aggregate cannot be sent back, or None: `labels` (n,) integers
    indexing the rows of `adapters` (k, p), which must be finite."""
    labels, adapters = np.asarray(labels), np.asarray(adapters)
    if adapters.ndim != 2:
        return f"Aggregate.adapters has shape {adapters.shape}, expected (clusters, width)"
    if labels.shape != (uploads,):
        return f"Aggregate.labels has shape {labels.shape}, expected ({uploads},): one per accepted upload"
    if uploads and not np.issubdtype(labels.dtype, np.integer):
        return f"Aggregate.labels has dtype {labels.dtype}, expected integers"
    if uploads and (labels.min() < 0 or labels.max() >= len(adapters)):
        return f"Aggregate.labels holds {int(labels.min())}..{int(labels.max())}, outside the {len(adapters)} rows of adapters"
    if not np.issubdtype(adapters.dtype, np.floating):
        return f"Aggregate.adapters has dtype {adapters.dtype}, expected floating point"
    bad = ~np.isfinite(adapters).all(axis=1)
    if bad.any():
        return f"Aggregate.adapters has non-finite values (NaN or Inf) in row(s) {np.flatnonzero(bad)[:8].tolist()}"
    return None


def merged_problem(adapter: np.ndarray, size: int) -> str | None:
    """Why a client's adapter after `merge` cannot be committed, or None."""
    if np.shape(adapter) != (size,):
        return f"returned shape {np.shape(adapter)}, expected ({size},)"
    if not np.isfinite(adapter).all():
        return "returned non-finite values (NaN or Inf)"
    return None
