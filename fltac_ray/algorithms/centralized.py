"""Centralized LoRA: all clients' data pooled in one place, one adapter per task.

The upper reference line. The step budget matches the federated run: a task held by h clients
trains for h * local_steps * client_fraction steps per round on the pooled data (the number of
local steps the federation spends on it), and nothing is communicated.
"""

from __future__ import annotations

import numpy as np

from fltac_ray.algorithms.base import Aggregate, FederatedAlgorithm, Uploads


class Centralized(FederatedAlgorithm):
    name = "centralized"
    communicates = False
    pools_data = True

    def aggregate(self, uploads: Uploads, round_index: int) -> Aggregate:
        n = len(uploads.vectors)
        return Aggregate(np.arange(n), uploads.vectors.astype(np.float32), self.weights(uploads.num_samples))
