"""HetLoRA: heterogeneous LoRA ranks with norm-weighted zero-padding aggregation (Cho, Liu, Joshi,
Rangwala, Singh; EMNLP 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", arXiv 2401.06432).

Clients train at their own ranks (model.lora.rank_profile; models/ranks.py pads every adapter to
the largest rank with zeros). The server averages the zero-padded A and B of each LoRA layer
with weights proportional to the Frobenius norm of each client's update B_k A_k in that layer
(the paper's sparsity-weighted aggregation: an update that moved the layer more counts more, so
the zeros of a low-rank client dilute less), and every client keeps the first r_i ranks of the
answer (the engine's truncation). Entries outside LoRA pairs (the classifier head) and layers
whose every update is still zero are averaged with the method's FedAvg weights. Client side:
FedIT's (one adapter per client over its tasks). The paper's optional rank self-pruning is not
implemented.
"""

from __future__ import annotations

import numpy as np

from fltac_ray.algorithms.base import Aggregate, Uploads
from fltac_ray.algorithms.fedit import FedIT
from fltac_ray.algorithms.robust import weighted_cluster_means
from fltac_ray.server.lora_products import lora_pairs


def norm_weighted_means(vectors: np.ndarray, labels: np.ndarray, weights: np.ndarray, layout) -> Aggregate:
    """Per group (labels), FedAvg of `vectors` (n, p) with `weights` (n,), except every LoRA pair
    of the layout: there each member's A and B count in proportion to ||B_k A_k||_F."""
    result = weighted_cluster_means(vectors, labels, weights)  # everything, then the LoRA pairs again
    compact = np.asarray(result.labels)
    adapters = result.adapters.astype(np.float64)
    for group in range(len(adapters)):
        members = np.flatnonzero(compact == group)
        rows = vectors[members].astype(np.float64)
        for a_slice, a_shape, b_slice, b_shape in lora_pairs(layout):
            a = rows[:, a_slice].reshape(len(members), *a_shape)  # (m, r, d_in)
            b = rows[:, b_slice].reshape(len(members), *b_shape)  # (m, d_out, r)
            norms = np.linalg.norm(b @ a, axis=(1, 2))  # (m,) ||B_k A_k||_F
            if norms.sum() <= 0:
                continue  # every B still zero: the FedAvg answer stands
            p = norms / norms.sum()
            adapters[group, a_slice] = np.tensordot(p, rows[:, a_slice], axes=1)
            adapters[group, b_slice] = np.tensordot(p, rows[:, b_slice], axes=1)
    return Aggregate(compact, adapters.astype(np.float32), result.weights)


class LayerRuleAlgorithm(FedIT):
    """FedIT's client side with a rule of its own for the LoRA layers (HetLoRA here, FlexLoRA in
    flexlora.py): `layer_rule(vectors, labels, weights, layout)` answers the round's one group."""

    name = ""  # a base, not an algorithm of its own
    central_privacy = False  # its answer is no plain mean: client_central's sensitivity does not hold
    layer_rule = staticmethod(norm_weighted_means)

    @classmethod
    def check_config(cls, config) -> None:
        if config.options.aggregation != "mean":
            raise ValueError(f"algorithm.aggregation = {config.options.aggregation!r}: {cls.name} has its own rule "
                             "for the LoRA layers; use mean")

    def aggregate(self, uploads: Uploads, round_index: int) -> Aggregate:
        labels = np.zeros(len(uploads.vectors), dtype=np.int64)
        return self.layer_rule(uploads.vectors, labels, self.weights(uploads.num_samples), self.spec.layout)


class HetLoRA(LayerRuleAlgorithm):
    name = "hetlora"
    summary = "HetLoRA: heterogeneous ranks, zero-padded factors averaged by update norm, truncated per client"
    layer_rule = staticmethod(norm_weighted_means)
