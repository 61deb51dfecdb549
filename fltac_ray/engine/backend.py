"""What the round loop needs from a backend (engine/simulation.py); two implement it:
local_backend.LocalBackend (one process) and engine/ray/backend.RayBackend (actors).

A backend starts the workers and the server (`start` -> StartInfo), draws v^0 (`initialise`),
re-plans its pool at each round's start (`replan`, `live_workers`), runs a round's passes with
each result handed to the server (`train` -> reports, failed jobs), runs evaluation chunks
(`evaluate`), and gives the round loop one handle on the server (`server`: the in-process
Server, or the coordinator actor called as if it were one), through which the round is closed,
changed evaluations found and the server's state saved and restored. Plus its process ids,
fault injection (`kill_worker`) and `shutdown`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fltac_ray.algorithms.types import AdapterSpec
from fltac_ray.config import ExperimentConfig
from fltac_ray.data.federated import FederatedData
from fltac_ray.engine.messages import EvalJob, EvalRecord, PassReport, RoundOutcome, TrainJob


@dataclass(frozen=True)
class StartInfo:
    """What a started backend reports to the round loop."""

    workers: int
    device: str  # the first worker's torch device
    batched: bool  # the workers train many adapters per pass
    spec: AdapterSpec  # the adapter layout the workers built
    server_note: str  # what the algorithm resolved where the server runs (start_server)
    resources: str  # one line for the run's header
    # Ray: each worker's node and the GPUs Ray assigned it (placement.json); empty in process
    placement: list[dict[str, Any]] = field(default_factory=list)


class Backend(ABC):
    name = ""

    def __init__(self, config: ExperimentConfig, algorithm_class: type, data: FederatedData,
                 active: list[int], say: Callable[[str], None]) -> None:
        self.config = config
        self.algorithm_class = algorithm_class  # shipped to workers and server: no registry lookup there
        self.data = data
        self.active = active  # the clients that hold data
        self.say = say
        # the server: server/server.py's Server in process, or a handle calling the coordinator actor
        # with the same methods (engine/ray/actors.RemoteServer); set by start()
        self.server: Any = None

    @abstractmethod
    def start(self) -> StartInfo:
        """Start the workers and the server; resolves engine.gpus_per_worker and the pass limits."""

    @abstractmethod
    def initialise(self, count: int) -> None:
        """The server's initial adapters (v^0; IFCA: `count` of them), drawn by a worker."""

    @abstractmethod
    def train(self, round_index: int, passes: list[list[TrainJob]], after_submit=None
              ) -> tuple[list[PassReport], list[TrainJob]]:
        """Run the round's passes, each result handed to the server; (reports, failed jobs)."""

    @abstractmethod
    def evaluate(self, round_index: int, chunks: list[list[EvalJob]]) -> list[EvalRecord]:
        """Evaluate the chunks' committed adapters."""

    @abstractmethod
    def process_ids(self) -> dict[str, int]:
        """The pids of the driver, the server and the workers (for tests and the dashboard)."""

    @abstractmethod
    def kill_worker(self, index: int) -> None:
        """Fault injection (engine.kill_worker_at)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop what start() started."""

    def replan(self, round_index: int) -> None:  # noqa: B027 - optional: a fixed pool has nothing to do
        """At a round's start: take in workers that came up, drop lost ones (a fixed pool: none)."""

    def pass_limits(self) -> tuple[int, int]:
        """(engine.max_batched_adapters, engine.max_pass_examples) as the run resolved them at start."""
        engine = self.config.engine
        return int(engine.max_batched_adapters), engine.max_pass_examples

    def live_workers(self) -> list[int]:
        """The indices of the workers that take work now (reports name them)."""
        return [0]

    # --- the server, the same way on every backend ------------------------------------------
    def close_round(self, round_index: int, expected: list, clients: int, truth: dict | None = None) -> RoundOutcome:
        return self.server.close_round(round_index, expected, clients, truth)

    def evaluation_digests(self, keys: list) -> dict:
        return self.server.evaluation_digests(keys)

    def server_state(self) -> dict[str, dict[str, np.ndarray]]:
        return self.server.state()

    def load_server_state(self, groups: dict[str, dict[str, np.ndarray]]) -> None:
        self.server.load_state(groups)

    def take_snapshot(self) -> dict | None:
        return self.server.take_snapshot()

    def export_outcome(self) -> dict | None:
        return self.server.export_outcome()
