"""FFA-LoRA: federated freeze-A LoRA (Sun et al., ICLR 2024, "Improving LoRA in
Privacy-preserving Federated Learning", arXiv 2403.12313).

Every client starts from the same seeded adapter v^0; its A matrices stay frozen at that shared
random initialisation and only B (and the classifier head) train, are sent and are averaged.
With A fixed, averaging B averages the LoRA update B A exactly, which plain FedAvg of A and B
does not. The traffic is B and the head.

`adapters`: one adapter per local task (per_task, FL-TAC's client side: every task's adapter is
averaged into the one global model), or, as in the paper and FedIT, one adapter per client
trained on each of its tasks in turn (per_client): FedIT with A frozen, the pairing for
comparing LoRA and FFA-LoRA under differential privacy.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from fltac_ray.algorithms.base import Aggregate, FederatedAlgorithm
from fltac_ray.algorithms.options import AggregationOptions


class FFAOptions(AggregationOptions):
    adapters: Literal["per_task", "per_client"] = Field(
        default="per_task", description="one adapter per local task, or one per client trained on each of its "
        "tasks in turn (the paper's and FedIT's)")


class FFALoRA(FederatedAlgorithm):
    name = "ffa"
    summary = "FFA-LoRA: LoRA A frozen at the shared random init; B and the head trained and averaged"
    Options = FFAOptions

    def client_adapters(self, tasks: list[str]) -> list[list[str]]:
        if self.options.adapters == "per_client":
            return [list(tasks)]
        return super().client_adapters(tasks)

    def trainable_entries(self) -> np.ndarray:
        return ~self.spec.lora_a()

    def shared_entries(self) -> np.ndarray:
        return ~self.spec.lora_a()

    def global_adapters(self, outcome: Aggregate) -> np.ndarray | None:
        # the global model: the shared frozen A of v^0 with the averaged B and head
        adapters = np.repeat(self.initial[:1], len(outcome.adapters), axis=0)
        adapters[:, self.shared_entries()] = outcome.adapters
        return adapters
