"""FedIT: federated instruction tuning with one LoRA adapter per client (Zhang et al., 2023,
"Towards Building the Federated GPT", arXiv 2305.05644).

Each client trains a single adapter over all its tasks in turn (as in the FL-TAC authors'
baseline) and the server averages every upload, weighted by the client's example count (the
default aggregate). Its option `budget`: per_task (default) gives every task
train.local_steps, as many as an FL-TAC adapter gets, so a comparison isolates sharing one
adapter from training less; per_adapter splits train.local_steps over the client's tasks
(local_steps // tasks each, at least 1): the FL-TAC authors' baseline, one adapter's budget.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fltac_ray.algorithms.base import FederatedAlgorithm
from fltac_ray.algorithms.options import AggregationOptions


class FedITOptions(AggregationOptions):
    budget: Literal["per_task", "per_adapter"] = Field(
        default="per_task", description="local steps: train.local_steps for each task of the client's "
        "one adapter (per_task), or split over its tasks (per_adapter: the FL-TAC authors' baseline)")


class FedIT(FederatedAlgorithm):
    name = "fedit"
    summary = "FedIT: one adapter per client trained over all its tasks; FedAvg"
    Options = FedITOptions

    def client_adapters(self, tasks: list[str]) -> list[list[str]]:
        return [list(tasks)]  # one adapter, trained on each task in turn

    def task_steps(self, tasks: list[str], local_steps: int) -> tuple[int, ...]:
        if self.options.budget == "per_adapter":
            return (max(1, local_steps // len(tasks)),) * len(tasks)
        return super().task_steps(tasks, local_steps)
