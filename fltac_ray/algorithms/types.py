"""The types both halves of an algorithm exchange with the engine: the adapter layout, a
client's job, an upload (the only message going up) and an aggregate (the only one coming down).
Plain dataclasses of numpy arrays."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

AdapterKey = tuple[int, int]  # (client id, adapter slot on that client)


@dataclass(frozen=True)
class AdapterSpec:
    """The flat adapter every job trains: its layout, (name, shape) in flattening order, e.g.
    `encoder...query.lora_A.default.weight` (r, d_in), `...lora_B...` (d_out, r), `head.weight`
    (classes, hidden); FLoRAL adds `adaptor_index`, the mixture adaptor of each entry (-1: shared).
    `fixed`: model tensors every client shares and nobody trains (a frozen head, model.head:
    frozen), which exports write beside each adapter."""

    layout: tuple[tuple[str, tuple[int, ...]], ...]
    adaptor_index: np.ndarray | None = None
    fixed: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(sum(int(np.prod(shape)) for _, shape in self.layout))

    def entries(self, keep) -> np.ndarray:
        """(size,) bool: the entries of every layout tensor whose name satisfies `keep(name)`."""
        return np.concatenate([np.full(int(np.prod(shape)), bool(keep(name)))
                               for name, shape in self.layout]) if self.layout else np.zeros(0, bool)

    def lora_a(self) -> np.ndarray:
        return self.entries(lambda name: "lora_A" in name)

    def lora_b(self) -> np.ndarray:
        return self.entries(lambda name: "lora_B" in name)


@dataclass(frozen=True)
class ClientJob:
    """One (client, slot) of a round, as its client sees it: its own tasks and example count,
    the local steps of each task, and the client state it kept (keep_state; None: none yet)."""

    key: AdapterKey
    tasks: tuple[str, ...]
    num_samples: int
    steps: tuple[int, ...] = ()
    state: np.ndarray | None = None


@dataclass
class Upload:
    """What one (client, slot) sends the server in a round: the only message type going up.

    `vector` is what the algorithm sends of the adapter (all of it, or a part); `extras` are
    further float arrays sent and counted as parameters (FLoRAL's mixture weights); `meta` is
    side information that is no model parameter (IFCA's choice; the oracle's true task)."""

    key: AdapterKey
    vector: np.ndarray  # (p,) float32
    num_samples: int
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    # entries of `vector` that are zero padding beyond the client's LoRA rank (model.lora.rank_profile):
    # held as zeros here, never really sent, so not counted
    padding: int = 0

    @property
    def params(self) -> int:
        return int(self.vector.size - self.padding + sum(np.size(v) for v in self.extras.values()))


@dataclass
class Uploads:
    """One round's accepted uploads, sorted by (client, slot): what `aggregate` reads."""

    vectors: np.ndarray  # (n, p) float32
    num_samples: np.ndarray  # (n,)
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n, ...)
    meta: dict[str, list] = field(default_factory=dict)  # name -> n values
    owned: bool = False  # `vectors` is the server's own scratch copy (clustering may centre it in place)


@dataclass
class Aggregate:
    """The server's answer to one round: the only message type coming down."""

    labels: np.ndarray  # (n,) which row of `adapters` each upload receives back
    adapters: np.ndarray  # (k, p) float32 answers
    weights: np.ndarray  # (k,) total aggregation weight behind each row (0: kept unchanged)
    # the algorithm's own per-round measures, by the names in its `round_metrics` (rounds.csv
    # columns after the engine's; FL-TAC: the K-means backend)
    metrics: dict[str, Any] = field(default_factory=dict)
