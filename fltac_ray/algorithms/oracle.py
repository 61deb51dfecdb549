"""Oracle clustering: FL-TAC's aggregation with K-means replaced by the true task ids.

Not a deployable method (the server would need task labels): it is the ceiling for FL-TAC's
clustering step. Same per-task adapters, same sample-weighted per-cluster FedAvg; each upload
carries its true task as meta (no model parameter, so not counted as traffic).

Under a concept shift (data.concept_shift) every cluster is a task, so this is also FLoRAL's
"ensemble with the optimal router" baseline (Almansoori et al. 2024): C separate models, each
client routed to its true cluster's; on a frozen backbone a model is an adapter with its own head.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fltac_ray.algorithms.base import Aggregate, ClientJob, FederatedAlgorithm, Upload, Uploads
from fltac_ray.algorithms.options import AggregationOptions


class OracleClustering(FederatedAlgorithm):
    name = "oracle"
    recovers_tasks = True
    summary = ("FL-TAC aggregation grouped by the true task ids (ceiling of the clustering step; "
               "under a concept shift, FLoRAL's optimal-router ensemble)")
    Options = AggregationOptions

    def upload(self, job: ClientJob, trained: np.ndarray, private: np.ndarray,
               meta: dict[str, Any]) -> Upload | None:
        return Upload(job.key, trained, job.num_samples, meta={"task": "+".join(job.tasks)})

    def aggregate(self, uploads: Uploads, round_index: int) -> Aggregate:
        if "task" not in uploads.meta:
            raise ValueError("oracle clustering needs the uploads' true task labels")
        _, labels = np.unique(np.asarray(uploads.meta["task"]), return_inverse=True)
        return self.cluster_means(uploads.vectors, labels, uploads.num_samples)
