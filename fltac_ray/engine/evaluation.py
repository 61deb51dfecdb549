"""Evaluation that reuses what has not changed: each round evaluates only the adapters whose
committed state differs (by digest) from when they were last evaluated (engine/evaluation_cache.py
keeps the records), cut into chunks by the run's fixed pass count, so the records do not depend
on which workers are up."""

from __future__ import annotations

from collections.abc import Callable

from fltac_ray.algorithms.types import AdapterKey
from fltac_ray.data.federated import FederatedData
from fltac_ray.engine.evaluation_cache import EvaluationCache
from fltac_ray.engine.messages import EvalJob, EvalRecord
from fltac_ray.engine.scheduling import assign_lpt


def eval_jobs(data: FederatedData, groups: dict[int, list[list[str]]], active: list[int]) -> list[EvalJob]:
    """Every active client's adapters, each with its tasks and test-example count."""
    jobs = []
    for client in active:
        shard = data.clients[client]
        for slot, group in enumerate(groups[client]):
            jobs.append(EvalJob((client, slot), tuple(group), sum(len(shard.tasks[t][1]) for t in group)))
    return jobs


def eval_chunks(jobs: list[EvalJob], workers: int) -> list[list[EvalJob]]:
    """About 2 chunks per worker (the run's fixed engine.min_passes) of equal test-example
    counts (a chunk is one call on one worker)."""
    chunks = assign_lpt([job.cost for job in jobs], list(range(min(len(jobs), 2 * workers))))
    return [[jobs[i] for i in sorted(items)] for _, items in sorted(chunks.items()) if items]


def evaluate_changed(round_index: int, backend, jobs: list[EvalJob], cache: EvaluationCache,
                     passes: int, phase: Callable[[str], None]) -> tuple[list[EvalRecord], int]:
    """Every active adapter's records, evaluating only the adapters whose committed state
    (adapter and private state, by digest) changed since their last evaluation: the others'
    records are reused (evaluation is deterministic: eval mode, fixed test examples; batched
    evaluation to the last float bits of what shares its pass, which is why the cache goes
    into checkpoints). `passes`: the run's engine.min_passes. Returns (records, adapters
    evaluated now)."""
    digests = backend.evaluation_digests([job.key for job in jobs])
    stale = [job for job in jobs if not cache.is_current(job.key, digests[job.key])]
    phase(f"round {round_index}: evaluating {len(stale)} of {len(jobs)} adapters "
          "(the rest unchanged since their last evaluation)")
    fresh: dict[AdapterKey, list[EvalRecord]] = {job.key: [] for job in stale}
    slot_of = {(job.key[0], task): job.key for job in stale for task in job.tasks}
    if stale:
        # chunks cut by the run's fixed pass count, not the live pool: the same records
        # whichever workers are up
        chunks = eval_chunks(stale, passes)
        for record in backend.evaluate(round_index, chunks):
            fresh[slot_of[(record.client_id, record.task)]].append(record)
    for key, records in fresh.items():
        cache.put(key, digests[key], records)
    return [record for job in jobs for record in cache.records(job.key)], len(stale)
