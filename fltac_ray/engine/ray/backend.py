"""The Ray backend: stateless client workers as Ray actors, the server as the coordinator actor.

Every round the loop hands it passes of jobs; it spreads them over the live workers (LPT,
engine/scheduling.py) with one reference to the round's committed state (read by every worker
from the object store). Each pass's result goes from its worker straight to the coordinator
(`Server.receive`, the moment it exists: uploads never pass through the driver, and a node lost
after that costs nothing trained).

Where things live, so that losing any worker node costs only work in flight: the coordinator
(the server's state, the received uploads, the checkpoint's source) runs on the driver's node,
whose loss ends the run anyway; the data the driver put is owned and stored there too. A worker
that dies, or whose node dies, in any phase is dropped from the live pool and its unfinished
work goes to the least-loaded live worker, from the same committed state, so the retried work
gives exactly the same result (engine.max_retries times per unit). A replacement is requested
in the dead worker's placement-group bundle (Ray moves the bundle to a node with room, which an
autoscaler may have to add) and joins the pool when it is up; with engine.ray_address and no
fixed pool size the pool also grows at round starts when nodes join.
"""

from __future__ import annotations

import os
from typing import Any

from fltac_ray.client.gpu_fit import resolve_pass_limits
from fltac_ray.engine.backend import Backend, StartInfo
from fltac_ray.engine.messages import EvalJob, EvalRecord, PassReport, TrainJob
from fltac_ray.engine.ray.actors import Coordinator, RemoteServer, WorkerSlot, get, ship_by_value
from fltac_ray.engine.ray.executor import run_units
from fltac_ray.engine.ray.pool import (
    WorkerPool,
    check_gpu_fit,
    cluster_gpus_per_worker,
    coordinator_gpu_note,
)
from fltac_ray.errors import EngineError


