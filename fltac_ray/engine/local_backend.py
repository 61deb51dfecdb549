"""The local backend: the same round loop in one process, without Ray.

One ClientWorker runs every pass one after another and the Server aggregates in the same
process; the loop, the jobs, the seeds and the passes are the Ray backend's, so both write the
same metrics for the same config (tests/test_backends.py). Use it to debug an algorithm with
pdb or a profiler (`engine.backend: local`), and as the benchmark's sequential baseline.
"""

from __future__ import annotations

import os

from fltac_ray.client.gpu_fit import resolve_pass_limits
from fltac_ray.engine.backend import Backend, StartInfo
from fltac_ray.engine.messages import (
    EvalJob,
    EvalRecord,
    PassReport,
    TrainJob,
)


class LocalBackend(Backend):
    name = "local"

    def start(self) -> StartInfo:
        from fltac_ray.client.worker import ClientWorker
        from fltac_ray.server.server import Server

        engine = self.config.engine
        # the threads a Ray worker gets, so both backends compute alike
        self.worker = ClientWorker(0, self.config, self.algorithm_class, self.data.clients, self.data.tasks,
                                   self.data.head_classes, max(1, int(engine.cpus_per_worker)))
        described = self.worker.describe()
        resolve_pass_limits(engine, [described["adapters_fit"]], self.config.train.batch_size)
        self.server = Server(self.config, self.algorithm_class, described["spec"])
        return StartInfo(workers=1, device=described["device"], batched=described["batched"],
                         spec=described["spec"], server_note=self.server.server_note(),
                         resources="in-process, no Ray")

    def initialise(self, count: int) -> None:
        self.server.set_initial(self.worker.initial_adapters(count))

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

    def evaluate(self, round_index: int, chunks: list[list[EvalJob]]) -> list[EvalRecord]:
        state = self.server.state_view()
        return [record for jobs in chunks for record in self.worker.evaluate(jobs, state, *self.pass_limits())]
