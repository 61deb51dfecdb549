"""Coordinator: the server. Validates uploads, runs the algorithm's aggregation, keeps the state.

Wrapped with `ray.remote` by the simulation; holds no task labels (uploads carry client ids and
adapter slots only).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from fltac_ray.algorithms.base import Uploads
from fltac_ray.config import ExperimentConfig
from fltac_ray.engine.memory import HeapTrimmer
from fltac_ray.engine.messages import AdapterKey, AggregationOutcome, UploadBatch
from fltac_ray.snapshots import sample_rows, snapshot_rounds
from fltac_ray.uploads import upload_problem

log = logging.getLogger(__name__)


class Coordinator:
    def __init__(self, config: dict, adapter_size: int, adaptor_index=None) -> None:
        from fltac_ray.algorithms import create_algorithm
        from fltac_ray.clustering import resolve_backend

        self.config = ExperimentConfig.model_validate(config)
        self.adapter_size = adapter_size
        # Resolved here, where the coordinator runs: that is where a GPU must be visible.
        self.backend = resolve_backend(self.config.federation.clustering_backend)
        self.algorithm = create_algorithm(self.config, self.backend, adaptor_index)
        self.trim_heap = HeapTrimmer()
        report = self.config.report
        self.snapshot_rounds = set(snapshot_rounds(self.config.rounds, report.adapter_snapshots))
        self.snapshot: dict | None = None  # the newest round's kept uploads, until taken

    def clustering_backend(self) -> str:
        return self.backend

    def pid(self) -> int:
        import os

        return os.getpid()

    def set_initial_adapters(self, adapters: np.ndarray) -> None:
        self.algorithm.set_globals(adapters)

    def state(self) -> dict[str, np.ndarray]:
        return self.algorithm.state()

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.algorithm.load_state(state)

    def take_snapshot(self) -> dict | None:
        """The uploads kept at a snapshot round (report.adapter_snapshots), handed over once."""
        snapshot, self.snapshot = self.snapshot, None
        return snapshot

    def aggregate(self, round_index: int, expected: list[AdapterKey], *batches: UploadBatch) -> AggregationOutcome:
        """Algorithm 3 over every upload of the round. `expected`: the (client, slot) keys the
        round's completed clients own; anything else, or a key seen twice, is rejected, so each
        (round, client, task) update is aggregated at most once."""
        started = time.perf_counter()
        expected_keys = {tuple(key) for key in expected}
        seen: set[AdapterKey] = set()
        accepted, rejected = [], []  # accepted: (key, vector, samples, task label, choice, mixture)
        for batch in batches:
            for i, key in enumerate(batch.keys):
                vector, num_samples = batch.vectors[i], int(batch.num_samples[i])
                if key not in expected_keys:
                    problem = "unexpected (client, slot) for this round"
                elif key in seen:
                    problem = "duplicate upload in this round"
                else:
                    problem = upload_problem(vector, num_samples, self.adapter_size)
                seen.add(key)
                if problem is not None:
                    log.warning("round %d: rejected upload of client %d slot %d: %s",
                                round_index, key[0], key[1], problem)
                    rejected.append((key, problem))
                    continue
                label = batch.task_labels[i] if batch.task_labels is not None else None
                choice = int(batch.choices[i]) if batch.choices is not None else None
                mixture = batch.mixture[i] if batch.mixture is not None else None
                accepted.append((key, vector, num_samples, label, choice, mixture))
        # Sorted by (client, slot): K-means and the float sums then see the same order whatever
        # the number of workers or their finishing order, so runs are reproducible.
        accepted.sort(key=lambda item: item[0])
        keys = [item[0] for item in accepted]
        if not accepted:
            outcome = AggregationOutcome([], np.zeros(0, np.int64),
                                         np.zeros((0, self.adapter_size), np.float32), np.zeros(0),
                                         rejected, self.backend)
        else:
            uploads = Uploads(
                vectors=np.stack([item[1] for item in accepted]),
                num_samples=np.asarray([item[2] for item in accepted]),
                task_labels=[item[3] for item in accepted] if self.algorithm.needs_task_labels else None,
                choices=(np.asarray([item[4] for item in accepted])
                         if self.algorithm.client_selects_global else None),
                mixture=(np.stack([item[5] for item in accepted])
                         if self.algorithm.uses_mixture else None),
                owned=True,  # np.stack above made it
            )
            kept = None
            if round_index in self.snapshot_rounds:  # copied first: aggregation may reuse the matrix
                kept = sample_rows(len(keys), self.config.report.snapshot_max_adapters,
                                   self.config.seed, round_index)
                kept_vectors = uploads.vectors[kept].copy()
            result = self.algorithm.aggregate(uploads, round_index)
            del uploads
            if kept is not None:
                self.snapshot = {"round": round_index, "adapters": kept_vectors,
                                 "keys": np.asarray(keys, dtype=np.int64)[kept].reshape(-1, 2),
                                 "labels": np.asarray(result.labels, dtype=np.int64)[kept]}
            outcome = AggregationOutcome(keys, result.labels, result.adapters, result.weights,
                                         rejected, self.backend)
        del accepted
        self.trim_heap()  # the round's stacked uploads (engine/memory.py)
        outcome.seconds = time.perf_counter() - started
        return outcome
