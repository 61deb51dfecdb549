"""Robust replacements for the weighted mean inside each cluster.

- coordinate-wise median (Yin et al., ICML 2018, "Byzantine-robust distributed learning");
- coordinate-wise trimmed mean: per coordinate, drop the floor(trim * m) smallest and largest of
  the m member values and average the rest (same paper).

Both ignore sample counts on purpose: weighting by a count the client reports would let one
client buy influence by lying about it. Their breakdown points (fraction of arbitrary members
they tolerate) are 1/2 for the median and `trim` for the trimmed mean.
"""

from __future__ import annotations

import numpy as np

from fltac_ray.algorithms.base import Aggregate, weighted_cluster_means

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
