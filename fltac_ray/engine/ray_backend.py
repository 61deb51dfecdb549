"""The Ray backend: stateless client workers as Ray actors, the server as the coordinator actor.

Every round the loop hands it passes of jobs; it spreads them over the live workers (LPT,
engine/scheduling.py) with one reference to the round's committed state (read by every worker
from the object store), and hands the results, as object references, straight to the
coordinator (uploads never pass through the driver). A worker that dies in any phase is replaced
and its unfinished work is resubmitted to the least-loaded live worker, from the same committed
state, so the retried work gives exactly the same result (engine.max_retries times per unit).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fltac_ray.engine.backend import Backend
from fltac_ray.engine.client_worker import ClientWorker
from fltac_ray.engine.messages import EvalJob, EvalRecord, PassReport, RoundOutcome, TrainJob
from fltac_ray.engine.scheduling import assign_lpt
from fltac_ray.errors import EngineError

RESERVE_REPORT_S = 10.0  # a progress line this often while the pool is waited for


class WorkerLost(EngineError):
    """A worker actor died (its process or node is gone); its work is retried elsewhere."""


def ship_by_value(cls: type) -> None:
    """Let Ray workers unpickle a user's algorithm class even where its module cannot be imported
    (a class defined in a script or a test file): cloudpickle then sends the module's code."""
    module = sys.modules.get(cls.__module__)
    if module is None or cls.__module__.startswith("fltac_ray."):
        return
    import ray.cloudpickle as cloudpickle

    cloudpickle.register_pickle_by_value(module)


class RayClientWorker(ClientWorker):
    """The client worker as a Ray actor: it also says which node it runs on."""

    def describe(self) -> dict[str, Any]:
        import ray

        return {**super().describe(), "node": ray.get_runtime_context().get_node_id()}


