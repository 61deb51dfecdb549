"""Heterogeneous LoRA ranks: which rank each client trains at, and what that means for the flat
adapter (model.lora.rank_profile). No torch, no Ray.

Every adapter keeps the padded width r_max = model.lora.rank: a client of rank r holds
A (r_max, d_in) whose rows r.. are zero and B (d_out, r_max) whose columns r.. are zero, so its
LoRA update B A is exactly that of a rank-r adapter. Zero rows and columns stay zero in local
training (their gradients are zero: d/dB[:, j] carries A[j] x, d/dA[j] carries B[:, j]; AdamW
moves nothing with a zero gradient and decays zero to zero), so one batched pass trains clients
of every rank together. The server aggregates at r_max width (each method its own way) and every
client keeps the part within its own rank (`rank_mask`): zero-padding's truncation, and for an
SVD-ordered answer (FlexLoRA) its top-r components. The LoRA scale is alpha / r_max for every
client, i.e. alpha in proportion to the rank (the alpha = c r convention), so ranks differ only
in capacity. Traffic counts what a rank-r client really sends and receives (`sent_entries`).

Rank distributions (FlexLoRA, Bai et al., NeurIPS 2024), over a rank set R sorted ascending:
  homo               every client at the largest rank of R
  random             uniform over R
  heavy_tail         85% of clients (rounded) at the smallest rank, the rest spread evenly over
                     the others, in a seeded order: exact shares, so a federation of 10 still
                     has its tail (FlexLoRA draws each client, which leaves 10 clients with no
                     tail one time in five)
  heavy_tail_strong  the same with 85% at the largest rank
  normal             R's index from a normal centred on the middle of R (sd len(R) / 6), rounded
                     and clipped
  explicit           `per_client`, one rank per client, as given
Assignments are seeded (np.random.default_rng([seed, RANK_STREAM])): the same clients get the
same ranks in every run with the seed, whatever else changes.
"""

from __future__ import annotations

import numpy as np

DISTRIBUTIONS = ("homo", "random", "heavy_tail", "heavy_tail_strong", "normal", "explicit")
HEAVY_SHARE = 0.85  # FlexLoRA's heavy-tail share
RANK_STREAM = 31  # the seed stream of rank assignment, apart from the engine's other draws


def assign_ranks(distribution: str, ranks: list[int], num_clients: int, seed: int,
                 per_client: list[int] | None = None) -> np.ndarray:
    """(num_clients,) int64: each client's LoRA rank under `distribution` over the rank set."""
    if distribution == "explicit":
        if per_client is None or len(per_client) != num_clients:
            raise ValueError(f"explicit ranks: give one rank per client ({num_clients}), got "
                             f"{None if per_client is None else len(per_client)}")
        return np.asarray(per_client, dtype=np.int64)
    values = np.array(sorted(set(ranks)), dtype=np.int64)
    rng = np.random.default_rng([seed, RANK_STREAM])
    if distribution == "homo" or len(values) == 1:
        return np.full(num_clients, values[-1], dtype=np.int64)
    if distribution == "random":
        return rng.choice(values, size=num_clients)
    if distribution in ("heavy_tail", "heavy_tail_strong"):
        heavy = values[0] if distribution == "heavy_tail" else values[-1]
        others = values[values != heavy]
        tail = num_clients - int(round(HEAVY_SHARE * num_clients))
        assigned = np.concatenate([np.full(num_clients - tail, heavy), others[np.arange(tail) % len(others)]])
        return rng.permutation(assigned).astype(np.int64)
    if distribution == "normal":
        middle, spread = (len(values) - 1) / 2, len(values) / 6
        index = np.clip(np.rint(rng.normal(middle, spread, size=num_clients)), 0, len(values) - 1).astype(np.int64)
        return values[index]
    raise ValueError(f"rank distribution {distribution!r}: use one of {list(DISTRIBUTIONS)}")


