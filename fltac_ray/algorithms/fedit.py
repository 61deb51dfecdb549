"""FedIT: federated instruction tuning with one LoRA adapter per client (Zhang et al., 2023,
"Towards Building the Federated GPT", arXiv 2305.05644).

Each client trains a single adapter over all its tasks in turn (as in the FL-TAC authors'
baseline) and the server averages every upload, weighted by the client's example count.
"""

from __future__ import annotations

import numpy as np

from fltac_ray.algorithms.base import Aggregate, FederatedAlgorithm, Uploads


class FedIT(FederatedAlgorithm):
    name = "fedit"

    def client_adapters(self, tasks: list[str]) -> list[list[str]]:
        return [list(tasks)]  # one adapter, trained on each task in turn

    def aggregate(self, uploads: Uploads, round_index: int) -> Aggregate:
        labels = np.zeros(len(uploads.vectors), dtype=np.int64)
        return self.cluster_means(uploads.vectors, labels, uploads.num_samples)