class RayBackend(Backend):
    name = "ray"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.workers: list[Any] = []
        self.coordinator: Any = None
        self.worker_pids: list[int] = []
        self.worker_nodes: list[str] = []
        self.group: Any = None  # the pool's placement group

    # --- set-up -----------------------------------------------------------------------------
    def _get(self, refs, what: str):
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        timeout = self.config.engine.actor_timeout_s
        try:
            return ray.get(refs, timeout=timeout)
        except GetTimeoutError as exc:
            raise EngineError(f"{what} took longer than engine.actor_timeout_s = {timeout:g}s") from exc
        except RayActorError as exc:
            raise WorkerLost(f"{what}: {exc}") from exc
        except RayTaskError as exc:
            raise EngineError(f"{what} failed: {exc}") from exc

    def _reserve(self, count: int):
        """The worker pool as a placement group, one bundle per worker, waited for: an autoscaler
        sees the whole demand at once and adds nodes meanwhile. Fails after
        engine.reserve_timeout_s, before any worker starts, saying what the cluster has."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        from fltac_ray.engine.ray_session import cluster_totals

        engine = self.config.engine
        bundle = {"CPU": engine.cpus_per_worker}
        if engine.gpus_per_worker > 0:
            bundle["GPU"] = engine.gpus_per_worker
        shape = " + ".join(f"{amount:g} {name}" for name, amount in bundle.items())
        group = placement_group([dict(bundle) for _ in range(count)], strategy="SPREAD")
        ready = group.ready()
        began, step = time.monotonic(), 1.0  # the first line after a second, then every RESERVE_REPORT_S
        while True:
            left = engine.reserve_timeout_s - (time.monotonic() - began)
            done, _ = ray.wait([ready], timeout=max(0.0, min(step, left)))
            step = RESERVE_REPORT_S
            if done:
                return group
            cpus, gpus = cluster_totals()
            if time.monotonic() - began >= engine.reserve_timeout_s:
                remove_placement_group(group)
                raise EngineError(
                    f"the cluster did not provide {count} worker(s) of {shape} within "
                    f"engine.reserve_timeout_s = {engine.reserve_timeout_s:g}s (it has {cpus:g} CPU, "
                    f"{gpus:g} GPU now, some perhaps on nodes too small for one worker); add nodes, "
                    "lower engine.num_workers / engine.cpus_per_worker / engine.gpus_per_worker, "
                    "or allow a longer wait")
            self.say(f"  waiting for the worker pool: {count} x ({shape}), "
                     f"{time.monotonic() - began:.0f}s of engine.reserve_timeout_s = "
                     f"{engine.reserve_timeout_s:g}s; the cluster has {cpus:g} CPU, {gpus:g} GPU now")

    def _start_worker(self, index: int):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        engine = self.config.engine
        placement = {}
        if self.group is not None:  # the worker's own bundle: a replacement takes its predecessor's
            placement["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=index)
        return ray.remote(RayClientWorker).options(
            num_cpus=engine.cpus_per_worker, num_gpus=engine.gpus_per_worker, **placement,
        ).remote(index, self.config, self.algorithm_class, self._clients_ref, self._tasks_ref,
                 self.data.head_classes, max(1, int(engine.cpus_per_worker)), True)

    def start(self) -> dict[str, Any]:
        import ray

        from fltac_ray.engine.placement import plan_worker_count
        from fltac_ray.engine.ray_session import cluster_totals
        from fltac_ray.engine.server import Server

        engine = self.config.engine
        cpus, gpus = cluster_totals()
        # Joining a cluster (engine.ray_address): it may grow, so the pool is waited for.
        count = plan_worker_count(len(self.active), engine, cpus, gpus, elastic=engine.ray_address is not None)
        from ray.util import get_current_placement_group

        if get_current_placement_group() is None:
            self.group = self._reserve(count)
        # else inside a placement group (a Ray Tune trial): the workers' bundles are already held
        # there, and the workers are placed in it (a second group would wait for what it holds)
        ship_by_value(self.algorithm_class)
        self._tasks_ref = ray.put(self.data.tasks)  # shipped once, zero-copy numpy in every worker
        self._clients_ref = ray.put(self.data.clients)
        self.workers = [self._start_worker(index) for index in range(count)]
        self.generation = [0] * count  # bumped when a worker is replaced
        described = self._get([w.describe.remote() for w in self.workers], "starting client workers")
        self.worker_pids = [d["pid"] for d in described]
        self.worker_nodes = [d["node"] for d in described]  # Ray node id of each worker
        nodes = set(self.worker_nodes)
        loaded = sum(d["loaded_base"] for d in described)
        how = f"loaded by {loaded} of {count} workers" if loaded else "found in the node cache"
        self.say(f"  base model {self.config.model.name} ({described[0]['base_bytes'] / 2**20:,.1f} MiB): "
                 f"{how}, memory-mapped by the workers on {len(nodes)} node(s) from "
                 f"{engine.base_cache_dir or '<node temp dir>/fltac-ray/bases'}; the driver never loads it")
        spec = described[0]["spec"]
        self.coordinator = ray.remote(Server).options(num_cpus=engine.coordinator_cpus).remote(
            self.config, self.algorithm_class, spec)
        kmeans = self._get(self.coordinator.clustering_backend.remote(), "starting the coordinator")
        return {"workers": count, "device": described[0]["device"], "batched": described[0]["batched"],
                "spec": spec, "kmeans_backend": kmeans,
                "resources": f"{engine.cpus_per_worker:g} CPU, {engine.gpus_per_worker:g} GPU each"}

    def initialise(self, count: int) -> None:
        initial = self._get(self.workers[0].initial_adapters.remote(count), "initialising the adapters")
        self._get(self.coordinator.set_initial.remote(initial), "broadcasting v^0")

    def server_state(self) -> dict[str, dict[str, np.ndarray]]:
        return self._get(self.coordinator.state.remote(), "collecting the server's state")

    def load_server_state(self, groups: dict[str, dict[str, np.ndarray]]) -> None:
        self._get(self.coordinator.load_state.remote(groups), "restoring the checkpoint")

    def take_snapshot(self) -> dict | None:
        return self._get(self.coordinator.take_snapshot.remote(), "taking the adapter snapshot")

    def export_outcome(self) -> dict | None:
        return self._get(self.coordinator.export_outcome.remote(), "collecting the global adapters")

    def process_ids(self) -> dict[str, int]:
        import os

        coordinator = self._get(self.coordinator.pid.remote(), "asking the coordinator's pid")
        ids = {"driver": os.getpid(), "coordinator": coordinator}
        ids.update({f"worker_{index}": pid for index, pid in enumerate(self.worker_pids)})
        return ids

    def kill_worker(self, index: int) -> None:
        """Fault injection: the worker's process goes away as if its node had died."""
        import ray

        ray.kill(self.workers[index % len(self.workers)], no_restart=True)

    def shutdown(self) -> None:
        import ray

        for actor in self.workers:
            ray.kill(actor)
        if self.coordinator is not None:
            ray.kill(self.coordinator)
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)
            self.group = None

    # --- running units of work on the live workers ----------------------------------------------
    def _replace(self, index: int) -> None:
        import ray

        ray.kill(self.workers[index], no_restart=True)
        self.workers[index] = self._start_worker(index)
        self.generation[index] += 1
        described = self._get(self.workers[index].describe.remote(), f"restarting worker {index}")
        self.worker_pids[index] = described["pid"]
        self.worker_nodes[index] = described["node"]

    def _execute(self, costs: Sequence[float], submit, what: str, after_submit=None
                 ) -> tuple[dict[int, Any], list[int]]:
        """Run units 0..n-1 (submit(actor, unit) -> (ref to wait on, payload)) on the live workers,
        LPT by cost. Returns ({unit: (value, payload)}, units that failed every retry)."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        engine = self.config.engine
        live = list(range(len(self.workers)))
        plan = assign_lpt(costs, live)
        load = {w: 0.0 for w in live}
        pending: dict[Any, tuple[int, int, int, Any]] = {}  # ref -> (unit, worker, generation, payload)

        def send(unit: int, worker: int) -> None:
            ref, payload = submit(self.workers[worker], unit)
            pending[ref] = (unit, worker, self.generation[worker], payload)
            load[worker] += costs[unit]

        for worker, units in plan.items():
            for unit in units:
                send(unit, worker)
        if after_submit is not None:
            after_submit()
        done: dict[int, Any] = {}
        failed: list[int] = []
        attempts = dict.fromkeys(range(len(costs)), 0)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=engine.actor_timeout_s)
            if not ready:
                raise EngineError(f"{what} took longer than engine.actor_timeout_s = {engine.actor_timeout_s:g}s")
            unit, worker, generation, payload = pending.pop(ready[0])
            load[worker] -= costs[unit]
            try:
                done[unit] = (ray.get(ready[0]), payload)
                continue
            except RayTaskError as exc:
                raise EngineError(f"{what} failed on worker {worker}: {exc}") from exc
            except RayActorError:
                pass
            if generation == self.generation[worker]:  # the first sign of this loss: replace it
                self.say(f"  {what}: worker {worker} lost; starting a replacement")
                self._replace(worker)
            attempts[unit] += 1
            if attempts[unit] > engine.max_retries:
                failed.append(unit)
                continue
            target = min(live, key=lambda w: (load[w], w))
            send(unit, target)
        return done, sorted(failed)

    # --- a round ----------------------------------------------------------------------------
    def train(self, round_index: int, passes: list[list[TrainJob]], after_submit=None
              ) -> tuple[list[Any], list[PassReport], list[TrainJob]]:
        """Run every pass; returns (result references, reports, jobs of passes that failed)."""
        state = self.coordinator.state_view.remote()  # one reference, read by every worker

        def submit(actor, unit):
            result, report = actor.train.options(num_returns=2).remote(round_index, passes[unit], state)
            return report, result

        done, failed = self._execute([sum(j.cost for j in p) for p in passes], submit,
                                     f"round {round_index} training", after_submit)
        units = sorted(done)
        return ([done[u][1] for u in units], [done[u][0] for u in units],
                [job for u in failed for job in passes[u]])

    def close_round(self, round_index: int, expected: list, clients: int, results: list[Any]) -> RoundOutcome:
        return self._get(self.coordinator.close_round.remote(round_index, expected, clients, *results),
                         f"round {round_index} aggregation")

    def evaluation_digests(self, keys: list) -> dict:
        return self._get(self.coordinator.evaluation_digests.remote(keys), "asking which adapters changed")

    def evaluate(self, round_index: int, chunks: list[list[EvalJob]]) -> list[EvalRecord]:
        state = self.coordinator.state_view.remote()

        def submit(actor, unit):
            return actor.evaluate.remote(chunks[unit], state), None

        done, failed = self._execute([sum(j.cost for j in c) for c in chunks], submit,
                                     f"round {round_index} evaluation")
        if failed:
            raise EngineError(f"round {round_index} evaluation: workers kept failing "
                              f"(engine.max_retries = {self.config.engine.max_retries})")
        return [record for unit in sorted(done) for record in done[unit][0]]
