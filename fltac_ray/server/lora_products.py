"""How far averaging A and B separately lands from averaging the updates B A they stand for.

A LoRA layer's update is dW = B A (B: (d_out, r), A: (r, d_in)). FedAvg-style methods (FedIT,
FL-TAC inside each cluster) average the factors, and the product of the averages is not the
average of the products:

    error = || sum_k p_k B_k A_k - (sum_k p_k B_k)(sum_k p_k A_k) ||_F / || sum_k p_k B_k A_k ||_F

per layer and group, with p the aggregation weights normalised within the group (the quantity
FLoRA, Wang et al. NeurIPS 2024, and FedEx-LoRA, Singhal et al. 2024, argue about). 0 when every
A (or every B) of a group is the same; undefined (NaN) where the averaged product is 0, e.g. while
every B is still at its zero initialisation. The round's figure (rounds.csv
`lora_product_error`) is the mean over the layers and the groups of two or more uploads.

No Ray; the server calls `round_product_error` on a round's accepted uploads.
"""

from __future__ import annotations

import numpy as np


def lora_pairs(layout) -> list[tuple[slice, tuple[int, int], slice, tuple[int, int]]]:
    """(A's slice, A's shape (r, d_in), B's slice, B's shape (d_out, r)) of every LoRA layer of a
    flat adapter laid out as `layout` ((name, shape) in flattening order), paired by name."""
    return [pair[1:] for pair in named_lora_pairs(layout)]


def named_lora_pairs(layout) -> list[tuple[str, slice, tuple[int, int], slice, tuple[int, int]]]:
    """lora_pairs with each layer's module name first: the layout name before ".lora_A."
    (`encoder...query`), the name models/multi_adapter._lora_layers gives the same layer."""
    offsets, start = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape))
        offsets[name] = (slice(start, start + size), tuple(shape))
        start += size
    pairs = []
    for name, (a_slice, a_shape) in offsets.items():
        if "lora_A" in name and (b := offsets.get(name.replace("lora_A", "lora_B"))) is not None:
            b_slice, b_shape = b
            if len(a_shape) == 2 and len(b_shape) == 2 and a_shape[0] == b_shape[1]:  # linear layers
                pairs.append((name.split(".lora_A")[0], a_slice, a_shape, b_slice, b_shape))
    return pairs


def product_error(a: np.ndarray, b: np.ndarray, weights: np.ndarray) -> float:
    """The relative error for one layer of one group: `a` (n, r, d_in), `b` (n, d_out, r),
    `weights` (n,) summing to 1. In float64: the two products can agree to many digits."""
    a, b, p = a.astype(np.float64), b.astype(np.float64), weights.astype(np.float64)
    # sum_k p_k B_k A_k as one product of stacks: (d_out, n r) @ (n r, d_in)
    n, r, d_in = a.shape
    stacked_b = np.concatenate(list(b * p[:, None, None]), axis=1)  # (d_out, n r)
    mean_of_products = stacked_b @ a.reshape(n * r, d_in)
    product_of_means = np.tensordot(p, b, axes=1) @ np.tensordot(p, a, axes=1)  # (d_out, r) @ (r, d_in)
    scale = np.linalg.norm(mean_of_products)
    return float(np.linalg.norm(mean_of_products - product_of_means) / scale) if scale > 0 else float("nan")


def round_product_error(vectors: list[np.ndarray], labels: np.ndarray, weights: np.ndarray, layout) -> float:
    """The mean error over every LoRA layer of every group (labels) of two or more uploads, each a
    whole adapter (p,); NaN when there is none (no LoRA pair, groups of one). One group's rows are
    stacked at a time, never all uploads at once."""
    pairs = lora_pairs(layout)
    errors = []
    for group in np.unique(labels):
        members = np.flatnonzero(labels == group)
        if len(members) < 2 or not pairs or weights[members].sum() <= 0:
            continue
        p = weights[members] / weights[members].sum()
        rows = np.stack([vectors[i] for i in members])  # (m, p)
        for a_slice, a_shape, b_slice, b_shape in pairs:
            error = product_error(rows[:, a_slice].reshape(-1, *a_shape), rows[:, b_slice].reshape(-1, *b_shape), p)
            if np.isfinite(error):
                errors.append(error)
    return float(np.mean(errors)) if errors else float("nan")


# np.random.default_rng([seed, SKETCH_STREAM, layer]): the product sketch's projections
PRODUCT_SKETCH_STREAM = 37


def product_sketch(vectors: np.ndarray, layout, size: int = 4, seed: int = 0) -> np.ndarray:
    """(n, m) rank-independent features of whole adapters (n, p): for every linear LoRA layer the
    sketch P B A Q (size x size) of its update B A, with P (size, d_out) and Q (d_in, size) seeded
    Gaussian projections (entries N(0, 1/size), the same for every upload), then every entry
    outside LoRA pairs (the classifier head) as it is. B A is the same shape at every rank, and
    (P B)(A Q) costs O(r (d_out + d_in) size) per layer: never the d_out x d_in product itself.
    Distances between the sketches follow those between the updates (Johnson-Lindenstrauss), so
    K-means can group adapters of different ranks by what they do (algorithms/fltac.py option
    cluster_on: products)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    n = len(vectors)
    pairs = lora_pairs(layout)
    parts, covered = [], np.zeros(vectors.shape[1], dtype=bool)
    for index, (a_slice, a_shape, b_slice, b_shape) in enumerate(pairs):
        rng = np.random.default_rng([seed, PRODUCT_SKETCH_STREAM, index])
        left = rng.standard_normal((size, b_shape[0])) / np.sqrt(size)  # P (size, d_out)
        right = rng.standard_normal((a_shape[1], size)) / np.sqrt(size)  # Q (d_in, size)
        a = vectors[:, a_slice].reshape(n, *a_shape)  # (n, r, d_in)
        b = vectors[:, b_slice].reshape(n, *b_shape)  # (n, d_out, r)
        parts.append(np.einsum("sd,ndr->nsr", left, b) @ (a @ right))  # (n, size, size)
        covered[a_slice] = covered[b_slice] = True
    flat = [part.reshape(n, -1) for part in parts]
    return np.concatenate(flat + [vectors[:, ~covered]], axis=1).astype(np.float32)
