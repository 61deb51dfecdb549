"""The FedAvg family over one global adapter: the base of FedProx, SCAFFOLD and FedAdam.

As FedIT, each client trains one adapter over all its tasks in turn (the `budget` option sets
the steps). Unlike FedIT, where a client resumes from the last answer it received, the
server keeps the global adapter as server state, sends it to every sampled client (the
broadcast), and every sampled client starts from it: FedAvg as McMahan et al. (2017) define it,
also under partial participation. `server_step` turns the round's average into the next global
adapter (FedAvg: the average itself; FedAdam: an Adam step along it). The family's shared
options are declared once here (GlobalModelOptions).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from fltac_ray.algorithms.base import Aggregate, ClientJob, Uploads
from fltac_ray.algorithms.fedit import FedIT, FedITOptions
from fltac_ray.algorithms.local_training import LocalTraining


class GlobalModelOptions(FedITOptions):
    local_optimizer: Literal["adamw", "sgd"] = Field(
        default="adamw", description="local optimiser: adamw (the reference code's) or sgd "
        "(what the papers analyse), at train.lr and train.weight_decay")


class GlobalModelAlgorithm(FedIT):
    """One global adapter x held by the server; clients start from x; server_step(average)."""

    name = ""  # a base, not an algorithm of its own
    Options = GlobalModelOptions

    def __init__(self, config) -> None:
        super().__init__(config)
        self.global_adapter: np.ndarray | None = None  # (d,) x, the server model

    # client side: every sampled client starts from the server's current model
    def start(self, job: ClientJob, committed: np.ndarray | None, broadcast: np.ndarray,
              probe_loss) -> tuple[np.ndarray, dict[str, Any]]:
        return broadcast[0], {}

    def local_training(self) -> LocalTraining:
        return LocalTraining(self.options.local_optimizer)

    # server side
    def set_initial(self, adapters: np.ndarray) -> None:
        super().set_initial(adapters)
        self.global_adapter = np.array(adapters[0], dtype=np.float32)

    def broadcast(self) -> np.ndarray:
        return self.global_adapter[None]

    def aggregate(self, uploads: Uploads, round_index: int) -> Aggregate:
        if self.global_adapter is None:
            raise ValueError(f"{type(self).__name__}: server state is missing (set_initial() was never called)")
        average = self.cluster_means(uploads.vectors, np.zeros(len(uploads.vectors), np.int64), uploads.num_samples)
        self.global_adapter = np.asarray(self.server_step(average.adapters[0], uploads), dtype=np.float32)
        return Aggregate(average.labels, self.global_adapter[None].copy(), average.weights)

    def server_step(self, average: np.ndarray, uploads: Uploads) -> np.ndarray:
        """(d,) the next global adapter from the round's (weighted) average of the uploads.
        FedAvg: the average."""
        return average

    def state(self) -> dict[str, np.ndarray]:
        out = super().state()
        if self.global_adapter is not None:
            out["global"] = self.global_adapter.copy()
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        super().load_state(state)
        if "global" in state:
            self.global_adapter = np.array(state["global"], dtype=np.float32)
