"""Running a round's units of work (training passes, evaluation chunks) on the live workers:
spread longest first over the workers (LPT, engine/scheduling.py), results waited for as they
come, and a unit whose worker or node died retried on the least-loaded live worker from the
same committed state, at most engine.max_retries times, so a retry gives the same result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fltac_ray.engine.ray.actors import WorkerSlot
from fltac_ray.engine.ray.pool import WorkerPool
from fltac_ray.engine.scheduling import assign_lpt
from fltac_ray.errors import EngineError

#: submit(actor, unit) -> (the reference to wait on, whether that task runs on the coordinator)
Submit = Callable[[Any, int], tuple[Any, bool]]


def run_units(pool: WorkerPool, costs: Sequence[float], submit: Submit, what: str,
              after_submit: Callable[[], None] | None = None) -> tuple[dict[int, Any], list[int]]:
    """Run units 0..n-1 on the pool's live workers, LPT by cost. Returns ({unit: value}, units
    that failed every retry)."""
    import ray
    from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

    engine = pool.config.engine
    live = pool.await_live(what)
    load = dict.fromkeys(live, 0.0)
    # ref -> (unit, slot, generation, whether the awaited task runs on the coordinator)
    pending: dict[Any, tuple[int, WorkerSlot, int, bool]] = {}

    def send(unit: int, index: int) -> None:
        slot = pool.slots[index]
        ref, on_coordinator = submit(slot.actor, unit)
        pending[ref] = (unit, slot, slot.generation, on_coordinator)
        load[index] = load.get(index, 0.0) + costs[unit]

    for index, units in assign_lpt(costs, live).items():
        for unit in units:
            send(unit, index)
    if after_submit is not None:
        after_submit()
    done: dict[int, Any] = {}
    failed: list[int] = []
    attempts = dict.fromkeys(range(len(costs)), 0)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=engine.actor_timeout_s)
        if not ready:
            raise EngineError(f"{what} took longer than engine.actor_timeout_s = {engine.actor_timeout_s:g}s")
        unit, slot, generation, on_coordinator = pending.pop(ready[0])
        load[slot.index] -= costs[unit]
        try:
            done[unit] = ray.get(ready[0])
            continue
        except (RayActorError, ObjectLostError, RayTaskError) as exc:
            classify_failure(exc, what, slot, on_coordinator)
        if generation == slot.generation and slot.up:  # the first sign of this loss
            slot.up = False
            pool.lose(slot, what)
        attempts[unit] += 1
        if attempts[unit] > engine.max_retries:
            failed.append(unit)
            continue
        live = pool.await_live(what)
        target = min(live, key=lambda index: (load.get(index, 0.0), index))
        send(unit, target)
    return done, sorted(failed)


def classify_failure(exc: Exception, what: str, slot: WorkerSlot, on_coordinator: bool) -> None:
    """Return when the failure means the unit's worker (or its node, with the unit's result)
    is gone, so the unit is retried; raise EngineError for anything else."""
    from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

    lost = (RayActorError, ObjectLostError)
    if isinstance(exc, RayTaskError):
        # A task whose input died with a worker or its node fails with that as its cause.
        if isinstance(exc, lost) or isinstance(exc.cause, lost):
            return
        raise EngineError(f"{what} failed on worker {slot.index}: {exc}") from exc
    if on_coordinator:
        raise EngineError(f"{what}: the coordinator was lost ({exc}); the run cannot go on: resume "
                          "it from its last checkpoint (fltac-ray run --resume)") from exc
