"""FedSA-LoRA: selective aggregation for low-rank adaptation (Guo et al., ICLR 2025, "Selective
Aggregation for Low-Rank Adaptation in Federated Learning", arXiv 2410.01463).

The A matrices learn what clients share, the B matrices what is particular to each client: a
client trains its whole adapter, sends only its A matrices, and replaces them with the server's
average; its B matrices (and its classifier head) never leave it. The traffic is A alone.
There is no global adapter to export: every client's adapter is its own.
"""

from __future__ import annotations

import numpy as np

from fltac_ray.algorithms.base import Aggregate, FederatedAlgorithm
from fltac_ray.algorithms.options import AggregationOptions


class FedSALoRA(FederatedAlgorithm):
    name = "fedsa"
    summary = "FedSA-LoRA: LoRA A averaged by FedAvg; B and the head stay on each client"
    Options = AggregationOptions

    def shared_entries(self) -> np.ndarray:
        return self.spec.lora_a()  # sent, averaged, replaced; the rest stays with the client

    def global_adapters(self, outcome: Aggregate) -> np.ndarray | None:
        return None  # personal adapters: a shared A without any client's B is no model
