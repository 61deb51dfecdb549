"""What crosses between the round loop, the workers and the server: plain dataclasses of numpy
arrays (never torch tensors). One type per concept: a job, an upload (algorithms/base.Upload),
an answer (algorithms/base.Aggregate, summarised here as RoundOutcome), an evaluation record."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np

from fltac_ray.algorithms.base import AdapterKey, Upload


@dataclass(frozen=True)
class TrainJob:
    """One (client, slot) adapter to train in a round: the unit of client work."""

    key: AdapterKey
    tasks: tuple[str, ...]  # trained in this order (FedIT: several)
    num_samples: int  # training examples behind the adapter
    steps: tuple[int, ...]  # local steps per task

    @property
    def cost(self) -> int:
        """Expected work: local steps (each one batch of train.batch_size)."""
        return sum(self.steps)


@dataclass(frozen=True)
class EvalJob:
    """One (client, slot) whose committed adapter is evaluated on the client's test examples."""

    key: AdapterKey
    tasks: tuple[str, ...]
    cost: int  # test examples


@dataclass
class StateView:
    """The committed client state at the start of a round, as every worker reads it: distinct
    adapter rows plus an index (FL-TAC: K rows for all clients), private state per key, and the
    server's broadcast. A key missing from `index` has never been trained."""

    rows: np.ndarray  # (m, d) float32, m = distinct committed adapters
    index: dict[AdapterKey, int]
    private: dict[AdapterKey, np.ndarray]
    broadcast: np.ndarray  # (K, d) the server models
    # the algorithm's client state (keep_state; SCAFFOLD's c_i), deduplicated as the adapters
    state_rows: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    state_index: dict[AdapterKey, int] = field(default_factory=dict)
    # client-level privacy: the round's clip bound (privacy.adaptive_clipping moves it); None: none
    clip_norm: float | None = None
    # the algorithm's base_update (FLoRA's folded stacks; None: the base as loaded) and its digest,
    # which every evaluation digest includes: the same adapter on another base scores differently
    base_update: dict[str, np.ndarray] | None = None
    base_digest: bytes = b""

    def adapter(self, key: AdapterKey) -> np.ndarray | None:
        row = self.index.get(key)
        return None if row is None else self.rows[row]

    def client_state(self, key: AdapterKey) -> np.ndarray | None:
        """What the algorithm's keep_state kept for this key (None: nothing yet)."""
        row = self.state_index.get(key)
        return None if row is None else self.state_rows[row]

    def evaluated_adapter(self, key: AdapterKey) -> np.ndarray:
        """What evaluation tests for a key: its committed adapter, v^0 if never trained."""
        vector = self.adapter(key)
        return self.broadcast[0] if vector is None else vector

    def evaluation_digests(self, keys: list[AdapterKey]) -> dict[AdapterKey, bytes]:
        """{key: digest of everything its evaluation reads from the state (its adapter and private
        state)}: equal digests give equal evaluation records. Each distinct adapter row is hashed
        once (under FL-TAC K rows serve every client)."""
        row_digests: dict[int | None, bytes] = {}
        out = {}
        for key in keys:
            row = self.index.get(key)  # None: v^0
            if row not in row_digests:
                row_digests[row] = content_digest(self.evaluated_adapter(key))
            private = self.private.get(key)
            digest = row_digests[row] if private is None else content_digest(row_digests[row], private)
            out[key] = content_digest(digest, self.base_digest) if self.base_digest else digest
        return out


