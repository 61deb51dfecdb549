"""Screening uploads before they are clustered or averaged (`federation.screening`).

Robust aggregation inside a cluster (algorithms/robust.py) comes too late for FL-TAC: a few
uploads far from everything else take a K-means cluster of their own, so two honest tasks share
one cluster and the robust rule then works inside a cluster the attacker has shaped. Screening
acts on the round's whole set of uploads first, with no task labels:

  norm        score = ||v||: catches scaled uploads, misses a sign flip at scale 1 (same norm).
  neighbours  score = distance from v to its k-th nearest other upload. Honest uploads of a task
              sit close to that task's other uploads, an attacker is far from all of them unless
              more than k attackers agree; k defaults to (uploads // 2K) - with K tasks, each
              task holds ~n/K uploads, so k is half a task's share. Catches scaling, sign flips
              at any scale, random uploads.

An upload is screened out when score > median + threshold * spread over the round, with the
spread the scaled median absolute deviation (1.4826 MAD, the standard deviation for normal data)
and at least 5% of the median (so identical honest scores do not make every small difference
an outlier). Since the rule is relative to the round's median, fewer than half of the uploads
can ever be screened out. Cost: neighbours computes every pairwise distance, O(n^2 p) in
blocks of SCREEN_BLOCK_ROWS rows (n = 1,000 MiniLM uploads: ~1e11 flops, seconds on a CPU).

No Ray here; the server calls it on each round's checked uploads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RULES = ("none", "norm", "neighbours")
MAD_TO_SIGMA = 1.4826
MIN_SPREAD = 0.05  # of the median score
SCREEN_BLOCK_ROWS = 256


@dataclass(frozen=True)
class Screen:
    kept: np.ndarray  # (n,) bool
    scores: np.ndarray  # (n,) the rule's score of each upload
    limit: float  # scores above it were screened out


def default_neighbours(uploads: int, clusters: int) -> int:
    """k of the neighbours rule: half of one task's expected share of the uploads, at least 1."""
    return max(1, uploads // (2 * max(1, clusters)))


def kth_neighbour_distance(vectors: np.ndarray, k: int) -> np.ndarray:
    """(n,) Euclidean distance of each row of `vectors` (n, p) to its k-th nearest other row
    (k is capped at n - 1). Squared distances ||x||^2 + ||y||^2 - 2 x.y, a block of rows at a
    time: the (b, n) products in the uploads' float32 (no float64 copy of all uploads), the sums
    in float64."""
    n = len(vectors)
    k = min(k, n - 1)
    squares = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)  # (n,)
    out = np.empty(n)
    for lo in range(0, n, SCREEN_BLOCK_ROWS):
        block = vectors[lo:lo + SCREEN_BLOCK_ROWS]  # (b, p)
        d2 = squares[lo:lo + len(block), None] + squares[None, :] - 2.0 * (block @ vectors.T).astype(np.float64)
        d2[np.arange(len(block)), np.arange(lo, lo + len(block))] = np.inf  # not its own neighbour
        # the k-th smallest of each row (k >= 1): partition index k - 1
        out[lo:lo + len(block)] = np.sqrt(np.maximum(np.partition(d2, k - 1, axis=1)[:, k - 1], 0.0))
    return out


def outlier_limit(scores: np.ndarray, threshold: float) -> float:
    """median + threshold * max(1.4826 MAD, 5% of the median)."""
    median = float(np.median(scores))
    spread = max(MAD_TO_SIGMA * float(np.median(np.abs(scores - median))), MIN_SPREAD * abs(median))
    return median + threshold * spread


def screen_uploads(vectors: np.ndarray, rule: str, threshold: float, neighbours: int) -> Screen:
    """Which of a round's uploads (n, p) to keep. Fewer than 3 uploads: all kept (no majority)."""
    n = len(vectors)
    if rule == "none" or n < 3:
        return Screen(np.ones(n, dtype=bool), np.zeros(n), float("inf"))
    if rule == "norm":
        scores = np.linalg.norm(np.asarray(vectors, np.float64), axis=1)
    elif rule == "neighbours":
        scores = kth_neighbour_distance(vectors, neighbours)
    else:
        raise ValueError(f"unknown screening rule {rule!r}; known: {RULES}")
    limit = outlier_limit(scores, threshold)
    return Screen(scores <= limit, scores, limit)
