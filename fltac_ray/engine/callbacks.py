"""Side concerns of a run as typed callbacks over a frozen per-round context, so the round loop
(engine/simulation.py) stays the algorithm's steps and nothing else.

A callback overrides any of: on_start(run), on_training_submitted(run, round_index),
on_round_end(run, ctx), on_end(run), on_stop(run, failed). The built-in ones: CsvWriter
(metrics.csv, rounds.csv, clients.csv), Checkpointer, SnapshotWriter (report.adapter_snapshots),
FaultInjection (engine.kill_worker_at), Exporter (final adapters in peft layout); DashboardMetrics lives in
telemetry.py, the trackers (TensorBoard, MLflow, W&B) in tracking.py and the Ray Tune reporter
in tune.py. Pass your own to Simulation(callbacks=[...]).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fltac_ray.algorithms.base import AdapterKey, AdapterSpec
from fltac_ray.engine.evaluation_cache import GROUP as EVALUATED
from fltac_ray.engine.evaluation_cache import EvaluationCache
from fltac_ray.engine.messages import PassReport, RoundOutcome, tasks_by_key

if TYPE_CHECKING:
    from fltac_ray.config import ExperimentConfig
    from fltac_ray.data.federated import FederatedData
    from fltac_ray.engine.backend import Backend
    from fltac_ray.runs.outputs import RunWriter


@dataclass(frozen=True)
class RunInfo:
    """What every callback may read about the run (fixed once the backend has started)."""

    config: ExperimentConfig
    run_dir: Path
    data: FederatedData
    spec: AdapterSpec
    backend: Backend  # engine/ray/backend.RayBackend or engine/local_backend.LocalBackend
    say: Callable[[str], None]
    evaluated: EvaluationCache | None = None  # the driver's evaluation records (checkpointed)

    def process_ids(self) -> dict[str, int]:
        """PIDs of the run's processes (driver, coordinator, workers), for memory probes."""
        return self.backend.process_ids()


@dataclass(frozen=True)
class RoundContext:
    """One finished round. `row` is the rounds.csv row, `task_rows` the metrics.csv rows and
    `client_rows` the clients.csv rows (empty when the round was not evaluated or was rejected);
    `artifacts` is where callbacks leave things for later ones (the checkpoint's path)."""

    round_index: int
    status: str  # "ok" or "rejected"
    row: Mapping[str, Any]
    task_rows: tuple[Mapping[str, Any], ...]
    client_rows: tuple[Mapping[str, Any], ...]
    outcome: RoundOutcome | None
    reports: tuple[PassReport, ...]
    artifacts: dict[str, Any] = field(default_factory=dict)

    def true_tasks(self) -> dict[AdapterKey, str]:
        """(client, slot) -> the "+"-joined true tasks its adapter trained on (metrics only)."""
        return tasks_by_key(self.reports)


class Callback:
    def on_start(self, run: RunInfo) -> None:
        """The workers and the server are up; the first round is about to start."""

    def on_training_submitted(self, run: RunInfo, round_index: int) -> None:
        """Every pass of the round has been handed to a worker."""

    def on_round_end(self, run: RunInfo, ctx: RoundContext) -> None:
        """A round finished (ok or rejected)."""

    def on_end(self, run: RunInfo) -> None:
        """Every round finished; the backend is still up."""

    def on_stop(self, run: RunInfo, failed: bool) -> None:
        """The run is over, finished or failed (`failed`: an exception is on its way up)."""


class CsvWriter(Callback):
    def __init__(self, writer: RunWriter) -> None:
        self.writer = writer

    def on_round_end(self, run: RunInfo, ctx: RoundContext) -> None:
        self.writer.append_metrics(list(ctx.task_rows))
        self.writer.append_client_metrics(list(ctx.client_rows))
        self.writer.append_round(dict(ctx.row))


class Checkpointer(Callback):
    """Every engine.checkpoint_every rounds and after the last: the server side's state (the
    deduplicated client store, the algorithm's server state, the newest global adapters) and
    the driver's evaluation records (engine/evaluation_cache.py)."""

    def __init__(self) -> None:
        self.last_path: Path | None = None

    def on_round_end(self, run: RunInfo, ctx: RoundContext) -> None:
        from fltac_ray.runs.checkpoint import Checkpoint, save_checkpoint

        every = run.config.engine.checkpoint_every
        if not every or (ctx.round_index % every and ctx.round_index != run.config.rounds):
            return
        groups = run.backend.server_state()
        if run.evaluated is not None:  # a resumed run then re-evaluates what this one would
            groups[EVALUATED] = run.evaluated.to_group(list(run.data.tasks))
        # the resolved config, so that a resume can refuse a config.yaml edited since
        checkpoint = Checkpoint(ctx.round_index, groups, {"config_name": run.config.name,
                                                          "config": run.config.resolved()})
        self.last_path = save_checkpoint(run.run_dir / "checkpoints", checkpoint,
                                         keep=run.config.engine.keep_checkpoints)
        ctx.artifacts["checkpoint"] = self.last_path


