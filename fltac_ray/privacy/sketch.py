"""A noised low-dimensional sketch of each upload, for clustering under local DP (privacy.sketch).

Under client_local every upload carries noise N(0, (z C)^2) in each of its p coordinates, so
its noise has norm z C sqrt(p) (MiniLM rank 1: p = 19,226, ~139 z C) against an update of norm
at most C: K-means over the uploads sees noise. FL-TAC's server only needs to tell the tasks
apart, which a few numbers can carry. Each client also sends a sketch of k numbers, a fixed
public map of its update Delta = upload - reference (the reference: what it would send untrained)
clipped to norm C, plus N(0, (z_s C)^2) per number: noise of norm z_s C sqrt(k). The server
clusters the sketches (algorithms/fltac.py) and still averages the full noised uploads.

  block_norms  the L2 norm of Delta in each block of the adapter: every LoRA tensor, and the
               classifier head row by row (a task trains the rows of its own classes). The
               vector of block norms has the norm of Delta itself, so clipping it to C bounds
               the sensitivity by C. *Where* an update went identifies its task: on the offline
               default's round-1 updates (51 blocks), K-means recovers the tasks exactly with
               noise 0.05 per number and 95% at 0.1, where the full noised uploads fall to 45%.
  projection   R reference + clip(R Delta, C) + noise, R a seeded Johnson-Lindenstrauss matrix
               (k x p, entries N(0, 1/k)) every client and the server build from the run's seed:
               distances kept to a factor 1 +- O(1/sqrt(k)); needs no knowledge of the model's
               layout, but it keeps only ~80% clustering accuracy there even without noise (the
               same-task updates' cosine is ~0.29, other tasks' ~0.06).

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


def block_bounds(layout: list[tuple[str, tuple[int, ...]]]) -> list[tuple[int, int]]:
    """[lo, hi) ranges of the flat adapter: one per layout tensor, the head's weight (classes,
    hidden) one per row."""
    bounds, offset = [], 0
    for name, shape in layout:
        size = int(np.prod(shape))
        if name == "head.weight" and len(shape) == 2:
            bounds += [(offset + row * shape[1], offset + (row + 1) * shape[1]) for row in range(shape[0])]
        else:
            bounds.append((offset, offset + size))
        offset += size
    return bounds


def block_norms(update: np.ndarray, bounds: list[tuple[int, int]]) -> np.ndarray:
    """(len(bounds),) float64: the L2 norm of `update` within each block."""
    update = np.asarray(update, dtype=np.float64)
    return np.array([math.sqrt(float(np.dot(update[lo:hi], update[lo:hi]))) for lo, hi in bounds])


def split_noise(noise_multiplier: float, share: float) -> tuple[float, float]:
    """(upload's multiplier, sketch's multiplier) for a combined `noise_multiplier` with `share`
    of it (as 1/z^2) spent on the sketch; share 0: (z, inf)."""
    if share <= 0:
        return noise_multiplier, math.inf
    return noise_multiplier / math.sqrt(1 - share), noise_multiplier / math.sqrt(share)


def noised_sketch(kind: str, upload: np.ndarray, reference: np.ndarray, layout: list[tuple[str, tuple[int, ...]]],
                  seed: int, dim: int, clip_norm: float, noise_multiplier: float,
                  rng: np.random.Generator) -> np.ndarray:
    """The sketch of `kind` (block_norms or projection), float32, noised with multiplier
    `noise_multiplier` (the sketch's own) and bound `clip_norm`. `upload`, `reference`: (p,) the
    adapter as trained and as it would be sent untrained; `layout`: the adapter's (block_norms
    needs the whole adapter); `dim`: projection's size."""
    from fltac_ray.privacy.mechanism import clip_update

    update = np.asarray(upload, np.float64) - np.asarray(reference, np.float64)
    if kind == "block_norms":
        bounds = block_bounds(layout)
        if bounds[-1][1] != update.size:
            raise ValueError(f"privacy.sketch block_norms needs the whole adapter ({bounds[-1][1]} numbers); "
                             f"this upload has {update.size}")
        base, moved = np.zeros(len(bounds)), clip_update(block_norms(update, bounds), clip_norm)[0]
    elif kind == "projection":
        base, moved = project(reference, seed, dim), clip_update(project(update, seed, dim), clip_norm)[0]
    else:
        raise ValueError(f"privacy.sketch = {kind!r}: use block_norms or projection")
    noise = rng.normal(0.0, noise_multiplier * clip_norm, size=moved.shape)
    return (base + moved + noise).astype(np.float32)


def sketch_size(kind: str, layout: list[tuple[str, tuple[int, ...]]], dim: int) -> int:
    """How many numbers a sketch of `kind` holds."""
    return len(block_bounds(layout)) if kind == "block_norms" else dim
