"""The pool of client workers: one placement-group bundle and one actor per slot, reserved
and waited for at the start; a lost worker is dropped from the live pool and replaced in its
own bundle, and a joined cluster that grows gets more workers at round starts. Also the pool's
GPU layout: how much of a GPU a worker takes, and a refusal before any actor starts when the
copies of the base cannot fit a GPU.
"""

from __future__ import annotations

import time
from typing import Any

from fltac_ray.client.gpu_fit import (
    GIB,
    GpuFit,
    base_bytes_for,
    check_layout,
    default_gpus_per_worker,
    gpu_memory_of,
    workers_per_gpu,
)
from fltac_ray.engine.ray.actors import RayClientWorker, WorkerSlot
from fltac_ray.errors import EngineError, FltacError

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
    GPUs (docs/scale.md's 8-worker command on 8 single-GPU nodes would wait for a ninth). Empty when
    the coordinator holds no GPU or a worker fits beside it."""
    share, per_worker = engine.coordinator_gpus, engine.gpus_per_worker or 0.0
    if share <= 0 or per_worker <= 0 or per_worker <= 1.0 - share + 1e-9:
        return ""
    return (f": the coordinator holds {share:g} GPU (engine.coordinator_gpus), and a worker of {per_worker:g} GPU "
            f"does not fit beside it on that GPU, so the {workers} workers need {workers} other GPUs; on "
            f"single-GPU nodes use engine.num_workers = {max(workers - 1, 1)}, or engine.gpus_per_worker = "
            f"{1.0 - share:g} so a worker shares the coordinator's GPU")


def check_gpu_fit(config: Any, elastic: bool) -> None:
    """Refuse, before any actor starts, a layout whose per-worker base copies cannot fit one
    GPU, when the GPUs' memory is known here (engine.gpu_memory_gib, this machine's GPU,
    or the nodes' Ray accelerator types); the workers check their real GPU again."""
    engine = config.engine
    if not engine.gpus_per_worker:
        return
    if engine.gpu_memory_gib is not None:
        memory, source = engine.gpu_memory_gib, f"engine.gpu_memory_gib = {engine.gpu_memory_gib:g}"
    elif not elastic and _local_cuda():
        import torch

        memory = torch.cuda.get_device_properties(0).total_memory / GIB
        source = f"{torch.cuda.get_device_name(0)} on this machine"
    else:
        kinds = _accelerator_types()
        memory, source = gpu_memory_of(kinds), f"accelerator type {'/'.join(kinds)}"
        if memory is None:
            return  # unknown here: each worker checks its own GPU before loading the base
    fit = GpuFit(workers_per_gpu(engine.gpus_per_worker), base_bytes_for(config), int(memory * GIB))
    check_layout(fit, engine.gpus_per_worker, source)


class WorkerPool:
    """The workers' slots and placement groups. `worker_args`: what every worker actor is built
    with after its index (set by the backend once the data is in the object store)."""

    def __init__(self, config: Any, say, clients: int, elastic: bool) -> None:
        self.config, self.say = config, say
        self.clients = clients  # active clients: the automatic pool size never exceeds them
        self.elastic = elastic  # a joined cluster (engine.ray_address) may grow
        self.automatic = config.engine.num_workers is None and config.engine.clients_per_actor is None
        self.slots: list[WorkerSlot] = []
        self.groups: list[Any] = []  # the pool's placement groups (the first, then growth)
        self.worker_args: tuple = ()

    # --- who is there ---------------------------------------------------------------------------
    def live_workers(self) -> list[int]:
        return [slot.index for slot in self.slots if slot.up]

    @property
    def worker_pids(self) -> list[int]:
        return [slot.pid for slot in self.slots if slot.up]

    @property
    def worker_nodes(self) -> list[str]:
        """The Ray node id of each live worker."""
        return [slot.node for slot in self.slots if slot.up]

    # --- start ----------------------------------------------------------------------------------
    def bundle(self) -> dict[str, float]:
        engine = self.config.engine
        bundle = {"CPU": engine.cpus_per_worker}
        if engine.gpus_per_worker > 0:
            bundle["GPU"] = engine.gpus_per_worker
        return bundle

    def reserve(self, count: int) -> Any:
        """The worker pool as a placement group, one bundle per worker, waited for: an autoscaler
        sees the whole demand at once and adds nodes meanwhile. Fails after
        engine.reserve_timeout_s, before any worker starts, saying what the cluster has."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        from fltac_ray.engine.ray.session import cluster_totals

        engine = self.config.engine
        bundle = self.bundle()
        shape = " + ".join(f"{amount:g} {name}" for name, amount in bundle.items())
        group = placement_group([dict(bundle) for _ in range(count)], strategy="SPREAD")
        ready = group.ready()
        began, step = time.monotonic(), 1.0  # the first line after a second, then every RESERVE_REPORT_S
        while True:
            left = engine.reserve_timeout_s - (time.monotonic() - began)
            done, _ = ray.wait([ready], timeout=max(0.0, min(step, left)))
            step = RESERVE_REPORT_S
            if done:
                self.groups.append(group)
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

    def start(self, count: int, group: Any, get) -> list[dict[str, Any]]:
        """`count` workers in `group`'s bundles (None: the enclosing Tune trial's group), waited
        for with `get`; returns what each said about itself (describe())."""
        self.slots = [WorkerSlot(index, group, index) for index in range(count)]
        for slot in self.slots:
            self.launch(slot)
        described = get([slot.starting for slot in self.slots], "starting client workers")
        for slot, info in zip(self.slots, described, strict=True):
            self.came_up(slot, info)
        return described

    def launch(self, slot: WorkerSlot) -> None:
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
        ).remote(slot.index, *self.worker_args)
        slot.starting, slot.up = slot.actor.describe.remote(), False

    def came_up(self, slot: WorkerSlot, described: dict[str, Any]) -> None:
        slot.up, slot.starting, slot.failed_starts = True, None, 0
        slot.pid, slot.node = described["pid"], described["node"]

    def kill(self, index: int) -> None:
        """Fault injection: the worker's process goes away as if its node had died."""
        import ray

        ray.kill(self.slots[index % len(self.slots)].actor, no_restart=True)

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for slot in self.slots:
            if slot.actor is not None:
                ray.kill(slot.actor)
        for group in self.groups:
            remove_placement_group(group)
        self.groups = []

    # --- losses, replacements, growth -----------------------------------------------------------
    def lose(self, slot: WorkerSlot, what: str) -> None:
        """Drop a dead worker from the live pool and ask for its replacement in the same bundle;
        the replacement joins when it is up (`poll_replacements`), the round goes on without waiting."""
        import ray

        node = slot.node[:8]
        ray.kill(slot.actor, no_restart=True)
        slot.generation += 1
        self.say(f"  {what}: worker {slot.index} lost (node {node}...); its work goes to the live "
                 "workers and a replacement is requested")
        self.launch(slot)

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
                self.came_up(slot, ray.get(ref))
                self.say(f"  worker {slot.index} is up on node {slot.node[:8]}... and takes work again")
            except (RayActorError, RayTaskError) as exc:
                slot.failed_starts += 1
                if slot.failed_starts > self.config.engine.max_retries:
                    slot.starting = None
                    cause = exc.cause if isinstance(getattr(exc, "cause", None), FltacError) else exc
                    self.say(f"  worker {slot.index} failed to start {slot.failed_starts} times; "
                             f"its place stays empty: {cause}")
                else:
                    self.launch(slot)

    def await_live(self, what: str) -> list[int]:
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

    def grow(self) -> None:
        """Joined cluster, automatic pool size: ask for the workers that fit the nodes up now
        beyond the pool (their bundles in a new placement group, not waited for)."""
        from ray.util.placement_group import placement_group

        from fltac_ray.engine.placement import plan_worker_count
        from fltac_ray.engine.ray.session import cluster_totals

        cpus, gpus = cluster_totals()
        wanted = plan_worker_count(self.clients, self.config.engine, cpus, gpus, elastic=True)
        extra = wanted - len(self.slots)
        if extra <= 0:
            return
        group = placement_group([self.bundle() for _ in range(extra)], strategy="SPREAD")
        self.groups.append(group)
        first = len(self.slots)
        self.slots += [WorkerSlot(first + bundle, group, bundle) for bundle in range(extra)]
        for slot in self.slots[first:]:
            self.launch(slot)
        self.say(f"  the cluster grew to {cpus:g} CPU, {gpus:g} GPU: {extra} more worker(s) requested")

    def replan(self, round_index: int) -> None:
        """At a round's start: ask for more workers where a joined cluster grew, take in the
        workers that came up, and say how the pool changed."""
        before = len(self.live_workers())
        if self.elastic and self.automatic:
            self.grow()
        live = self.await_live(f"round {round_index}")
        if len(live) != before:
            nodes = len({self.slots[index].node for index in live})
            self.say(f"  round {round_index}: the worker pool has {len(live)} live workers on {nodes} "
                     f"node(s) (was {before})")
