"""What a method changes in local training: its objective, its gradients and its optimiser.

One rule serves both training paths (training.train_adapter, one adapter at a time, and
batched_training.train_batched, many adapters per pass) and both backends. Every hook sees the
pass's adapters *stacked*: a list over the adapter's layout tensors (models/adapter_model
.adapter_layout order), each (n, *shape) with row j the adapter of job j; one-by-one training
is n = 1. Only the leading `context.active` rows train at a given step (jobs with fewer steps
drop out), so hooks read and write rows [:active].

Per step, for the active rows:
    loss_j  = mean loss of job j's batch + penalty(adapters)[j]     (differentiated)
    g_j     = d loss_j / d adapter_j  -> correct_gradients(g)        (in place)
    adapter = optimizer step on g                                    (per row)

The defaults are plain local training (no penalty, gradients as they are, AdamW), which every
algorithm that does not override `FederatedAlgorithm.local_training` gets. Torch is used only
through tensor methods here, so this module imports without torch (config validation stays
light).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor


@dataclass
class LocalContext:
    """What a step's hooks may read besides the adapters and their gradients."""

    # (n, *shape) per layout tensor: each adapter as it was when this round's local training
    # began (FedProx's anchor), whatever the number of tasks it has trained on since
    start: list[Tensor]
    # the algorithm's `local_inputs`, by name, in the same stacked form (SCAFFOLD: c - c_i)
    inputs: dict[str, list[Tensor]] = field(default_factory=dict)
    active: int = 1  # rows 0..active-1 train at this step
    step: int = 0  # the step's index in the pass (0-based)


class RowOptimizer(Protocol):
    """An optimiser over stacked (n, *shape) tensors whose rows are independent optimisers."""

    def step(self, active: int, take: np.ndarray | None = None, grads: list[Tensor] | None = None) -> None:
        """Step rows 0..active-1 (or those where `take`, (active,) bool, is True) with `grads`
        (the params' own .grad when None)."""


class LocalTraining:
    """Plain local training; subclass and override what a method changes (FedProx: `penalty`;
    SCAFFOLD: `correct_gradients`). `optimizer`: "adamw" (torch.optim.AdamW per adapter, the
    reference code's) or "sgd" (torch.optim.SGD without momentum)."""

    OPTIMIZERS = ("adamw", "sgd")

    def __init__(self, optimizer: str = "adamw") -> None:
        if optimizer not in self.OPTIMIZERS:
            raise ValueError(f"local optimizer {optimizer!r}: use one of {list(self.OPTIMIZERS)}")
        self.optimizer_name = optimizer

    def penalty(self, adapters: list[Tensor], context: LocalContext) -> Tensor | None:
        """(active,) a term added to each adapter's objective, differentiable in `adapters`
        (rows [:active] of each stacked tensor); None: no term. The reported training loss
        stays the data loss."""
        return None

    def correct_gradients(self, grads: list[Tensor], context: LocalContext) -> None:
        """Change the gradients of rows [:active] in place before the optimiser steps (after
        float16 unscaling; a row whose gradients overflowed skips the step anyway)."""

    def optimizer(self, params: list[Tensor], lr: float, weight_decay: float) -> RowOptimizer:
        """A fresh optimiser for one pass, as the reference code builds one per (client, task,
        round); `params`: the stacked adapter tensors."""
        from fltac_ray.client.local_optimizers import BatchedAdamW, BatchedSGD

        if self.optimizer_name == "sgd":
            return BatchedSGD(params, lr, weight_decay)
        return BatchedAdamW(params, lr, weight_decay)


def rows_of(tensors: list[Tensor], active: int) -> list[Tensor]:
    """Rows [:active] of each stacked tensor (views)."""
    return [tensor[:active] for tensor in tensors]
