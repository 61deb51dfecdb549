"""Oracle clustering: FL-TAC's aggregation with K-means replaced by the true task ids.

Not a deployable method (the server would need task labels): it is the ceiling for FL-TAC's
clustering step. Same per-task adapters, same sample-weighted per-cluster FedAvg.
"""

from __future__ import annotations

import numpy as np

from fltac_ray.algorithms.base import Aggregate, FederatedAlgorithm, Uploads


class OracleClustering(FederatedAlgorithm):
    name = "oracle"
    needs_task_labels = True
    clusters_tasks = True

    def aggregate(self, uploads: Uploads, round_index: int) -> Aggregate:
        if uploads.task_labels is None:
            raise ValueError("oracle clustering needs the uploads' true task labels")
        _, labels = np.unique(np.asarray(uploads.task_labels), return_inverse=True)
        return self.cluster_means(uploads.vectors, labels, uploads.num_samples)