class SnapshotWriter(Callback):
    """The round's uploads as the server kept them, with their true tasks, for the report."""

    def on_round_end(self, run: RunInfo, ctx: RoundContext) -> None:
        from fltac_ray.runs.snapshots import Snapshot, snapshot_rounds, write_snapshot

        if ctx.outcome is None or ctx.round_index not in snapshot_rounds(
                run.config.rounds, run.config.report.adapter_snapshots):
            return
        kept = run.backend.take_snapshot()
        if kept is None or not len(kept["keys"]):
            return
        task_of, keys = ctx.true_tasks(), kept["keys"]
        write_snapshot(run.run_dir, Snapshot(
            ctx.round_index, kept["adapters"], keys[:, 0], keys[:, 1], kept["labels"],
            [task_of[(int(c), int(s))] for c, s in keys]))


class FaultInjection(Callback):
    """engine.kill_worker_at = [worker, round]: kill that worker right after the round's
    training was submitted, to exercise recovery."""

    def __init__(self, worker: int, round_index: int) -> None:
        self.worker, self.round_index = worker, round_index

    def on_training_submitted(self, run: RunInfo, round_index: int) -> None:
        if round_index == self.round_index:
            run.say(f"  fault injection: killing worker {self.worker} during round {round_index}")
            run.backend.kill_worker(self.worker)


class Exporter(Callback):
    """At the end: the server's whole global adapters in peft layout (runs/export.py), each with the
    tasks of the uploads that received it (from the partition: metrics only). `every_round`:
    after every committed round as well (a Ray Tune trial, which the scheduler may stop at any
    round, always leaves the adapters of its last reported round)."""

    def __init__(self, groups: Mapping[int, list[list[str]]], every_round: bool = False) -> None:
        self.groups = groups  # client -> its adapters' task groups (the algorithm's client_adapters)
        self.every_round = every_round
        self.exported_round = 0

    def on_round_end(self, run: RunInfo, ctx: RoundContext) -> None:
        if self.every_round and ctx.status == "ok":
            self.export(run, quiet=ctx.round_index != run.config.rounds)
            self.exported_round = ctx.round_index

    def on_end(self, run: RunInfo) -> None:
        if self.exported_round != run.config.rounds:
            self.export(run)

    def export(self, run: RunInfo, quiet: bool = False) -> None:
        # adapters/ is written whole and replaces the previous round's: no cluster of an older
        # round stays, and an export killed midway leaves the previous one (runs/files.py)
        from fltac_ray.runs.export import export_adapters

        outcome = run.backend.export_outcome()
        if outcome is None or not len(outcome["labels"]):
            if not quiet:
                run.say("  no adapters exported: no round aggregated any upload")
            return
        truth = ["+".join(self.groups[int(c)][int(s)]) for c, s in outcome["keys"]]
        clusters = []
        for cluster in range(len(outcome["adapters"])):
            members = [t for t, label in zip(truth, outcome["labels"], strict=True) if label == cluster]
            task, hits = Counter(members).most_common(1)[0] if members else ("", 0)  # IFCA: unchosen
            clusters.append({"cluster": cluster, "members": len(members), "majority_task": task,
                             "purity": hits / len(members) if members else float("nan")})
        class_names = {name: bundle.class_names for name, bundle in run.data.tasks.items()}
        assignments = [{"client": int(c), "slot": int(s), "tasks": tasks, "cluster": int(label)}
                       for (c, s), tasks, label in zip(outcome["keys"], truth, outcome["labels"], strict=True)]
        mixture = run.spec.adaptor_index is not None and bool(np.any(run.spec.adaptor_index >= 0))
        adapters, layout = outcome["adapters"], list(run.spec.layout)
        if run.spec.fixed:  # a frozen head: written beside every adapter, so the export loads whole
            fixed = np.concatenate([value.reshape(-1) for value in run.spec.fixed.values()])
            adapters = np.hstack([adapters, np.tile(fixed, (len(adapters), 1))])
            layout += [(name, tuple(value.shape)) for name, value in run.spec.fixed.items()]
        folder = export_adapters(run.run_dir, adapters, layout, clusters,
                                 run.config, class_names, assignments, peft_layout=not mixture)
        if not quiet:
            run.say(f"  final adaptors: {folder}" if mixture else f"  final cluster adapters: {folder} (peft layout)")