class RayBackend(Backend):
    """The round loop's Ray side: the coordinator actor, the worker pool (engine/ray/pool.py)
    and the executor that runs each round's units on it (engine/ray/executor.py)."""

    name = "ray"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.elastic = self.config.engine.ray_address is not None  # a joined cluster may grow
        self.pool = WorkerPool(self.config, self.say, len(self.active), self.elastic)
        self.coordinator: Any = None
        self.coordinator_node = ""
        self.model_files = None  # what describes a hub or folder model (models/model_files.py)
        self.data_refs: tuple[Any, Any] | None = None  # (tasks, clients) already in the store (a sweep's)

    # the pool as the round loop, callbacks and tests see it
    @property
    def slots(self) -> list[WorkerSlot]:
        return self.pool.slots

    @property
    def worker_pids(self) -> list[int]:
        return self.pool.worker_pids

    @property
    def worker_nodes(self) -> list[str]:
        """The Ray node id of each live worker."""
        return self.pool.worker_nodes

    def live_workers(self) -> list[int]:
        return self.pool.live_workers()

    def _get(self, refs, what: str):
        return get(refs, what, self.config.engine.actor_timeout_s)

    # --- set-up -----------------------------------------------------------------------------
    def _start_coordinator(self) -> None:
        """The server on the driver's node when that node has the CPUs for it (its loss ends the
        run anyway, so no worker node's loss can take the server's state with it); elsewhere,
        with a line saying so, when it has not. Inside a Tune trial it stays in the trial's
        placement group (the trial reserved its CPU)."""
        import ray
        from ray.util import get_current_placement_group
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        engine = self.config.engine
        options: dict[str, Any] = {"num_cpus": engine.coordinator_cpus, "num_gpus": engine.coordinator_gpus}
        driver_node = ray.get_runtime_context().get_node_id()
        if get_current_placement_group() is None:
            node = next((node["Resources"] for node in ray.nodes() if node["NodeID"] == driver_node and node["Alive"]), {})
            node_cpus, node_gpus = node.get("CPU", 0.0), node.get("GPU", 0.0)
            if node_cpus >= engine.coordinator_cpus and node_gpus >= engine.coordinator_gpus:
                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(driver_node, soft=False)
            else:
                self.say(f"  the driver's node has {node_cpus:g} CPU and {node_gpus:g} GPU, less than "
                         f"engine.coordinator_cpus = {engine.coordinator_cpus:g} / engine.coordinator_gpus = "
                         f"{engine.coordinator_gpus:g}: the coordinator runs on another node, and losing "
                         "that node ends the run (give the head node those resources to avoid this)")
        self.coordinator = ray.remote(Coordinator).options(**options).remote(self.config, self.algorithm_class)
        self.server = RemoteServer(self.coordinator, self._get)
        self.coordinator_node = self.server.node()

    def start(self) -> StartInfo:
        import ray
        from ray.util import get_current_placement_group

        from fltac_ray.engine.placement import plan_worker_count
        from fltac_ray.engine.ray.session import cluster_totals

        engine = self.config.engine
        cpus, gpus = cluster_totals()
        if engine.gpus_per_worker is None:  # recorded in decisions.json by the run
            engine.gpus_per_worker = cluster_gpus_per_worker(gpus)
            if self.elastic and not gpus:
                self.say("  engine.gpus_per_worker unset and the cluster has no GPU now: CPU workers; on a "
                         "cluster that adds GPU nodes on demand, set engine.gpus_per_worker: 1")
        check_gpu_fit(self.config, self.elastic)
        # Joining a cluster (engine.ray_address): it may grow, so the pool is waited for.
        count = plan_worker_count(len(self.active), engine, cpus, gpus, elastic=self.elastic)
        # The coordinator first: it takes its CPU on the driver's node before the pool's bundles.
        self._start_coordinator()
        if note := coordinator_gpu_note(engine, count):
            self.say(f"  note{note}")
        # Inside a placement group (a Ray Tune trial) the workers' bundles are already held there
        # and the workers are placed in it (a second group would wait for what it holds).
        group = self.pool.reserve(count) if get_current_placement_group() is None else None
        ship_by_value(self.algorithm_class)
        from fltac_ray.models.model_files import collect_model_files

        self.model_files = collect_model_files(self.config.model.name)  # workers never ask the hub
        if self.model_files is not None:
            size = sum(len(content) for _, content in self.model_files.files)
            at = f" at revision {self.model_files.revision}" if self.model_files.revision else ""
            self.say(f"  model files of {self.config.model.name}{at} ({len(self.model_files.files)} files, "
                     f"{size / 1024:,.0f} KiB: config, tokenizer) shipped to the workers; the weights "
                     "come from each node's own copy")
        if self.data_refs is not None:  # a sweep put the data once for all its trials
            tasks_ref, clients_ref = self.data_refs
        else:  # shipped once, zero-copy numpy in every worker
            tasks_ref, clients_ref = ray.put(self.data.tasks), ray.put(self.data.clients)
        self.pool.worker_args = (self.config, self.algorithm_class, clients_ref, tasks_ref, self.data.head_classes,
                                 max(1, int(engine.cpus_per_worker)), True, self.model_files)
        described = self.pool.start(count, group, self._get)
        nodes = set(self.worker_nodes)
        loaded = sum(d["loaded_base"] for d in described)
        how = f"loaded by {loaded} of {count} workers" if loaded else "found in the node cache"
        first = described[0]
        where = (f"copied to each worker's GPU ({first['device']})" if first["device"].startswith("cuda") else
                 f"memory-mapped by the workers on {len(nodes)} node(s) from "
                 f"{engine.base_cache_dir or '<node temp dir>/fltac-ray/bases'}")
        self.say(f"  base model {self.config.model.name} ({first['base_bytes'] / 2**20:,.1f} MiB in {first['dtype']}): "
                 f"{how}, {where}; the driver never loads it")
        spec = described[0]["spec"]
        resolve_pass_limits(engine, [d["adapters_fit"] for d in described], self.config.train.batch_size)
        self.server.setup(spec)
        return StartInfo(workers=count, device=described[0]["device"], batched=described[0]["batched"],
                         spec=spec, server_note=self.server.server_note(),
                         resources=f"{engine.cpus_per_worker:g} CPU, {engine.gpus_per_worker:g} GPU each",
                         # where each worker runs: its node and the GPUs Ray assigned it (placement.json)
                         placement=[{"worker": d["worker"], "node": d["node"], "gpu_ids": d["gpu_ids"],
                                     "device": d["device"]} for d in described])

    def initialise(self, count: int) -> None:
        first = self.slots[self.pool.await_live("initialising the adapters")[0]]
        initial = self._get(first.actor.initial_adapters.remote(count), "initialising the adapters")
        self.server.set_initial(initial)

    def process_ids(self) -> dict[str, int]:
        coordinator = self._get(self.coordinator.pid.remote(), "asking the coordinator's pid")
        ids = {"driver": os.getpid(), "coordinator": coordinator}
        ids.update({f"worker_{slot.index}": slot.pid for slot in self.slots if slot.up})
        return ids

    def kill_worker(self, index: int) -> None:
        """Fault injection: the worker's process goes away as if its node had died."""
        self.pool.kill(index)

    def shutdown(self) -> None:
        import ray

        self.pool.shutdown()
        if self.coordinator is not None:
            ray.kill(self.coordinator)

    def poll_replacements(self) -> None:
        self.pool.poll_replacements()

    def replan(self, round_index: int) -> None:
        self.pool.replan(round_index)

    # --- a round ----------------------------------------------------------------------------
    def train(self, round_index: int, passes: list[list[TrainJob]], after_submit=None
              ) -> tuple[list[PassReport], list[TrainJob]]:
        """Run every pass, each result received by the coordinator as soon as it exists; returns
        (reports, jobs of passes that failed)."""
        state = self.coordinator.state_view.remote()  # one reference, read by every worker

        def submit(actor, unit):
            result, report = actor.train.options(num_returns=2).remote(round_index, passes[unit], state)
            return self.coordinator.receive.remote(round_index, unit, result, report), True

        done, failed = run_units(self.pool, [sum(j.cost for j in p) for p in passes], submit,
                                 f"round {round_index} training", after_submit)
        return [done[unit] for unit in sorted(done)], [job for unit in failed for job in passes[unit]]

    def evaluate(self, round_index: int, chunks: list[list[EvalJob]]) -> list[EvalRecord]:
        state = self.coordinator.state_view.remote()

        def submit(actor, unit):
            return actor.evaluate.remote(chunks[unit], state, *self.pass_limits()), False

        done, failed = run_units(self.pool, [sum(j.cost for j in c) for c in chunks], submit,
                                 f"round {round_index} evaluation")
        if failed:
            raise EngineError(f"round {round_index} evaluation: workers kept failing "
                              f"(engine.max_retries = {self.config.engine.max_retries})")
        return [record for unit in sorted(done) for record in done[unit]]
