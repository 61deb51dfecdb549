"""The local backend: the same round loop in one process, without Ray.

One ClientWorker runs every pass one after another and the Server aggregates in the same
process; the loop, the jobs, the seeds and the passes are the Ray backend's, so both write the
same metrics for the same config (tests/test_backends.py). Use it to debug an algorithm with
pdb or a profiler (`engine.backend: local`), and as the benchmark's sequential baseline.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from fltac_ray.client.gpu_fit import resolve_pass_limits
from fltac_ray.engine.backend import Backend
from fltac_ray.engine.messages import (
    EvalJob,
    EvalRecord,
    PassReport,
    RoundOutcome,
    TrainJob,
)


class LocalBackend(Backend):
    name = "local"

    def start(self) -> dict[str, Any]:
        from fltac_ray.client.worker import ClientWorker
        from fltac_ray.server.server import Server

        engine = self.config.engine
        # the threads a Ray worker gets, so both backends compute alike
        self.worker = ClientWorker(0, self.config, self.algorithm_class, self.data.clients, self.data.tasks,
                                   self.data.head_classes, max(1, int(engine.cpus_per_worker)))
        described = self.worker.describe()
        resolve_pass_limits(engine, [described["adapters_fit"]], self.config.train.batch_size)
        self.server = Server(self.config, self.algorithm_class, described["spec"])
        return {"workers": 1, "device": described["device"], "batched": described["batched"],
                "spec": described["spec"], "kmeans_backend": self.server.clustering_backend(),
                "resources": "in-process, no Ray"}

    def initialise(self, count: int) -> None:
        self.server.set_initial(self.worker.initial_adapters(count))

    def server_state(self) -> dict[str, dict[str, np.ndarray]]:
        return self.server.state()

    def load_server_state(self, groups: dict[str, dict[str, np.ndarray]]) -> None:
        self.server.load_state(groups)

    def take_snapshot(self) -> dict | None:
        return self.server.take_snapshot()

    def export_outcome(self) -> dict | None:
        return self.server.export_outcome()

    def process_ids(self) -> dict[str, int]:
        return {"driver": os.getpid()}

    def kill_worker(self, index: int) -> None:
        raise RuntimeError("engine.kill_worker_at needs engine.backend: ray")  # validation says so first

    def shutdown(self) -> None:
        return None

    def train(self, round_index: int, passes: list[list[TrainJob]], after_submit=None
              ) -> tuple[list[PassReport], list[TrainJob]]:
        state = self.server.state_view()
        reports = [self.server.receive(round_index, unit, *self.worker.train(round_index, jobs, state))
                   for unit, jobs in enumerate(passes)]
        return reports, []

    def close_round(self, round_index: int, expected: list, clients: int, truth: dict | None = None) -> RoundOutcome:
        return self.server.close_round(round_index, expected, clients, truth)

    def evaluation_digests(self, keys: list) -> dict:
        return self.server.evaluation_digests(keys)

    def evaluate(self, round_index: int, chunks: list[list[EvalJob]]) -> list[EvalRecord]:
        state = self.server.state_view()
        return [record for jobs in chunks for record in self.worker.evaluate(jobs, state, *self.pass_limits())]
