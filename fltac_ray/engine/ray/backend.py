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

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fltac_ray.client.gpu_fit import (
    GIB,
    GpuFit,
    base_bytes_for,
    check_layout,
    default_gpus_per_worker,
    gpu_memory_of,
    resolve_pass_limits,
    workers_per_gpu,
)
from fltac_ray.client.worker import ClientWorker
from fltac_ray.engine.backend import Backend, StartInfo
from fltac_ray.engine.messages import EvalJob, EvalRecord, PassReport, TrainJob
from fltac_ray.engine.scheduling import assign_lpt
from fltac_ray.errors import EngineError, FltacError
from fltac_ray.server.server import Server

RESERVE_REPORT_S = 10.0  # a progress line this often while the pool is waited for


def _local_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _accelerator_types() -> list[str]:
    """The GPU models Ray detected on the live nodes (its accelerator_type:<name> resources).
    GPUs only declared to Ray (num_gpus on a machine without one: scheduling tests) have none."""
    import ray

    return sorted({key.split(":", 1)[1] for node in ray.nodes() if node["Alive"]
                   for key in node["Resources"] if key.startswith("accelerator_type:")})


def cluster_gpus_per_worker(cluster_gpus: float) -> float:
    """GPUs per worker when none is configured, for the connected cluster (engine and sweep
    trials alike): default_gpus_per_worker with its GPUs counted as real when this machine has
    CUDA or Ray detected a GPU model on a node."""
    return default_gpus_per_worker(cluster_gpus, _local_cuda() or bool(_accelerator_types()))


def coordinator_gpu_note(engine: Any, workers: int) -> str:
    """What a coordinator holding part of a GPU (engine.coordinator_gpus) costs the pool: a worker
    that needs more than the rest of that GPU cannot go there, so the pool needs `workers` other
    GPUs (the README's 8-worker command on 8 single-GPU nodes would wait for a ninth). Empty when
    the coordinator holds no GPU or a worker fits beside it."""
    share, per_worker = engine.coordinator_gpus, engine.gpus_per_worker or 0.0
    if share <= 0 or per_worker <= 0 or per_worker <= 1.0 - share + 1e-9:
        return ""
    return (f": the coordinator holds {share:g} GPU (engine.coordinator_gpus), and a worker of {per_worker:g} GPU "
            f"does not fit beside it on that GPU, so the {workers} workers need {workers} other GPUs; on "
            f"single-GPU nodes use engine.num_workers = {max(workers - 1, 1)}, or engine.gpus_per_worker = "
            f"{1.0 - share:g} so a worker shares the coordinator's GPU")


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


class SeesOnlyItsGpus:
    """Mixed into fltac-ray's actors: before anything else runs, hide every GPU Ray did not
    assign the actor (engine/ray/gpu_visibility.py), so one without a GPU computes on the CPU."""

    def __init__(self, *args, **kwargs) -> None:
        from fltac_ray.engine.ray.gpu_visibility import hide_unassigned_gpus

        hide_unassigned_gpus()
        super().__init__(*args, **kwargs)


