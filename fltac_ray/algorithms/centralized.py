"""Centralized LoRA: all clients' data pooled in one place, one adapter per task.

The upper reference line. The step budget matches the federated run: a task held by h clients
trains for h * local_steps * client_fraction steps per round on the pooled data (the number of
local steps the federation spends on it). It is local-only training of a single client that
holds everything, so nothing is communicated.
"""

from __future__ import annotations

from fltac_ray.algorithms.local import LocalOnly


class Centralized(LocalOnly):
    name = "centralized"
    pools_data = True
