"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

FedAvg over one global adapter (algorithms/global_model.py) whose clients minimise

    h_k(w) = F_k(w) + mu/2 ||w - w^t||^2

where w^t is the global adapter the round began from: the proximal term holds local training
near it when the clients' data differ. Its gradient, mu (w - w^t), reaches every adapter entry
that trains (the classifier head included). mu = 0 is FedAvg over the same global adapter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from fltac_ray.algorithms.global_model import GlobalModelAlgorithm, GlobalModelOptions
from fltac_ray.algorithms.local_training import LocalContext, LocalTraining, rows_of

if TYPE_CHECKING:
    from torch import Tensor


class FedProxOptions(GlobalModelOptions):
    mu: float = Field(default=0.01, ge=0, description="weight of the proximal term mu/2 ||w - w^t||^2 "
                      "(the paper tries 0.001-1); 0: FedAvg")


class ProximalTerm(LocalTraining):
    """penalty_j = mu/2 sum over layout tensors of ||w_j - start_j||^2."""

    def __init__(self, mu: float, optimizer: str = "adamw") -> None:
        super().__init__(optimizer)
        self.mu = mu

    def penalty(self, adapters: list[Tensor], context: LocalContext) -> Tensor | None:
        if self.mu == 0:
            return None
        anchors = rows_of(context.start, context.active)
        # each (active, *shape) -> (active,) squared distance, summed over the layout tensors
        squared = sum((w - a).pow(2).flatten(1).sum(1) for w, a in zip(adapters, anchors, strict=True))
        return 0.5 * self.mu * squared


class FedProx(GlobalModelAlgorithm):
    name = "fedprox"
    summary = "FedProx: FedAvg over one global adapter, local objective + mu/2 ||w - w^t||^2"
    Options = FedProxOptions

    def local_training(self) -> LocalTraining:
        return ProximalTerm(self.options.mu, self.options.local_optimizer)
