"""How many worker actors to start and which simulated clients each one hosts. Pure functions."""

from __future__ import annotations

import math

from fltac_ray.config import EngineConfig
from fltac_ray.errors import ConfigError, ConfigIssue


def plan_worker_count(num_clients: int, engine: EngineConfig, cpus: float, gpus: float) -> int:
    """Workers that fit the cluster's CPUs/GPUs (after the coordinator), at most one per client."""
    free_cpus = cpus - engine.coordinator_cpus
    fit = math.floor(free_cpus / engine.cpus_per_worker + 1e-9)
    if engine.gpus_per_worker > 0:
        fit = min(fit, math.floor(gpus / engine.gpus_per_worker + 1e-9))
    if engine.clients_per_actor is not None:
        wanted = math.ceil(num_clients / engine.clients_per_actor)
        field, value = "engine.clients_per_actor", engine.clients_per_actor
    elif engine.num_workers is not None:
        wanted = engine.num_workers
        field, value = "engine.num_workers", engine.num_workers
    else:
        wanted, field, value = min(num_clients, fit), None, None
    if wanted < 1 or wanted > fit:
        need = f"{wanted} workers x {engine.cpus_per_worker} CPU"
        if engine.gpus_per_worker > 0:
            need += f" and x {engine.gpus_per_worker} GPU"
        raise ConfigError([ConfigIssue(
            field or "engine.cpus_per_worker",
            value if field else engine.cpus_per_worker,
            f"needs {need} (+ {engine.coordinator_cpus} CPU for the coordinator) but the Ray "
            f"cluster has {cpus:g} CPU and {gpus:g} GPU; lower engine.cpus_per_worker / "
            "engine.gpus_per_worker (fractions are fine) or use fewer workers",
        )])
    return min(wanted, num_clients)


def assign_clients(loads: dict[int, int], num_workers: int, capacity: int | None = None) -> list[list[int]]:
    """Spread clients over workers, heaviest first onto the least-loaded worker (LPT), so a worker
    with many multi-task clients does not hold up the round. `capacity` caps clients per worker."""
    bins: list[list[int]] = [[] for _ in range(num_workers)]
    totals = [0] * num_workers
    for client in sorted(loads, key=lambda c: (-loads[c], c)):
        open_bins = [w for w in range(num_workers) if capacity is None or len(bins[w]) < capacity]
        target = min(open_bins, key=lambda w: (totals[w], len(bins[w]), w))
        bins[target].append(client)
        totals[target] += loads[client]
    return [sorted(b) for b in bins]
