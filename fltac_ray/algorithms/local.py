"""Local-only training: every client keeps its own per-task adapters; nothing is communicated.

The lower reference line: what a client reaches with its own data alone.
"""

from __future__ import annotations

import numpy as np

from fltac_ray.algorithms.base import Aggregate, FederatedAlgorithm, Uploads


class LocalOnly(FederatedAlgorithm):
    name = "local"
    communicates = False

    def aggregate(self, uploads: Uploads, round_index: int) -> Aggregate:
        # Identity: each adapter is returned to its owner unchanged (the engine skips the call).
        n = len(uploads.vectors)
        return Aggregate(np.arange(n), uploads.vectors.astype(np.float32), self.weights(uploads.num_samples))
