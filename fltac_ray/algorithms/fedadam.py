"""FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2): a server
optimiser over one global adapter.

Clients train from the global adapter x as in FedAvg (algorithms/global_model.py); the server
treats the round's average change as a pseudo-gradient and takes an Adam step along it:

    delta = mean(y_i) - x
    m <- beta1 m + (1 - beta1) delta
    v <- beta2 v + (1 - beta2) delta^2
    x <- x + eta m / (sqrt(v) + tau)

(no bias correction, as in the paper). m and v are server state, saved in checkpoints, so a
resumed run continues exactly.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from fltac_ray.algorithms.base import Uploads
from fltac_ray.algorithms.global_model import GlobalModelAlgorithm, GlobalModelOptions


class FedAdamOptions(GlobalModelOptions):
    server_lr: float = Field(default=0.01, gt=0, description="eta, the server's step size")
    beta1: float = Field(default=0.9, ge=0, lt=1, description="decay of the first moment m")
    beta2: float = Field(default=0.99, ge=0, lt=1, description="decay of the second moment v")
    tau: float = Field(default=1e-3, gt=0, description="adaptivity: added to sqrt(v) (the paper's default 1e-3)")


class FedAdam(GlobalModelAlgorithm):
    name = "fedadam"
    summary = "FedAdam: clients as FedAvg, the server takes Adam steps along the average update"
    Options = FedAdamOptions
    round_metrics = ("server_step_norm",)  # ||x_new - x||: the size of the server's Adam step

    def __init__(self, config) -> None:
        super().__init__(config)
        self.first_moment: np.ndarray | None = None  # (d,) m
        self.second_moment: np.ndarray | None = None  # (d,) v
        self.last_step_norm = 0.0

    def set_initial(self, adapters: np.ndarray) -> None:
        super().set_initial(adapters)
        self.first_moment = np.zeros_like(self.global_adapter)
        self.second_moment = np.zeros_like(self.global_adapter)

    def server_step(self, average: np.ndarray, uploads: Uploads) -> np.ndarray:
        o = self.options
        x = self.global_adapter.astype(np.float64)
        delta = average.astype(np.float64) - x
        m = o.beta1 * self.first_moment + (1 - o.beta1) * delta
        v = o.beta2 * self.second_moment + (1 - o.beta2) * delta * delta
        self.first_moment, self.second_moment = m.astype(np.float32), v.astype(np.float32)
        step = o.server_lr * m / (np.sqrt(v) + o.tau)
        self.last_step_norm = float(np.linalg.norm(step))
        return x + step

    def aggregate(self, uploads: Uploads, round_index: int):
        result = super().aggregate(uploads, round_index)
        result.metrics["server_step_norm"] = self.last_step_norm
        return result

    def state(self) -> dict[str, np.ndarray]:
        out = super().state()
        if self.first_moment is not None:
            out["first_moment"] = self.first_moment.copy()
            out["second_moment"] = self.second_moment.copy()
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        super().load_state(state)
        if "first_moment" in state:
            self.first_moment = np.array(state["first_moment"], dtype=np.float32)
            self.second_moment = np.array(state["second_moment"], dtype=np.float32)
