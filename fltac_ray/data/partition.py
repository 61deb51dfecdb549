"""Per-task Dirichlet split of examples over clients (FL-TAC Sec. 4.1, after Hsu et al. 2019).

For every task independently: client shares p ~ Dir(alpha * 1_m); shares below `min_share`
are set to zero and the rest renormalised (a client below the threshold does not hold the task);
the task's shuffled examples are then cut into consecutive blocks of those sizes.
"""

from __future__ import annotations

import numpy as np


def threshold_shares(shares: np.ndarray, min_share: float) -> np.ndarray:
    """Zero the shares below `min_share` and renormalise; the largest share always survives."""
    shares = np.asarray(shares, dtype=np.float64)
    kept = np.where(shares >= min_share, shares, 0.0)
    if kept.sum() == 0.0:  # possible with hundreds of clients: keep the largest share
        kept[np.argmax(shares)] = shares.max()
    return kept / kept.sum()


def dirichlet_shares(
    rng: np.random.Generator, num_clients: int, alpha: float, min_share: float
) -> np.ndarray:
    """(num_clients,) shares of one task, summing to 1."""
    return threshold_shares(rng.dirichlet(np.full(num_clients, alpha)), min_share)


def split_counts(n: int, shares: np.ndarray) -> np.ndarray:
    """Integer counts summing to n, closest to n * shares (largest remainder method)."""
    exact = np.asarray(shares, dtype=np.float64) * n
    counts = np.floor(exact).astype(np.int64)
    remainder = n - int(counts.sum())
    if remainder:
        # ties broken by client index so the result is deterministic
        order = np.lexsort((np.arange(len(exact)), -(exact - counts)))
        counts[order[:remainder]] += 1
    return counts


def split_indices(indices: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """Consecutive blocks of `indices` with the given sizes, one per client."""
    return np.split(np.asarray(indices), np.cumsum(counts)[:-1])