def content_digest(*parts: np.ndarray | bytes) -> bytes:
    """A 16-byte BLAKE2 digest of the parts' bytes (arrays as their contiguous bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part if isinstance(part, bytes) else np.ascontiguousarray(part).tobytes())
    return digest.digest()


@dataclass
class PassResult:
    """A training pass as the server receives it: the uploads (what the clients send) and, kept
    apart, each job's trained adapter and private state, which stay the clients' (the server
    side only stores them: the simulation keeps client state with the server)."""

    uploads: list[Upload]
    keys: list[AdapterKey]
    trained: np.ndarray  # (n, d) float32, rows in the order of keys
    private: dict[AdapterKey, np.ndarray] = field(default_factory=dict)
    client_state: dict[AdapterKey, np.ndarray] = field(default_factory=dict)  # keep_state's

    # Pickled (from a worker to the coordinator, maybe across nodes): an upload whose vector is
    # a contiguous piece of its job's trained row (FL-TAC's whole adapter, a view) travels as
    # (row, start, stop) and is a view of `trained` again on arrival, instead of a second copy
    # of the same floats (which doubled the bytes moved per round).
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        row_of = {tuple(key): row for row, key in enumerate(self.keys)}
        uploads, pieces = [], []
        for upload in self.uploads:
            piece = _row_piece(self.trained, row_of.get(tuple(upload.key)), upload.vector)
            pieces.append(piece)
            uploads.append(upload if piece is None else replace(upload, vector=np.empty(0, np.float32)))
        state["uploads"], state["_pieces"] = uploads, pieces
        return state

    def __setstate__(self, state: dict) -> None:
        pieces = state.pop("_pieces", None) or []
        self.__dict__.update(state)
        for index, piece in enumerate(pieces):
            if piece is not None:
                row, start, stop = piece
                self.uploads[index] = replace(self.uploads[index], vector=self.trained[row, start:stop])


def _row_piece(trained: np.ndarray, row: int | None, vector: np.ndarray) -> tuple[int, int, int] | None:
    """(row, start, stop) when `vector` is trained[row, start:stop] in memory, else None."""
    if row is None or vector.ndim != 1 or vector.dtype != trained.dtype or trained.ndim != 2:
        return None
    line = trained[row]
    if vector.size > 1 and vector.strides != line.strides:
        return None
    offset, itemsize = vector.ctypes.data - line.ctypes.data, trained.itemsize
    start = offset // itemsize
    if offset < 0 or offset % itemsize or start + vector.size > line.size:
        return None
    return row, start, start + vector.size


@dataclass
class PassReport:
    """Private to the round loop (metrics only): which tasks each trained adapter saw."""

    keys: list[AdapterKey]
    tasks: list[str]  # "+"-joined task names of each adapter
    losses: list[float]
    seconds: float  # the whole train() call
    step_seconds: float = 0.0  # of which local training steps (the rest: IFCA probes, packing)
    worker: int = -1
    skipped_steps: int = 0  # float16: adapter steps skipped because their gradients overflowed


def tasks_by_key(reports: list[PassReport] | tuple[PassReport, ...]) -> dict[AdapterKey, str]:
    """(client, slot) -> the "+"-joined true tasks its adapter trained on (metrics only)."""
    return {key: task for rep in reports for key, task in zip(rep.keys, rep.tasks, strict=True)}


@dataclass
class RoundOutcome:
    """The server's summary of a closed round, for the round loop's tables."""

    keys: list[AdapterKey]  # accepted uploads, in the order of labels
    labels: np.ndarray  # (n,) answer row each accepted upload received
    clusters: int  # answer rows
    recovers_tasks: bool  # labels try to recover tasks: score them (the algorithm's recovers_tasks)
    metrics: dict  # the algorithm's own per-round measures (Aggregate.metrics)
    rejected: list[tuple[AdapterKey, str]]
    params_up: int  # what the clients really sent (every upload received)
    params_down: int  # what they really received
    uploads: int  # uploads received
    seconds: float = 0.0
    screened: list[tuple[AdapterKey, str]] = field(default_factory=list)  # federation.screening
    kept_apart: int = 0  # uploads of a group apart from the rest that screening kept (screening.py)
    # mean relative error of averaging LoRA factors instead of their products (lora_products.py)
    lora_product_error: float = float("nan")
    screening_note: str = ""  # says so, when kept_apart
    audit: dict[str, float] = field(default_factory=dict)  # attacks.honest_damage, when measured
    clip_norm: float = float("nan")  # client-level privacy: the bound the round's uploads were clipped to


@dataclass
class EvalRecord:  # one (client, task): that client's current adapter on its own test examples
    client_id: int
    task: str
    correct: int  # right predictions: examples (classification) or response tokens (generation)
    loss_sum: float  # summed over the same predictions
    count: int  # test examples
    predictions: int = 0  # denominator of correct and loss_sum; 0 means `count`
    rouge_sum: float = float("nan")  # generation: summed ROUGE-L F of greedy answers
    judge_sum: float = float("nan")  # generation with train.judge: summed judge scores

    @property
    def scored(self) -> int:
        return self.predictions or self.count
