"""Coordinator: the server. Validates uploads, runs the algorithm's aggregation, keeps the state.

Wrapped with `ray.remote` by the simulation; holds no task labels (uploads carry client ids and
adapter slots only).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from fltac_ray.config import ExperimentConfig
from fltac_ray.engine.messages import AggregationOutcome, UploadBatch
from fltac_ray.uploads import upload_problem

log = logging.getLogger(__name__)


class Coordinator:
    def __init__(self, config: dict, adapter_size: int) -> None:
        from fltac_ray.algorithms import create_algorithm
        from fltac_ray.clustering import resolve_backend

        self.config = ExperimentConfig.model_validate(config)
        self.adapter_size = adapter_size
        # Resolved here, where the coordinator runs: that is where a GPU must be visible.
        self.backend = resolve_backend(self.config.federation.clustering_backend)
        self.algorithm = create_algorithm(self.config, self.backend)
        self.latest: AggregationOutcome | None = None

    def clustering_backend(self) -> str:
        return self.backend

    def aggregate(self, round_index: int, *batches: UploadBatch) -> AggregationOutcome:
        """Algorithm 3 over every upload of the round."""
        started = time.perf_counter()
        keys, vectors, samples, rejected = [], [], [], []
        for batch in batches:
            for key, vector, num_samples in zip(batch.keys, batch.vectors, batch.num_samples, strict=True):
                problem = upload_problem(vector, int(num_samples), self.adapter_size)
                if problem is not None:
                    log.warning("round %d: rejected upload of client %d slot %d: %s",
                                round_index, key[0], key[1], problem)
                    rejected.append((key, problem))
                    continue
                keys.append(key)
                vectors.append(vector)
                samples.append(num_samples)
        # Sorted by (client, slot): K-means and the float sums then see the same order whatever
        # the number of workers or their finishing order, so runs are reproducible.
        order = sorted(range(len(keys)), key=keys.__getitem__)
        keys = [keys[i] for i in order]
        vectors = [vectors[i] for i in order]
        samples = [samples[i] for i in order]
        if not keys:
            outcome = AggregationOutcome([], np.zeros(0, np.int64),
                                         np.zeros((0, self.adapter_size), np.float32), np.zeros(0),
                                         rejected, self.backend)
        else:
            result = self.algorithm.aggregate(np.stack(vectors), np.asarray(samples), round_index)
            outcome = AggregationOutcome(keys, result.labels, result.adapters, result.weights,
                                         rejected, self.backend)
        outcome.seconds = time.perf_counter() - started
        self.latest = outcome
        return outcome
