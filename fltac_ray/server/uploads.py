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
