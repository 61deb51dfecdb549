"""FlexLoRA: heterogeneous LoRA ranks aggregated as full updates and redistributed by SVD (Bai,
Chen, Qian, Yao, Li; NeurIPS 2024, "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources", arXiv 2402.11505).

Clients train at their own ranks (model.lora.rank_profile). Per LoRA layer the server forms the
weighted sum of every client's full update, dW = sum_k p_k B_k A_k (d_out, d_in) - exactly, with
no factor-averaging error (server/lora_products.py) - and factorises it by SVD,
dW = U S V^T. The answer holds the top r_max components, split evenly between the factors,
B = U_r S_r^(1/2) and A = S_r^(1/2) V_r^T, so a rank-r_i client keeping the first r_i ranks
(the engine's truncation) receives the best rank-r_i approximation of dW (Eckart-Young).
Entries outside LoRA pairs (the classifier head) are averaged with the FedAvg weights. Client
side: FedIT's (one adapter per client over its tasks).
"""

from __future__ import annotations

import numpy as np

from fltac_ray.algorithms.base import Aggregate
from fltac_ray.algorithms.hetlora import LayerRuleAlgorithm
from fltac_ray.algorithms.robust import weighted_cluster_means
from fltac_ray.server.lora_products import lora_pairs


def svd_means(vectors: np.ndarray, labels: np.ndarray, weights: np.ndarray, layout) -> Aggregate:
    """Per group (labels), FedAvg of `vectors` (n, p) with `weights` (n,), except every LoRA pair
    of the layout: there the SVD factors of the weighted sum of the members' products B_k A_k."""
    result = weighted_cluster_means(vectors, labels, weights)
    compact = np.asarray(result.labels)
    adapters = result.adapters.astype(np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    for group in range(len(adapters)):
        members = np.flatnonzero(compact == group)
        rows = vectors[members].astype(np.float64)
        p = weights[members] / weights[members].sum()
        for a_slice, a_shape, b_slice, b_shape in lora_pairs(layout):
            rank = a_shape[0]
            a = rows[:, a_slice].reshape(len(members), *a_shape)  # (m, r, d_in)
            b = rows[:, b_slice].reshape(len(members), *b_shape)  # (m, d_out, r)
            update = np.einsum("k,kor,kri->oi", p, b, a)  # (d_out, d_in) sum_k p_k B_k A_k
            u, s, vt = np.linalg.svd(update, full_matrices=False)
            root = np.sqrt(s[:rank])
            adapters[group, b_slice] = (u[:, :rank] * root).reshape(-1)  # (d_out, r)
            adapters[group, a_slice] = (root[:, None] * vt[:rank]).reshape(-1)  # (r, d_in)
    return Aggregate(compact, adapters.astype(np.float32), result.weights)


class FlexLoRA(LayerRuleAlgorithm):
    name = "flexlora"
    summary = "FlexLoRA: heterogeneous ranks; weighted sum of full updates B A, SVD, each client its top r_i"
    layer_rule = staticmethod(svd_means)
