"""What the round loop needs from a backend (engine/simulation.py); two implement it:
local_backend.LocalBackend (one process) and ray_backend.RayBackend (actors).

A backend starts the workers and the server (`start` -> workers, device, batched, spec,
kmeans_backend, resources), draws v^0 (`initialise`), re-plans its pool at each round's start
(`replan`, `live_workers`), runs a round's passes with each result handed to the server
(`train` -> reports, failed jobs), closes the round on the server (`close_round`), runs
evaluation chunks (`evaluate`) and says which keys' evaluated state changed
(`evaluation_digests`), and hands over the server's state (`server_state`, `load_server_state`,
`take_snapshot`, `export_outcome`), its process ids, fault injection (`kill_worker`) and
`shutdown`.
"""

from __future__ import annotations

from collections.abc import Callable

from fltac_ray.config import ExperimentConfig
from fltac_ray.data.federated import FederatedData


class Backend:
    name = ""

    def __init__(self, config: ExperimentConfig, algorithm_class: type, data: FederatedData,
                 active: list[int], say: Callable[[str], None]) -> None:
        self.config = config
        self.algorithm_class = algorithm_class  # shipped to workers and server: no registry lookup there
        self.data = data
        self.active = active  # the clients that hold data
        self.say = say

    def replan(self, round_index: int) -> None:
        """At a round's start: take in workers that came up, drop lost ones (a fixed pool: none)."""

    def pass_limits(self) -> tuple[int, int]:
        """(engine.max_batched_adapters, engine.max_pass_examples) as the run resolved them at start."""
        engine = self.config.engine
        return int(engine.max_batched_adapters), engine.max_pass_examples

    def live_workers(self) -> list[int]:
        """The indices of the workers that take work now (reports name them)."""
        return [0]
