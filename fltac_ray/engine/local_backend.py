"""A plain sequential loop in one process, no Ray: the reference implementations' approach.

One ClientWorker hosts every client and trains their adapters one after another (one adapter per
forward/backward, torch's default threads); the Coordinator aggregates in the same process. The
local steps, data, seeds, client sampling and aggregation are the engine's own, so per-round
results match the Ray engine run with `engine.batched_training: false` (tests/test_engine.py).

Used as the baseline of `benchmarks/run.py` and for debugging an algorithm without Ray:

    loop = SequentialLoop(load_config("experiments/offline_text.yaml"))
    for round_index in range(1, 4):
        print(loop.run_round(round_index))
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from fltac_ray.config import ExperimentConfig
from fltac_ray.engine.client_worker import ClientWorker
from fltac_ray.engine.coordinator import Coordinator


@dataclass
class LoopRound:
    round: int
    clients: int
    adapters: int
    train_loss: float
    step_seconds: float  # inside local training steps
    train_seconds: float  # the whole client phase (steps plus IFCA probes, packing)
    aggregate_seconds: float
    seconds: float  # the round, evaluation excluded


class SequentialLoop:
    def __init__(self, config: ExperimentConfig, threads: int | None = None,
                 batched: bool = False) -> None:
        import torch

        from fltac_ray.algorithms import create_algorithm
        from fltac_ray.engine.simulation import preflight, prepare_data

        preflight(config)
        raw = config.resolved()
        raw["engine"]["batched_training"] = batched
        self.config = ExperimentConfig.model_validate(raw)
        self.algorithm = create_algorithm(self.config)
        data, self.active = prepare_data(self.config, self.algorithm)
        self.data = data
        self.worker = ClientWorker(0, raw, [data.clients[c] for c in self.active],
                                   data.tasks, data.head_classes, threads or torch.get_num_threads())
        # the reference loop keeps glibc's default behaviour: no heap trimming (engine/memory.py)
        self.worker.trim_heap = lambda: False
        described = self.worker.describe()
        adaptor_index = self.worker.adaptor_index() if self.algorithm.uses_mixture else None
        self.coordinator = Coordinator(raw, described["adapter_size"], adaptor_index)
        initial = self.worker.initial_adapters(self.algorithm.num_global_adapters())
        self.worker.set_initial_adapters(initial)
        self.coordinator.set_initial_adapters(initial)

    def run_round(self, round_index: int) -> LoopRound:
        """Algorithm 1's round: sampled clients train one by one, the server aggregates, every
        client commits its answer."""
        from fltac_ray.engine.simulation import sample_clients

        started = time.perf_counter()
        sampled = sample_clients(self.config.seed, round_index, self.active,
                                 self.config.federation.client_fraction)
        upload, report = self.worker.train(round_index, sampled)
        trained = time.perf_counter()
        outcome = None
        if self.algorithm.communicates:
            outcome = self.coordinator.aggregate(round_index, report.keys, upload)
        aggregated = time.perf_counter()
        self.worker.download(outcome, evaluate=False)
        return LoopRound(round_index, len(sampled), len(report.keys),
                         float(np.mean(report.losses)) if report.losses else float("nan"),
                         report.step_seconds, trained - started, aggregated - trained,
                         time.perf_counter() - started)

    def evaluate(self) -> dict[str, float]:
        """Accuracy per task of every client's current adapter on its own test examples."""
        from fltac_ray.engine.simulation import Simulation

        _, accuracy = Simulation._task_rows(0, self.worker.evaluate(), self.data)
        return accuracy
