"""Local-only training: every client keeps its own per-task adapters; nothing is communicated.

The lower reference line: what a client reaches with its own data alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fltac_ray.algorithms.base import ClientJob, FederatedAlgorithm, Upload


class LocalOnly(FederatedAlgorithm):
    name = "local"
    summary = "local only: per-task adapters, never communicated (lower reference)"

    def upload(self, job: ClientJob, trained: np.ndarray, private: np.ndarray,
               meta: dict[str, Any]) -> Upload | None:
        return None  # nothing leaves the client; merge() then keeps the trained adapter
