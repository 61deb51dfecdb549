"""fltac-ray's Ray actors and the driver's handles on them: the client worker and the
coordinator (each sees only the GPUs Ray assigned it), the coordinator as a server object
(`RemoteServer`), one place of the worker pool (`WorkerSlot`), and `get`, which waits for
results and turns Ray's failures into fltac-ray's typed errors.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from fltac_ray.client.worker import ClientWorker
from fltac_ray.errors import EngineError, FltacError
from fltac_ray.server.server import Server


def get(refs, what: str, timeout: float):
    """ray.get with engine.actor_timeout_s; a lost actor raises WorkerLost, one of fltac-ray's
    own errors raised in an actor comes out as it is, anything else as an EngineError naming
    what was being done."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

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
