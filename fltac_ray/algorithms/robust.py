"""Averaging inside each cluster: the weighted mean (FedAvg, `weighted_cluster_means`) and its
robust replacements.

- coordinate-wise median (Yin et al., ICML 2018, "Byzantine-robust distributed learning");
- coordinate-wise trimmed mean: per coordinate, drop the floor(trim * m) smallest and largest of
  the m member values and average the rest (same paper).

Both ignore sample counts on purpose: weighting by a count the client reports would let one
client buy influence by lying about it. Their breakdown points (fraction of arbitrary members
they tolerate) are 1/2 for the median and `trim` for the trimmed mean.
"""

from __future__ import annotations

import numpy as np

from fltac_ray.algorithms.types import Aggregate

RULES = ("mean", "median", "trimmed_mean")


def combine(members: np.ndarray, rule: str, trim: float) -> np.ndarray:
    """One cluster's members (m, d) -> (d,) by the robust rule."""
    if rule == "median":
        return np.median(members, axis=0)
    if rule == "trimmed_mean":
        m = len(members)
        cut = int(np.floor(trim * m))
        if 2 * cut >= m:  # validation keeps trim < 0.5; this guards tiny clusters
            cut = (m - 1) // 2
        ordered = np.sort(members, axis=0)  # per coordinate
        return ordered[cut:m - cut].mean(axis=0)
    raise ValueError(f"unknown robust rule {rule!r}; known: {RULES}")


def cluster_aggregate(
    vectors: np.ndarray, labels: np.ndarray, weights: np.ndarray, rule: str = "mean", trim: float = 0.0
) -> Aggregate:
    """Per-cluster aggregate: the weighted mean (FedAvg) or a robust rule; labels compacted."""
    if rule == "mean":
        return weighted_cluster_means(vectors, labels, weights)
    cluster_ids, compact = np.unique(labels, return_inverse=True)
    vectors = np.asarray(vectors, dtype=np.float64)
    adapters = np.stack([combine(vectors[compact == k], rule, trim) for k in range(len(cluster_ids))])
    totals = np.bincount(compact, weights=np.asarray(weights, dtype=np.float64), minlength=len(cluster_ids))
    return Aggregate(compact, adapters.astype(np.float32), totals)


# Rows per float64 block of the weighted sums: bounds the server's extra memory to a few MB
# whatever the number of uploads (a float64 copy of 2,000 MiniLM adapters would be 300 MB).
SUM_BLOCK_ROWS = 256


def weighted_cluster_means(
    vectors: np.ndarray, labels: np.ndarray, weights: np.ndarray
) -> Aggregate:
    """Per-cluster weighted mean of `vectors` (n, d); clusters are renumbered 0..k-1 in order of
    first id, so an id that K-means left empty simply does not appear. Sums in float64."""
    weights = np.asarray(weights, dtype=np.float64)
    if np.any(weights <= 0):
        raise ValueError("aggregation weights must be positive")
    cluster_ids, compact = np.unique(labels, return_inverse=True)
    k = len(cluster_ids)
    totals = np.bincount(compact, weights=weights, minlength=k)  # (k,)
    # (k, n) weight of each upload in each cluster's sum; applied block by block in float64
    membership = np.zeros((k, len(weights)))
    membership[compact, np.arange(len(weights))] = weights
    sums = np.zeros((k, vectors.shape[1]))
    for lo in range(0, len(weights), SUM_BLOCK_ROWS):
        block = np.asarray(vectors[lo:lo + SUM_BLOCK_ROWS], dtype=np.float64)
        sums += membership[:, lo:lo + SUM_BLOCK_ROWS] @ block
    return Aggregate(compact, (sums / totals[:, None]).astype(np.float32), totals)
