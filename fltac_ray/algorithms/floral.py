"""FLoRAL: federated low-rank adaptive learning (Almansoori, Horvath, Takac, 2024,
arXiv 2410.03497, "Collaborative and Efficient Personalization with Mixtures of Adaptors").

Every adapted layer carries C LoRA adaptors that all clients share; each (client, task) mixes
them with its own private router (models/mixture_lora.py), which never leaves the client: the
engine keeps it as the job's private state. The server averages adaptor c over uploads with
weights p_k * pi_k,c normalised over clients (p_k: the client's sample share, pi_k: its router's
mixture), and the shared parts (the head's base weights) with p_k alone. Every client then
receives the same adaptors back. To weight adaptor c the server must know pi_k,c: C floats per
upload, counted in the traffic; the router's parameters themselves stay on the client.

Our clients hold several tasks; each (client, task) is one FLoRAL client here, with its own
router, since a client's tasks are different distributions (the paper's clients hold one).

`algorithm: {name: floral, router: optimal}` is the paper's optimal-router baseline under a concept shift: each
client's router is fixed to its true cluster (the task index of its cluster task), so adaptor c
is trained and averaged by cluster c's clients alone — the ceiling a learned router can reach.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from fltac_ray.algorithms.base import Aggregate, ClientJob, FederatedAlgorithm, Upload, Uploads
from fltac_ray.algorithms.options import AlgorithmOptions, Weighting

OPTIMAL_LOGIT = 30.0


class FloralOptions(AlgorithmOptions):
    """C adaptors per adapted layer mixed by a private per-client router."""

    weighting: Weighting  # of each adaptor's average over the round's uploads

    num_adaptors: int | None = Field(
        default=None, ge=1, description="C, adaptors per layer; default: the number of tasks."
    )
    temperature: float = Field(default=1.0, gt=0, description="Router softmax temperature.")
    min_weight: float = Field(
        default=0.0, ge=0, lt=1,
        description="Floor on every adaptor's mixing weight (the reference has none: 0).",
    )
    rank_fraction: float | None = Field(
        default=0.01, gt=0, le=1,
        description="Each layer's rank as a share f of its parameter budget, int(f x in x out / "
        "(in + out)), at least 1 (the reference's default 1%); None: model.lora.rank everywhere.",
    )
    alpha: float | None = Field(
        default=1.0, gt=0,
        description="Scale of the mixed adaptors' output (the reference: 1.0); None: "
        "model.lora.alpha / rank, as peft LoRA.",
    )
    bias: bool = Field(
        default=True,
        description="A zero-initialised bias per adaptor on layers that have a bias (the reference's default).",
    )
    router: Literal["learned", "optimal"] = Field(
        default="learned",
        description="learned: each client's private router trains; optimal: fixed to the client's "
        "true concept-shift cluster (the paper's optimal-router baseline; needs data.concept_shift).",
    )
    router_noise: float = Field(
        default=1.0, ge=0,
        description="In training, U(0, router_noise) added to the router's weights at each forward "
        "pass (the reference's noisy gating, 1.0); 0: none.",
    )
    # Adam moves each router weight by about router_lr per step; at the adapters' lr (2e-3) the
    # routers of the offline default were still uniform after 3 rounds (max |w| 0.066, pi within
    # [0.31, 0.36]), so no adaptor specialised. 0.1 lets a router reach a decisive mix in ~30 steps.
    router_lr: float = Field(default=0.1, gt=0, description="AdamW learning rate of the private routers.")


def num_adaptors(config) -> int:
    """C: algorithm.num_adaptors, by default the number of tasks."""
    return config.options.num_adaptors or config.num_tasks


class FLoRAL(FederatedAlgorithm):
    name = "floral"
    upload_extras = ("mixture",)
    summary = "FLoRAL: C federated LoRA adaptors per layer mixed by a private per-client router"
    Options = FloralOptions
    heterogeneous_ranks = False  # see FederatedAlgorithm.heterogeneous_ranks

    @classmethod
    def check_config(cls, config) -> None:
        shift = config.data.concept_shift
        adaptors = num_adaptors(config)
        if config.options.router == "optimal" and (shift is None or adaptors != shift.clusters):
            have = "no data.concept_shift" if shift is None else f"{shift.clusters} clusters"
            raise ValueError(f"algorithm.router = 'optimal': fixes each client's router to its true "
                             f"concept-shift cluster, so it needs data.concept_shift with as many clusters as "
                             f"algorithm.num_adaptors ({adaptors}); here {have}")
        if config.model.head == "frozen":
            raise ValueError("model.head = 'frozen': FLoRAL's head carries its mixture adaptors and is "
                             "federated; remove it")

    @classmethod
    def resolved_options(cls, config) -> dict[str, Any]:
        return {**super().resolved_options(config), "num_adaptors": num_adaptors(config)}

    def private_start(self, job: ClientJob, private: np.ndarray | None) -> np.ndarray | None:
        if self.options.router != "optimal":
            return private
        # a logit gap of 30: softmax puts all but e^-30 of the mixture on the true cluster
        weights = np.zeros(num_adaptors(self.config), np.float32)
        weights[self.config.data.task_names.index(job.tasks[0])] = OPTIMAL_LOGIT
        return weights

    def model_options(self) -> dict[str, Any]:
        return {"floral": self.options, "num_adaptors": num_adaptors(self.config)}

    def mixture(self, router: np.ndarray) -> np.ndarray:
        """pi = softmax(w / temperature) (C,) of a private router w (Router.mixture in numpy)."""
        if router.size == 0:  # a router never trained: zero weights, the uniform mixture
            router = np.zeros(num_adaptors(self.config), np.float32)
        scaled = router.astype(np.float64) / self.options.temperature
        scaled = np.exp(scaled - scaled.max())
        return (scaled / scaled.sum()).astype(np.float32)

    def upload(self, job: ClientJob, trained: np.ndarray, private: np.ndarray,
               meta: dict[str, Any]) -> Upload | None:
        return Upload(job.key, trained, job.num_samples, extras={"mixture": self.mixture(private)})

    def aggregate(self, uploads: Uploads, round_index: int) -> Aggregate:
        mixture = uploads.extras.get("mixture")
        if mixture is None:
            raise ValueError("FLoRAL uploads must carry their router mixture weights")
        index = self.spec.adaptor_index if self.spec is not None else None
        if index is None or len(index) != uploads.vectors.shape[1]:
            raise ValueError("FLoRAL needs the adaptor index of every adapter entry")
        vectors = uploads.vectors.astype(np.float64)  # (n, d)
        p = self.weights(uploads.num_samples)  # (n,)
        merged = np.empty(vectors.shape[1])
        shared = index < 0
        merged[shared] = p @ vectors[:, shared] / p.sum()
        for c in range(mixture.shape[1]):
            columns = index == c
            weight = p * mixture[:, c]  # (n,) p_k * pi_k,c
            merged[columns] = weight @ vectors[:, columns] / weight.sum()
        labels = np.zeros(len(vectors), dtype=np.int64)
        return Aggregate(labels, merged[None].astype(np.float32), np.array([p.sum()]))
