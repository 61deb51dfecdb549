"""Per-round scheduling of client jobs onto workers. Pure functions, no Ray.

A round's sampled (client, slot) jobs are first cut into *passes*: the jobs one worker trains
together in one batched pass (engine.max_batched_adapters at most). The cut depends only on the
jobs and the config (engine.min_passes), never on the workers, so a pass gives the same result
on any worker and a lost worker's passes are retried elsewhere with identical results. Passes
are then spread over the live workers longest first onto the least loaded (LPT: within 4/3 of
the best possible round time).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fltac_ray.engine.messages import TrainJob


def plan_passes(jobs: Sequence[TrainJob], max_adapters: int, min_passes: int, batched: bool
                ) -> list[list[TrainJob]]:
    """Cut the round's jobs into passes. One-by-one training: one job per pass (results do not
    depend on the grouping). Batched: max(ceil(n / max_adapters), min(n, min_passes)) passes
    of balanced cost (LPT over the jobs, sorted by cost then key, so the cut is deterministic),
    each holding at most max_adapters jobs; jobs inside a pass sorted by key."""
    ordered = sorted(jobs, key=lambda job: (-job.cost, job.key))
    if not batched:
        return [[job] for job in sorted(jobs, key=lambda job: job.key)]
    if not ordered:
        return []
    count = max(math.ceil(len(ordered) / max_adapters), min(len(ordered), max(1, min_passes)))
    passes: list[list[TrainJob]] = [[] for _ in range(count)]
    loads = [0] * count
    for job in ordered:
        open_passes = [p for p in range(count) if len(passes[p]) < max_adapters]
        target = min(open_passes, key=lambda p: (loads[p], len(passes[p]), p))
        passes[target].append(job)
        loads[target] += job.cost
    return [sorted(p, key=lambda job: job.key) for p in passes if p]


def assign_lpt(costs: Sequence[float], workers: Sequence[int], loads: dict[int, float] | None = None
               ) -> dict[int, list[int]]:
    """Item indices per worker: largest cost first onto the least loaded worker (ties: the
    lower worker id). `loads`: work the workers already hold (a retry after a lost worker)."""
    if not workers:
        raise ValueError("no live worker to schedule on")
    total = {w: float((loads or {}).get(w, 0.0)) for w in workers}
    plan: dict[int, list[int]] = {w: [] for w in workers}
    for item in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        worker = min(workers, key=lambda w: (total[w], w))
        plan[worker].append(item)
        total[worker] += costs[item]
    return plan


def utilisation(worker_seconds: Sequence[float]) -> float:
    """Mean over max of the workers' busy time in a round: 1.0 when all finish together."""
    busiest = max(worker_seconds, default=0.0)
    return float(sum(worker_seconds) / len(worker_seconds) / busiest) if busiest > 0 else 1.0
