"""FLoRAL: federated low-rank adaptive learning (Almansoori, Horvath, Takac, 2024,
arXiv 2410.03497, "Collaborative and Efficient Personalization with Mixtures of Adaptors").

Every adapted layer carries C LoRA adaptors that all clients share; each (client, task) mixes
them with its own private router (models/mixture_lora.py), which never leaves the worker. The
server averages adaptor c over uploads with weights p_k * pi_k,c normalised over clients (p_k:
the client's sample share, pi_k: its router's mixture), and the shared parts (the head's base
weights) with p_k alone. Every client then receives the same adaptors back. To weight adaptor c
the server must know pi_k,c: C floats per upload, counted in the traffic; the router's
parameters themselves stay on the client.

Our clients hold several tasks; each (client, task) is one FLoRAL client here, with its own
router, since a client's tasks are different distributions (the paper's clients hold one).
"""

from __future__ import annotations

import numpy as np

from fltac_ray.algorithms.base import Aggregate, FederatedAlgorithm, Uploads


class FLoRAL(FederatedAlgorithm):
    name = "floral"
    uses_mixture = True

    def __init__(self, weighting: str, adaptor_index: np.ndarray | None = None) -> None:
        super().__init__(weighting)
        self.adaptor_index = adaptor_index  # (d,) adaptor of each adapter entry, -1 shared

    def aggregate(self, uploads: Uploads, round_index: int) -> Aggregate:
        if uploads.mixture is None:
            raise ValueError("FLoRAL uploads must carry their router mixture weights")
        if self.adaptor_index is None or len(self.adaptor_index) != uploads.vectors.shape[1]:
            raise ValueError("FLoRAL needs the adaptor index of every adapter entry")
        vectors = uploads.vectors.astype(np.float64)  # (n, d)
        p = self.weights(uploads.num_samples)  # (n,)
        merged = np.empty(vectors.shape[1])
        shared = self.adaptor_index < 0
        merged[shared] = p @ vectors[:, shared] / p.sum()
        for c in range(uploads.mixture.shape[1]):
            columns = self.adaptor_index == c
            weight = p * uploads.mixture[:, c]  # (n,) p_k * pi_k,c
            merged[columns] = weight @ vectors[:, columns] / weight.sum()
        labels = np.zeros(len(vectors), dtype=np.int64)
        return Aggregate(labels, merged[None].astype(np.float32), np.array([p.sum()]))
