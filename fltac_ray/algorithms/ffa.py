"""FFA-LoRA: federated freeze-A LoRA (Sun et al., ICLR 2024, "Improving LoRA in
Privacy-preserving Federated Learning", arXiv 2403.12313).

Every client starts from the same seeded adapter v^0; its A matrices stay frozen at that shared
random initialisation and only B (and the classifier head) train, are sent and are averaged.
With A fixed, averaging B averages the LoRA update B A exactly, which plain FedAvg of A and B
does not. The traffic is B and the head.
"""

from __future__ import annotations

import numpy as np

from fltac_ray.algorithms.base import Aggregate, FederatedAlgorithm
from fltac_ray.algorithms.options import AggregationOptions


class FFALoRA(FederatedAlgorithm):
    name = "ffa"
    summary = "FFA-LoRA: LoRA A frozen at the shared random init; B and the head trained and averaged"
    Options = AggregationOptions

    def trainable_entries(self) -> np.ndarray:
        return ~self.spec.lora_a()

    def shared_entries(self) -> np.ndarray:
        return ~self.spec.lora_a()

    def global_adapters(self, outcome: Aggregate) -> np.ndarray | None:
        # the global model: the shared frozen A of v^0 with the averaged B and head
        adapters = np.repeat(self.initial[:1], len(outcome.adapters), axis=0)
        adapters[:, self.shared_entries()] = outcome.adapters
        return adapters