class RayClientWorker(SeesOnlyItsGpus, ClientWorker):
    """The client worker as a Ray actor: it sees only the GPU Ray gave it (none with
    engine.gpus_per_worker 0, so engine.device auto means the CPU), and says which node it runs on.
    A start that fails with one of fltac-ray's own errors (a GPU torch cannot use, a missing
    model) is kept and raised by describe(): Ray passes a method's exception on as it is, while
    an exception in __init__ reaches the driver only as text inside ActorDiedError."""

    def __init__(self, *args, **kwargs) -> None:
        self.start_error: FltacError | None = None
        try:
            super().__init__(*args, **kwargs)
        except FltacError as exc:
            self.start_error = exc

    def gpu_grant(self) -> tuple[list[str] | None, bool]:
        """Ray's GPU ids for this actor, and whether Ray detected a GPU model on this node (its
        accelerator_type resource) or an NVIDIA driver is loaded: GPUs merely declared to Ray
        (scheduling tests on CPU machines) have neither."""
        import ray

        from fltac_ray.client.cuda_device import nvidia_driver

        here = ray.get_runtime_context().get_node_id()
        node = next((n["Resources"] for n in ray.nodes() if n["NodeID"] == here), {})
        detected = any(key.startswith("accelerator_type:") for key in node) or nvidia_driver() is not None
        return [str(gpu) for gpu in ray.get_gpu_ids()], detected

    def describe(self) -> dict[str, Any]:
        import ray

        if self.start_error is not None:
            raise self.start_error
        return {**super().describe(), "node": ray.get_runtime_context().get_node_id(),
                "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()]}


class Coordinator(SeesOnlyItsGpus, Server):
    """The server as a Ray actor: it sees only the GPU engine.coordinator_gpus reserved (cuML
    K-means runs there), none without."""


class RemoteServer:
    """The coordinator actor with the in-process Server's methods: each call waits for its result
    through the backend's `get` (its timeout, and a typed error naming what was being done), so
    the round loop holds one server handle whatever the backend."""

    DOING = {
        "state": "collecting the server's state", "load_state": "restoring the checkpoint",
        "take_snapshot": "taking the adapter snapshot", "export_outcome": "collecting the global adapters",
        "evaluation_digests": "asking which adapters changed", "setup": "setting up the coordinator",
        "server_note": "starting the coordinator", "set_initial": "broadcasting v^0",
    }

    def __init__(self, actor, get) -> None:
        self._actor, self._get = actor, get

    def __getattr__(self, name: str):
        method = getattr(self._actor, name)

        def call(*args, **kwargs):
            doing = f"round {args[0]} aggregation" if name == "close_round" else self.DOING.get(
                name, f"calling the coordinator's {name}")
            return self._get(method.remote(*args, **kwargs), doing)

        return call


@dataclass
class WorkerSlot:
    """One place in the pool: a placement-group bundle and the actor currently in it. `index`
    names the worker in reports and fault injection; `generation` counts its replacements, so
    a late failure of an old actor is not taken for a loss of its successor."""

    index: int
    group: Any  # the placement group holding the bundle (None: the enclosing Tune trial's)
    bundle: int
    actor: Any = None
    starting: Any = None  # describe() reference while the actor starts
    generation: int = 0
    failed_starts: int = 0
    up: bool = False
    pid: int = 0
    node: str = ""


class RayBackend(Backend):
    name = "ray"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.slots: list[WorkerSlot] = []
        self.groups: list[Any] = []  # the pool's placement groups (the first, then growth)
        self.coordinator: Any = None
        self.coordinator_node = ""
        self.model_files = None  # what describes a hub or folder model (models/model_files.py)
        self.data_refs: tuple[Any, Any] | None = None  # (tasks, clients) already in the store (a sweep's)
        self.elastic = self.config.engine.ray_address is not None  # a joined cluster may grow
        self.automatic = self.config.engine.num_workers is None and self.config.engine.clients_per_actor is None

    @property
    def worker_pids(self) -> list[int]:
        return [slot.pid for slot in self.slots if slot.up]

    @property
    def worker_nodes(self) -> list[str]:
        """The Ray node id of each live worker."""
        return [slot.node for slot in self.slots if slot.up]

    def live_workers(self) -> list[int]:
        return [slot.index for slot in self.slots if slot.up]

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
            if isinstance(exc.cause, FltacError):  # one of ours, raised in an actor: as it is
                raise exc.cause from None
            raise EngineError(f"{what} failed: {exc}") from exc

    def _bundle(self) -> dict[str, float]:
        engine = self.config.engine
        bundle = {"CPU": engine.cpus_per_worker}
        if engine.gpus_per_worker > 0:
            bundle["GPU"] = engine.gpus_per_worker
        return bundle

    def _reserve(self, count: int):
        """The worker pool as a placement group, one bundle per worker, waited for: an autoscaler
        sees the whole demand at once and adds nodes meanwhile. Fails after
        engine.reserve_timeout_s, before any worker starts, saying what the cluster has."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        from fltac_ray.engine.ray.session import cluster_totals

        engine = self.config.engine
        bundle = self._bundle()
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
                    f"or allow a longer wait{coordinator_gpu_note(engine, count)}")
            self.say(f"  waiting for the worker pool: {count} x ({shape}), "
                     f"{time.monotonic() - began:.0f}s of engine.reserve_timeout_s = "
                     f"{engine.reserve_timeout_s:g}s; the cluster has {cpus:g} CPU, {gpus:g} GPU now")

    def _launch(self, slot: WorkerSlot) -> None:
        """Start an actor in the slot's bundle (it waits there until the bundle has a node)."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        engine = self.config.engine
        placement = {}
        if slot.group is not None:
            placement["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                slot.group, placement_group_bundle_index=slot.bundle)
        slot.actor = ray.remote(RayClientWorker).options(
            num_cpus=engine.cpus_per_worker, num_gpus=engine.gpus_per_worker, **placement,
        ).remote(slot.index, self.config, self.algorithm_class, self._clients_ref, self._tasks_ref,
                 self.data.head_classes, max(1, int(engine.cpus_per_worker)), True, self.model_files)
        slot.starting, slot.up = slot.actor.describe.remote(), False

    def _came_up(self, slot: WorkerSlot, described: dict[str, Any]) -> None:
        slot.up, slot.starting, slot.failed_starts = True, None, 0
        slot.pid, slot.node = described["pid"], described["node"]

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

    def _check_gpu_fit(self) -> None:
        """Refuse, before any actor starts, a layout whose per-worker base copies cannot fit one
        GPU, when the GPUs' memory is known here (engine.gpu_memory_gib, this machine's GPU,
        or the nodes' Ray accelerator types); the workers check their real GPU again."""

        engine = self.config.engine
        if not engine.gpus_per_worker:
            return
        if engine.gpu_memory_gib is not None:
            memory, source = engine.gpu_memory_gib, f"engine.gpu_memory_gib = {engine.gpu_memory_gib:g}"
        elif not self.elastic and _local_cuda():
            import torch

            memory = torch.cuda.get_device_properties(0).total_memory / GIB
            source = f"{torch.cuda.get_device_name(0)} on this machine"
        else:
            kinds = _accelerator_types()
            memory, source = gpu_memory_of(kinds), f"accelerator type {'/'.join(kinds)}"
            if memory is None:
                return  # unknown here: each worker checks its own GPU before loading the base
        fit = GpuFit(workers_per_gpu(engine.gpus_per_worker), base_bytes_for(self.config), int(memory * GIB))
        check_layout(fit, engine.gpus_per_worker, source)

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
        self._check_gpu_fit()
        # Joining a cluster (engine.ray_address): it may grow, so the pool is waited for.
        count = plan_worker_count(len(self.active), engine, cpus, gpus, elastic=self.elastic)
        # The coordinator first: it takes its CPU on the driver's node before the pool's bundles.
        self._start_coordinator()
        if note := coordinator_gpu_note(engine, count):
            self.say(f"  note{note}")
        group = None
        if get_current_placement_group() is None:
            group = self._reserve(count)
            self.groups.append(group)
        # else inside a placement group (a Ray Tune trial): the workers' bundles are already held
        # there, and the workers are placed in it (a second group would wait for what it holds)
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
            self._tasks_ref, self._clients_ref = self.data_refs
        else:  # shipped once, zero-copy numpy in every worker
            self._tasks_ref, self._clients_ref = ray.put(self.data.tasks), ray.put(self.data.clients)
        self.slots = [WorkerSlot(index, group, index) for index in range(count)]
        for slot in self.slots:
            self._launch(slot)
        described = self._get([slot.starting for slot in self.slots], "starting client workers")
        for slot, info in zip(self.slots, described, strict=True):
            self._came_up(slot, info)
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
        first = self.slots[self._await_live("initialising the adapters")[0]]
        initial = self._get(first.actor.initial_adapters.remote(count), "initialising the adapters")
        self.server.set_initial(initial)

    def process_ids(self) -> dict[str, int]:
        import os

        coordinator = self._get(self.coordinator.pid.remote(), "asking the coordinator's pid")
        ids = {"driver": os.getpid(), "coordinator": coordinator}
        ids.update({f"worker_{slot.index}": slot.pid for slot in self.slots if slot.up})
        return ids

    def kill_worker(self, index: int) -> None:
        """Fault injection: the worker's process goes away as if its node had died."""
        import ray

        ray.kill(self.slots[index % len(self.slots)].actor, no_restart=True)

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for slot in self.slots:
            if slot.actor is not None:
                ray.kill(slot.actor)
        if self.coordinator is not None:
            ray.kill(self.coordinator)
        for group in self.groups:
            remove_placement_group(group)
        self.groups = []

    # --- the pool: losses, replacements, growth ---------------------------------------------------
    def _lose(self, slot: WorkerSlot, what: str) -> None:
        """Drop a dead worker from the live pool and ask for its replacement in the same bundle;
        the replacement joins when it is up (`poll_replacements`), the round goes on without waiting."""
        import ray

        node = slot.node[:8]
        ray.kill(slot.actor, no_restart=True)
        slot.generation += 1
        self.say(f"  {what}: worker {slot.index} lost (node {node}...); its work goes to the live "
                 "workers and a replacement is requested")
        self._launch(slot)

    def poll_replacements(self) -> None:
        """Take in the slots whose actor came up since the last look (a failed start is retried,
        at most engine.max_retries times in a row)."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        starting = {slot.starting: slot for slot in self.slots if slot.starting is not None}
        if not starting:
            return
        ready, _ = ray.wait(list(starting), num_returns=len(starting), timeout=0)
        for ref in ready:
            slot = starting[ref]
            try:
                self._came_up(slot, ray.get(ref))
                self.say(f"  worker {slot.index} is up on node {slot.node[:8]}... and takes work again")
            except (RayActorError, RayTaskError) as exc:
                slot.failed_starts += 1
                if slot.failed_starts > self.config.engine.max_retries:
                    slot.starting = None
                    cause = exc.cause if isinstance(getattr(exc, "cause", None), FltacError) else exc
                    self.say(f"  worker {slot.index} failed to start {slot.failed_starts} times; "
                             f"its place stays empty: {cause}")
                else:
                    self._launch(slot)

    def _await_live(self, what: str) -> list[int]:
        """The live workers; when none is left, wait (engine.reserve_timeout_s, progress lines)
        for a replacement to come up."""
        self.poll_replacements()
        began, reported = time.monotonic(), time.monotonic()
        timeout = self.config.engine.reserve_timeout_s
        while not (live := self.live_workers()):
            if not any(slot.starting is not None for slot in self.slots):
                raise EngineError(f"{what}: every worker is lost and none could be restarted")
            waited = time.monotonic() - began
            if waited >= timeout:
                raise EngineError(f"{what}: every worker is lost and no replacement came up within "
                                  f"engine.reserve_timeout_s = {timeout:g}s")
            if time.monotonic() - reported >= RESERVE_REPORT_S:
                reported = time.monotonic()
                self.say(f"  {what}: no live worker; waiting for a replacement ({waited:.0f}s of "
                         f"engine.reserve_timeout_s = {timeout:g}s)")
            time.sleep(0.2)
            self.poll_replacements()
        return live

    def _grow(self) -> None:
        """Joined cluster, automatic pool size: ask for the workers that fit the nodes up now
        beyond the pool (their bundles in a new placement group, not waited for)."""
        from ray.util.placement_group import placement_group

        from fltac_ray.engine.placement import plan_worker_count
        from fltac_ray.engine.ray.session import cluster_totals

        cpus, gpus = cluster_totals()
        wanted = plan_worker_count(len(self.active), self.config.engine, cpus, gpus, elastic=True)
        extra = wanted - len(self.slots)
        if extra <= 0:
            return
        group = placement_group([self._bundle() for _ in range(extra)], strategy="SPREAD")
        self.groups.append(group)
        first = len(self.slots)
        self.slots += [WorkerSlot(first + bundle, group, bundle) for bundle in range(extra)]
        for slot in self.slots[first:]:
            self._launch(slot)
        self.say(f"  the cluster grew to {cpus:g} CPU, {gpus:g} GPU: {extra} more worker(s) requested")

    def replan(self, round_index: int) -> None:
        """At a round's start: ask for more workers where a joined cluster grew, take in the
        workers that came up, and say how the pool changed."""
        before = len(self.live_workers())
        if self.elastic and self.automatic:
            self._grow()
        live = self._await_live(f"round {round_index}")
        if len(live) != before:
            nodes = len({self.slots[index].node for index in live})
            self.say(f"  round {round_index}: the worker pool has {len(live)} live workers on {nodes} "
                     f"node(s) (was {before})")

    # --- running units of work on the live workers ----------------------------------------------
    def _execute(self, costs: Sequence[float], submit, what: str, after_submit=None
                 ) -> tuple[dict[int, Any], list[int]]:
        """Run units 0..n-1 (submit(actor, unit) -> (reference to wait on, whether that task runs
        on the coordinator)) on the live workers, LPT by cost. A unit whose worker died (or whose
        result was lost with its node) goes to the least-loaded live worker. Returns
        ({unit: value}, units that failed every retry)."""
        import ray
        from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

        engine = self.config.engine
        live = self._await_live(what)
        load = dict.fromkeys(live, 0.0)
        # ref -> (unit, slot, generation, whether the awaited task runs on the coordinator)
        pending: dict[Any, tuple[int, WorkerSlot, int, bool]] = {}

        def send(unit: int, index: int) -> None:
            slot = self.slots[index]
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
                self._classify_failure(exc, what, slot, on_coordinator)
            if generation == slot.generation and slot.up:  # the first sign of this loss
                slot.up = False
                self._lose(slot, what)
            attempts[unit] += 1
            if attempts[unit] > engine.max_retries:
                failed.append(unit)
                continue
            live = self._await_live(what)
            target = min(live, key=lambda index: (load.get(index, 0.0), index))
            send(unit, target)
        return done, sorted(failed)

    @staticmethod
    def _classify_failure(exc: Exception, what: str, slot: WorkerSlot, on_coordinator: bool) -> None:
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

    # --- a round ----------------------------------------------------------------------------
    def train(self, round_index: int, passes: list[list[TrainJob]], after_submit=None
              ) -> tuple[list[PassReport], list[TrainJob]]:
        """Run every pass, each result received by the coordinator as soon as it exists; returns
        (reports, jobs of passes that failed)."""
        state = self.coordinator.state_view.remote()  # one reference, read by every worker

        def submit(actor, unit):
            result, report = actor.train.options(num_returns=2).remote(round_index, passes[unit], state)
            return self.coordinator.receive.remote(round_index, unit, result, report), True

        done, failed = self._execute([sum(j.cost for j in p) for p in passes], submit,
                                     f"round {round_index} training", after_submit)
        return [done[unit] for unit in sorted(done)], [job for unit in failed for job in passes[unit]]

    def evaluate(self, round_index: int, chunks: list[list[EvalJob]]) -> list[EvalRecord]:
        state = self.coordinator.state_view.remote()

        def submit(actor, unit):
            return actor.evaluate.remote(chunks[unit], state, *self.pass_limits()), False

        done, failed = self._execute([sum(j.cost for j in c) for c in chunks], submit,
                                     f"round {round_index} evaluation")
        if failed:
            raise EngineError(f"round {round_index} evaluation: workers kept failing "
                              f"(engine.max_retries = {self.config.engine.max_retries})")
        return [record for unit in sorted(done) for record in done[unit]]
