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

`floral.router: optimal` is the paper's optimal-router baseline under a concept shift: each
client's router is fixed to its true cluster (the task index of its cluster task), so adaptor c
is trained and averaged by cluster c's clients alone — the ceiling a learned router can reach.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fltac_ray.algorithms.base import Aggregate, ClientJob, FederatedAlgorithm, Upload, Uploads

OPTIMAL_LOGIT = 30.0


class FLoRAL(FederatedAlgorithm):
    name = "floral"
    summary = "FLoRAL: C federated LoRA adaptors per layer mixed by a private per-client router"
    reads = frozenset({"federation.weighting", "floral"})

    def private_start(self, job: ClientJob, private: np.ndarray | None) -> np.ndarray | None:
        if self.config.floral.router != "optimal":
            return private
        # a logit gap of 30: softmax puts all but e^-30 of the mixture on the true cluster
        weights = np.zeros(self.config.resolved_num_adaptors, np.float32)
        weights[self.config.data.task_names.index(job.tasks[0])] = OPTIMAL_LOGIT
        return weights

    def model_options(self) -> dict[str, Any]:
        return {"floral": self.config.floral, "num_adaptors": self.config.resolved_num_adaptors}

    def mixture(self, router: np.ndarray) -> np.ndarray:
        """pi = softmax(w / temperature) (C,) of a private router w (Router.mixture in numpy)."""
        if router.size == 0:  # a router never trained: zero weights, the uniform mixture
            router = np.zeros(self.config.resolved_num_adaptors, np.float32)
        scaled = router.astype(np.float64) / self.config.floral.temperature
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
