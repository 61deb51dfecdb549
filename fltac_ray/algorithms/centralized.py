"""Centralized LoRA: all clients' data pooled in one place, one adapter per task.

The upper reference line. The step budget matches the federated run: a task held by h clients
trains for h * local_steps * client_fraction steps per round on the pooled data (the number of
local steps the federation spends on it). It is local-only training of a single client that
holds everything, so nothing is communicated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fltac_ray.algorithms.local import LocalOnly

if TYPE_CHECKING:
    from fltac_ray.data.federated import FederatedData


class Centralized(LocalOnly):
    name = "centralized"
    summary = "centralized LoRA: all data pooled, per-task adapters, same step budget (upper reference)"

    def federate(self, data: FederatedData) -> FederatedData:
        return data.pooled(self.config.train.local_steps, self.config.federation.client_fraction)