def lora_rank_axis(name: str) -> int | None:
    """The axis of a layout tensor that indexes the LoRA rank: lora_A (r, d_in[, kh, kw]) -> 0,
    lora_B (d_out, r[, 1, 1]) -> 1; None for tensors without one (the classifier head)."""
    if ".lora_A." in name:
        return 0
    if ".lora_B." in name:
        return 1
    return None


def rank_mask(layout: list[tuple[str, tuple[int, ...]]], rank: int) -> np.ndarray:
    """(adapter_size,) bool: the entries a rank-`rank` client holds (True), in the flat layout:
    A's first `rank` rows, B's first `rank` columns, everything that is not LoRA."""
    parts = []
    for name, shape in layout:
        keep = np.ones(shape, dtype=bool)
        axis = lora_rank_axis(name)
        if axis is not None:
            index = [slice(None)] * len(shape)
            index[axis] = slice(rank, None)
            keep[tuple(index)] = False
        parts.append(keep.reshape(-1))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)


def sent_entries(layout: list[tuple[str, tuple[int, ...]]], rank: int, shared: np.ndarray | None = None) -> int:
    """How many numbers a rank-`rank` client sends (or receives) of an adapter: the entries within
    its rank, of those the algorithm exchanges (`shared`, (adapter_size,) bool; None: all)."""
    mask = rank_mask(layout, rank)
    return int((mask if shared is None else mask[shared]).sum())


def rank_counts(ranks: np.ndarray) -> dict[int, int]:
    """{rank: clients}, ascending, for start-up lines and reports."""
    values, counts = np.unique(np.asarray(ranks), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True)}


class RankMasks:
    """Each client's rank and rank mask for one adapter layout (worker and server alike)."""

    def __init__(self, layout: list[tuple[str, tuple[int, ...]]], ranks: np.ndarray) -> None:
        self.layout, self.ranks = layout, np.asarray(ranks, dtype=np.int64)
        self._masks: dict[int, np.ndarray] = {}

    @classmethod
    def for_config(cls, config, layout: list[tuple[str, tuple[int, ...]]]) -> RankMasks | None:
        """From the experiment's model.lora.rank_profile (None without one)."""
        profile = config.model.lora.rank_profile
        if profile is None:
            return None
        return cls(list(layout), client_ranks(config))

    def mask(self, client: int) -> np.ndarray:
        rank = int(self.ranks[client])
        if rank not in self._masks:
            self._masks[rank] = rank_mask(self.layout, rank)
        return self._masks[rank]

    def truncate(self, client: int, vector: np.ndarray) -> np.ndarray:
        """`vector` (adapter_size,) with the entries beyond the client's rank zeroed (a copy)."""
        return np.where(self.mask(client), vector, np.float32(0)).astype(np.float32)

    def padding(self, client: int, shared: np.ndarray | None = None) -> int:
        """Entries of what the client exchanges (`shared`, None: the whole adapter) beyond its rank."""
        mask = self.mask(client)
        return int((~(mask if shared is None else mask[shared])).sum())


def client_ranks(config) -> np.ndarray:
    """(data.num_clients,) every client's LoRA rank: the profile's, or model.lora.rank for all."""
    lora, clients = config.model.lora, config.data.num_clients
    profile = lora.rank_profile
    if profile is None:
        return np.full(clients, lora.rank, dtype=np.int64)
    return assign_ranks(profile.distribution, profile.ranks, clients, config.seed, profile.per_client)


def describe_ranks(config, ranks: np.ndarray) -> str:
    """The start-up line's rank part: "LoRA rank 1", or the profile's ranks and counts."""
    lora = config.model.lora
    if lora.rank_profile is None:
        return f"LoRA rank {lora.rank}"
    counts = list(rank_counts(ranks).items())
    parts = [f"{count} client{'s' if count != 1 else ''} at {rank}" if i == 0 else f"{count} at {rank}"
             for i, (rank, count) in enumerate(counts)]
    low, high = min(lora.rank_profile.ranks), lora.rank
    return (f"LoRA ranks {low}-{high} ({lora.rank_profile.distribution}: {', '.join(parts)}; every adapter "
            f"padded to {high})")
