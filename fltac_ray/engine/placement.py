"""How many worker actors to start. Pure function (which jobs each runs: engine/scheduling.py)."""

from __future__ import annotations

import math

from fltac_ray.config import EngineConfig
from fltac_ray.errors import ConfigError, ConfigIssue


def plan_worker_count(num_clients: int, engine: EngineConfig, cpus: float, gpus: float,
                      elastic: bool = False) -> int:
    """Workers that fit the cluster's CPUs/GPUs (after the coordinator), at most one per client.

    `elastic` (joining a cluster that may grow: engine.ray_address set): an explicit pool
    (engine.num_workers, engine.clients_per_actor) is not checked against what the cluster has
    now, since the backend waits for it (engine.reserve_timeout_s); the automatic pool is what
    fits now, at least one worker."""
    free_cpus = cpus - engine.coordinator_cpus
    free_gpus = gpus - engine.coordinator_gpus
    gpus_per_worker = engine.gpus_per_worker or 0.0  # None (unresolved): the backend resolves it first
    fit = math.floor(free_cpus / engine.cpus_per_worker + 1e-9)
    if gpus_per_worker > 0:
        fit = min(fit, math.floor(free_gpus / gpus_per_worker + 1e-9))
    if engine.clients_per_actor is not None:
        wanted = math.ceil(num_clients / engine.clients_per_actor)
        field, value = "engine.clients_per_actor", engine.clients_per_actor
    elif engine.num_workers is not None:
        wanted = engine.num_workers
        field, value = "engine.num_workers", engine.num_workers
    else:
        wanted, field, value = min(num_clients, max(fit, 1) if elastic else fit), None, None
    if elastic and wanted >= 1:
        return min(wanted, num_clients)
    if wanted < 1 or wanted > fit:
        need = f"{wanted} workers x {engine.cpus_per_worker} CPU"
        if gpus_per_worker > 0:
            need += f" and x {gpus_per_worker} GPU"
        raise ConfigError([ConfigIssue(
            field or "engine.cpus_per_worker",
            value if field else engine.cpus_per_worker,
            f"needs {need} (+ {engine.coordinator_cpus} CPU, {engine.coordinator_gpus} GPU for the coordinator) but the Ray "
            f"cluster has {cpus:g} CPU and {gpus:g} GPU; lower engine.cpus_per_worker / "
            "engine.gpus_per_worker (fractions are fine) or use fewer workers",
        )])
    return min(wanted, num_clients)
