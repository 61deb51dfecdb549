"""FedIT: federated instruction tuning with one LoRA adapter per client (Zhang et al., 2023,
"Towards Building the Federated GPT", arXiv 2305.05644).

Each client trains a single adapter over all its tasks in turn (as in the FL-TAC authors'
baseline) and the server averages every upload, weighted by the client's example count (the
default aggregate).
"""

from __future__ import annotations

from fltac_ray.algorithms.base import FederatedAlgorithm


class FedIT(FederatedAlgorithm):
    name = "fedit"
    summary = "FedIT: one adapter per client trained over all its tasks; FedAvg"
    options = frozenset({"federation.weighting", "federation.aggregation", "federation.trim_fraction"})

    def client_adapters(self, tasks: list[str]) -> list[list[str]]:
        return [list(tasks)]  # one adapter, trained on each task in turn
