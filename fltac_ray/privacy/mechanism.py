"""Clipping and Gaussian noise (numpy only, no Ray, no accounting).

Client-level DP as in DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018, "Learning
Differentially Private Recurrent Language Models"): what a client contributes in a round is its
update Delta = upload - reference (the upload minus what it would have sent untrained), clipped
to L2 norm at most C, so one client moves anything computed from it by at most C; Gaussian noise
N(0, (z C)^2) per coordinate then hides that move, z being the noise multiplier.

A client with S adapters (FL-TAC: one per task) sends S uploads a round; each is clipped to C, so
the client as a whole moves the round's uploads by at most C sqrt(S) (the L2 norm of its S clipped
updates side by side). With noise z C on each upload the client is protected as by one Gaussian
mechanism of multiplier z / sqrt(S): `client_noise_multiplier` gives that number, which the
accounting uses.

The central variant (DP-FedAvg proper) clips on the client and adds the noise to the server's
averages instead: `CentralNoise` is handed to the algorithm for one round, and every group mean
the algorithm computes (FederatedAlgorithm.cluster_means, which every averaging method uses, so
whatever it builds on the means - IFCA's K models, FedAdam's moments - is post-processing) gets
N(0, (z C / n_k)^2) per coordinate: noise z C on the group's sum of n_k clipped updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

# the tag of the noise's np.random.default_rng([seed, tag, round, client, slot]) streams, distinct
# from the engine's other draws (1-9) and the attacks' (17-19)
PRIVACY_STREAM = 23


def clip_update(update: np.ndarray, bound: float) -> tuple[np.ndarray, float]:
    """`update` (p,) scaled down to L2 norm at most `bound` (unchanged when already within it),
    and its norm before clipping. Norms in float64: a float32 sum of squares of ~1e6 entries
    would carry its rounding into the bound."""
    norm = float(np.sqrt(np.dot(update.astype(np.float64), update.astype(np.float64))))
    if norm <= bound or norm == 0.0:
        return update, norm
    return (update * (bound / norm)).astype(update.dtype), norm


def privatize_upload(vector: np.ndarray, reference: np.ndarray, clip_norm: float, noise_multiplier: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """The upload a client sends under local client-level DP: reference + clip(vector - reference,
    C) + N(0, (z C)^2) per coordinate, as float32; and the update's norm before clipping. Both
    arrays (p,)."""
    update = vector.astype(np.float64) - reference.astype(np.float64)
    clipped, norm = clip_update(update, clip_norm)
    noise = rng.normal(0.0, noise_multiplier * clip_norm, size=clipped.shape)
    return (reference.astype(np.float64) + clipped + noise).astype(np.float32), norm


def client_noise_multiplier(noise_multiplier: float, adapters_per_client: int) -> float:
    """The multiplier one client's whole contribution of a round sees: z / sqrt(S) for S adapters
    each clipped to C and noised with z C (see the module docstring)."""
    return noise_multiplier / math.sqrt(max(1, adapters_per_client))


@dataclass
class CentralNoise:
    """The noise of one round's group means under client_central: a mean of n_k uploads
    (uniform weights, so the weights are the counts) gets N(0, (z C / n_k)^2) per coordinate;
    groups with no upload this round are left as they are. `calls` counts the means noised, so
    the server can refuse an algorithm whose answers never went through them."""

    rng: np.random.Generator
    noise_multiplier: float
    clip_norm: float
    calls: int = 0

    def __call__(self, aggregate):
        counts = np.asarray(aggregate.weights, dtype=np.float64)  # (k,) uploads behind each row
        adapters = np.asarray(aggregate.adapters, dtype=np.float64).copy()  # (k, p)
        for row, count in enumerate(counts):
            if count > 0:
                adapters[row] += self.rng.normal(0.0, self.noise_multiplier * self.clip_norm / count,
                                                 size=adapters.shape[1])
        self.calls += 1
        return replace(aggregate, adapters=adapters.astype(np.float32))


def quantile_noise(noise_multiplier: float, share: float) -> tuple[float, float]:
    """Adaptive clipping's split of client_central's budget (Andrew, Thakkar, McMahan, Ramaswamy,
    NeurIPS 2021, "Differentially Private Learning with Adaptive Clipping"): (the means' noise
    multiplier, the standard deviation of the noise on the count of unclipped uploads).

    Per round, replacing a client moves the group sums by up to 2 S C (multiplier z_m / (2 S)
    for noise z_m C) and the count of unclipped uploads by up to S (its S bits; multiplier
    sigma_b / S). Released together they are one Gaussian mechanism whose 1/multiplier^2 is the
    sum of theirs; giving the count `share` of the accounted (z / (2 S))^-2 leaves
    z_m = z / sqrt(1 - share) and sigma_b = z / (2 sqrt(share)), whatever S is."""
    return noise_multiplier / math.sqrt(1 - share), noise_multiplier / (2 * math.sqrt(share))


def next_clip_norm(clip_norm: float, unclipped: int, uploads: int, target_quantile: float, learning_rate: float,
                   count_noise: float, rng: np.random.Generator) -> tuple[float, float]:
    """One step of adaptive clipping's geometric update: the noised share of uploads whose update
    was within the bound, b = (unclipped + N(0, sigma_b^2)) / uploads, and the next bound
    C exp(-eta (b - target)): it grows while fewer than the target share fit under it. Returns
    (next bound, b). The number of uploads is treated as public, as the group sizes are."""
    share = (unclipped + rng.normal(0.0, count_noise)) / max(1, uploads)
    return clip_norm * math.exp(-learning_rate * (share - target_quantile)), share
