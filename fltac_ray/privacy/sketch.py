"""A noised low-dimensional sketch of each upload, for clustering under local DP (privacy.sketch_dim).

Under client_local every upload carries noise N(0, (z C)^2) in each of its p coordinates, so
its noise has norm z C sqrt(p) (MiniLM rank 1: p = 19,226, ~139 z C) against an update of norm
at most C: K-means over the uploads sees noise. FL-TAC's server only needs the uploads'
*positions relative to each other* to cluster, and a seeded Johnson-Lindenstrauss projection R
(k x p, entries N(0, 1/k), public: every client and the server build the same one from the run's
seed) keeps distances to within a factor 1 +- O(1/sqrt(k)) in k dimensions. Each client also
sends

    sketch = R reference + clip(R (upload - reference), C) + N(0, (z_s C)^2 I_k)

where the reference is what it would have sent untrained (the server's last message: public to
the server) and the clipped projected update has sensitivity C; the noise now has norm
z_s C sqrt(k). The server clusters the sketches (algorithms/fltac.py) and still averages the full
noised uploads.

The privacy budget is shared: per adapter and round the upload (multiplier z_u) and the sketch
(z_s) are two Gaussian mechanisms of sensitivity C, which compose as one of multiplier
(z_u^-2 + z_s^-2)^-1/2 (Renyi DP of Gaussians adds as 1/z^2). With privacy.sketch_share = f of
that, z_s = z / sqrt(f) and z_u = z / sqrt(1 - f), so privacy.noise_multiplier z, the number the
accounting uses, is unchanged.
"""

from __future__ import annotations

import math

import numpy as np

# np.random.default_rng([seed, SKETCH_STREAM, block]): the projection's columns, block by block
SKETCH_STREAM = 29
BLOCK_COLUMNS = 8192
CACHED_ENTRIES = 1 << 24  # projections up to 64 MiB of float32 are built once per process

_cache: dict[tuple[int, int, int], np.ndarray] = {}


def _block(seed: int, dim: int, block: int, columns: int) -> np.ndarray:
    """(dim, columns) float32 N(0, 1/dim) entries of column block `block`."""
    rng = np.random.default_rng([seed, SKETCH_STREAM, block])
    return (rng.standard_normal((dim, columns), dtype=np.float32) / np.float32(math.sqrt(dim)))


def projection(seed: int, dim: int, size: int) -> np.ndarray | None:
    """The whole (dim, size) projection when it is small enough to keep (else None: project()
    rebuilds it block by block)."""
    if dim * size > CACHED_ENTRIES:
        return None
    key = (seed, dim, size)
    if key not in _cache:
        _cache[key] = np.concatenate([_block(seed, dim, b, min(BLOCK_COLUMNS, size - lo))
                                      for b, lo in enumerate(range(0, size, BLOCK_COLUMNS))], axis=1)
    return _cache[key]


def project(vector: np.ndarray, seed: int, dim: int) -> np.ndarray:
    """R vector: (p,) -> (dim,) float64, R the run's seeded (dim, p) projection."""
    vector = np.asarray(vector, dtype=np.float32)
    whole = projection(seed, dim, vector.size)
    if whole is not None:
        return whole.astype(np.float64) @ vector.astype(np.float64)
    out = np.zeros(dim, dtype=np.float64)
    for b, lo in enumerate(range(0, vector.size, BLOCK_COLUMNS)):
        part = vector[lo:lo + BLOCK_COLUMNS]
        out += _block(seed, dim, b, part.size).astype(np.float64) @ part.astype(np.float64)
    return out


def split_noise(noise_multiplier: float, share: float) -> tuple[float, float]:
    """(upload's multiplier, sketch's multiplier) for a combined `noise_multiplier` with `share`
    of it (as 1/z^2) spent on the sketch; share 0: (z, inf)."""
    if share <= 0:
        return noise_multiplier, math.inf
    return noise_multiplier / math.sqrt(1 - share), noise_multiplier / math.sqrt(share)


def noised_sketch(upload: np.ndarray, reference: np.ndarray, seed: int, dim: int, clip_norm: float,
                  noise_multiplier: float, rng: np.random.Generator) -> np.ndarray:
    """(dim,) float32: R reference + clip(R (upload - reference), C) + N(0, (z_s C)^2), z_s being
    `noise_multiplier` (the sketch's own). `upload`, `reference`: (p,) the adapter as trained and
    as it would be sent untrained."""
    from fltac_ray.privacy.mechanism import clip_update

    base = project(reference, seed, dim)
    moved, _ = clip_update(project(np.asarray(upload, np.float64) - np.asarray(reference, np.float64), seed, dim),
                           clip_norm)
    noise = rng.normal(0.0, noise_multiplier * clip_norm, size=dim)
    return (base + moved + noise).astype(np.float32)
