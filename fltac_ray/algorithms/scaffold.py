"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020), Algorithm 1 with the cheaper control-variate update (option II).

The server keeps the global adapter x and a control variate c; client i keeps its own c_i
(server-side client state here, kept between rounds and deduplicated like adapters; 0 at
first). Each sampled client receives (x, c), starts from y = x and takes K local steps

    y <- y - lr (g_i(y) - c_i + c)          (the correction c - c_i on every gradient)

then updates c_i+ = c_i - c + (x - y) / (K lr) and uploads (y - x, c_i+ - c_i): twice an
adapter's parameters, counted. The server moves x <- x + eta_g mean(y - x) and
c <- c + (|S| / N) mean(c_i+ - c_i) = c + sum(c_i+ - c_i) / N over the N clients. Option II
estimates the gradient from SGD's displacement, so the local optimiser defaults to SGD.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from fltac_ray.algorithms.base import Aggregate, ClientJob, Upload, Uploads
from fltac_ray.algorithms.global_model import GlobalModelAlgorithm, GlobalModelOptions
from fltac_ray.algorithms.local_training import LocalContext, LocalTraining, rows_of

if TYPE_CHECKING:
    from torch import Tensor


class ScaffoldOptions(GlobalModelOptions):
    local_optimizer: Literal["adamw", "sgd"] = Field(
        default="sgd", description="SGD, as the paper (its option II control-variate update assumes "
        "SGD steps); adamw is allowed")
    server_lr: float = Field(default=1.0, gt=0, description="eta_g, the global step size (1: the average)")


class ControlVariateCorrection(LocalTraining):
    """g_j <- g_j + correction_j, with correction = c - c_i from the job's local inputs."""

    def correct_gradients(self, grads: list[Tensor], context: LocalContext) -> None:
        for grad, correction in zip(grads, rows_of(context.inputs["correction"], context.active), strict=True):
            grad.add_(correction)


class Scaffold(GlobalModelAlgorithm):
    name = "scaffold"
    upload_extras = ("control_delta",)
    summary = "SCAFFOLD: FedAvg with client and server control variates correcting local drift"
    Options = ScaffoldOptions
    heterogeneous_ranks = False  # see FederatedAlgorithm.heterogeneous_ranks
    round_metrics = ("control_norm",)  # ||c|| after the round: how much drift is being corrected

    def __init__(self, config) -> None:
        super().__init__(config)
        self.control: np.ndarray | None = None  # (d,) c, the server's control variate

    # --- client side ------------------------------------------------------------------------
    def start(self, job: ClientJob, committed: np.ndarray | None, broadcast: np.ndarray,
              probe_loss) -> tuple[np.ndarray, dict[str, Any]]:
        x, c = broadcast[0], broadcast[1]
        c_i = np.zeros_like(c) if job.state is None else job.state
        return x, {"x": x, "c": c, "c_i": c_i}

    def local_training(self) -> LocalTraining:
        return ControlVariateCorrection(self.options.local_optimizer)

    def local_inputs(self, job: ClientJob, meta: dict[str, Any]) -> dict[str, np.ndarray]:
        return {"correction": (meta["c"] - meta["c_i"]).astype(np.float32)}

    def new_control(self, job: ClientJob, trained: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
        """c_i+ = c_i - c + (x - y) / (K lr) (option II), K the adapter's local steps."""
        steps = max(1, sum(job.steps))
        return (meta["c_i"] - meta["c"] + (meta["x"] - trained) / (steps * self.config.train.lr)).astype(np.float32)

    def keep_state(self, job: ClientJob, trained: np.ndarray, meta: dict[str, Any]) -> np.ndarray | None:
        return self.new_control(job, trained, meta)

    def upload(self, job: ClientJob, trained: np.ndarray, private: np.ndarray,
               meta: dict[str, Any]) -> Upload | None:
        control_delta = self.new_control(job, trained, meta) - meta["c_i"]
        return Upload(job.key, trained, job.num_samples, extras={"control_delta": control_delta})

    # --- server side ------------------------------------------------------------------------
    def set_initial(self, adapters: np.ndarray) -> None:
        super().set_initial(adapters)
        self.control = np.zeros_like(self.global_adapter)

    def broadcast(self) -> np.ndarray:
        return np.stack([self.global_adapter, self.control])  # (2, d): x and c

    def aggregate(self, uploads: Uploads, round_index: int) -> Aggregate:
        if "control_delta" not in uploads.extras:
            raise ValueError("SCAFFOLD uploads must carry their control-variate update (extras['control_delta'])")
        result = super().aggregate(uploads, round_index)  # x by server_step
        deltas = np.asarray(uploads.extras["control_delta"], dtype=np.float64)  # (n, d)
        self.control = (self.control + deltas.sum(0) / self.config.data.num_clients).astype(np.float32)
        result.metrics["control_norm"] = float(np.linalg.norm(self.control))
        return result

    def server_step(self, average: np.ndarray, uploads: Uploads) -> np.ndarray:
        eta = self.options.server_lr
        return self.global_adapter + eta * (average - self.global_adapter)

    def state(self) -> dict[str, np.ndarray]:
        out = super().state()
        if self.control is not None:
            out["control"] = self.control.copy()
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        super().load_state(state)
        if "control" in state:
            self.control = np.array(state["control"], dtype=np.float32)

    # traffic: every accepted upload receives x and c
    def download_params(self, outcome: Aggregate, clients: int) -> int:
        return 2 * super().download_params(outcome, clients)
