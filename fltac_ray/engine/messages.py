"""What crosses actor boundaries: plain dataclasses of numpy arrays (never torch tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

AdapterKey = tuple[int, int]  # (client id, adapter slot on that client)


@dataclass
class UploadBatch:
    """One worker's uploads for a round: what the server sees (no task names)."""

    keys: list[AdapterKey]
    vectors: np.ndarray  # (n, adapter_size) float32
    num_samples: np.ndarray  # (n,) int64 training examples behind each adapter
    task_labels: list[str] | None = None  # true tasks, sent only for the oracle baseline
    choices: np.ndarray | None = None  # (n,) index of the global adapter each started from (IFCA)
    mixture: np.ndarray | None = None  # (n, C) router mixture weights (FLoRAL); the router stays


@dataclass
class TrainReport:
    """Private to the simulation (metrics only): which tasks each uploaded adapter trained on."""

    keys: list[AdapterKey]
    tasks: list[str]  # "+"-joined task names of each adapter
    losses: list[float]
    seconds: float  # the whole train() call
    step_seconds: float = 0.0  # of which local training steps (the rest: IFCA probes, packing)


@dataclass
class AggregationOutcome:
    keys: list[AdapterKey]  # accepted uploads, in the order of `labels`
    labels: np.ndarray  # (n,) row of `adapters` each accepted upload receives
    adapters: np.ndarray  # (k, adapter_size) float32 adapters the server holds
    weights: np.ndarray  # (k,)
    rejected: list[tuple[AdapterKey, str]] = field(default_factory=list)
    backend: str = "sklearn"
    seconds: float = 0.0

    def assignment(self) -> dict[AdapterKey, int]:
        return {key: int(label) for key, label in zip(self.keys, self.labels, strict=True)}


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
