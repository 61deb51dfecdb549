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

When screening cannot hold. Both rules compare with the round's median, so they screen out fewer
than half of the uploads; neighbours also misses attackers that agree in groups of more than k
(each is another's neighbour). What can be seen without labels is a group of uploads whose
scores sit apart from the rest: above the widest gap between consecutive sorted scores when that
gap is a factor GAP_RATIO or more. A round that kept such a group says so (the round line,
rounds.csv `suspected_kept`, the summary; `federation.screening_stop` ends the run instead).
Honest rounds have no such gap (scores of one rule on one round's uploads vary smoothly); tasks
whose updates differ in norm by 2x or more would make one, and the note then says so in words
that do not claim an attack.

No Ray here; the server calls it on each round's checked uploads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RULES = ("none", "norm", "neighbours")
MAD_TO_SIGMA = 1.4826
MIN_SPREAD = 0.05  # of the median score
SCREEN_BLOCK_ROWS = 256
GAP_RATIO = 2.0  # a sorted score this many times the one below it starts a group apart


@dataclass(frozen=True)
class Screen:
    kept: np.ndarray  # (n,) bool
    scores: np.ndarray  # (n,) the rule's score of each upload
    limit: float  # scores above it were screened out
    apart_from: float = float("inf")  # scores from here up sit apart from the rest (apart_from_rest)
    tolerates: int = 0  # the most uploads of this round the rule can screen out (tolerated_count)

    @property
    def apart(self) -> np.ndarray:
        """(n,) bool: the uploads of the group apart from the rest."""
        return self.scores >= self.apart_from

    @property
    def kept_apart(self) -> int:
        """How many uploads of the group apart were kept: screening may not have held."""
        return int((self.apart & self.kept).sum())


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
    return Screen(scores <= limit, scores, limit, apart_from_rest(scores), tolerated_count(rule, n, neighbours))


def apart_from_rest(scores: np.ndarray) -> float:
    """The lowest score of the group above the widest gap between consecutive sorted scores,
    when that gap is a factor of GAP_RATIO or more and the group is at most half of the uploads
    (the rest are the reference); inf when there is none. Scores below 5% of the median count as
    5% of it, so a score near 0 makes no endless ratio."""
    ordered = np.sort(np.asarray(scores, np.float64))
    n = len(ordered)
    if n < 2:
        return float("inf")
    floor = max(MIN_SPREAD * abs(float(np.median(ordered))), np.finfo(np.float64).tiny)
    first = n - n // 2  # index of the lowest score a group of at most n // 2 can start at
    ratios = ordered[first:] / np.maximum(ordered[first - 1:-1], floor)
    widest = int(np.argmax(ratios))
    return float(ordered[first + widest]) if ratios[widest] >= GAP_RATIO else float("inf")


def tolerated_count(rule: str, uploads: int, neighbours: int) -> int:
    """The most uploads of a round `rule` can screen out: fewer than half (the limit is relative
    to the median); for neighbours also at most k (k + 1 uploads that agree are each other's
    neighbours, so none of them stands out)."""
    half = (uploads - 1) // 2
    return min(half, neighbours) if rule == "neighbours" else half
