"""The round loop (Algorithm 1), written once for every algorithm and both backends.

One round, in the driver:
  sample clients -> cut their (client, slot) jobs into passes (engine/scheduling.py) -> the
  backend runs the passes on its workers from the committed state (Ray: spread over the live
  workers, LPT; local: one after another) -> the server checks and aggregates the uploads and
  commits every client's new state (server/server.py) -> evaluation jobs run the same way ->
  callbacks write the tables, the checkpoint, the snapshots, the dashboard metrics.

Workers are stateless and each pass is seeded per (round, client, slot, task), so a lost
worker's passes are retried elsewhere from the same committed state with identical results
(engine.max_retries times; after that its clients count as failed for the round). A round in
which fewer than federation.min_completion_rate of the sampled clients delivered is rejected:
nothing is committed, so the state stays as it was.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fltac_ray.algorithms import FederatedAlgorithm, create_algorithm
from fltac_ray.config import ExperimentConfig, load_config, save_config
from fltac_ray.data.federated import FederatedData
from fltac_ray.engine.backend import Backend
from fltac_ray.engine.callbacks import (
    Callback,
    Checkpointer,
    CsvWriter,
    Exporter,
    FaultInjection,
    RoundContext,
    RunInfo,
    SnapshotWriter,
)
from fltac_ray.engine.evaluation import eval_jobs, evaluate_changed
from fltac_ray.engine.evaluation_cache import GROUP, EvaluationCache
from fltac_ray.engine.messages import (
    EvalRecord,
    TrainJob,
    tasks_by_key,
)
from fltac_ray.engine.ray.shared_data import SharedData
from fltac_ray.engine.round_tables import client_rows, round_row, task_rows
from fltac_ray.engine.run_setup import (
    clients_per_round,
    make_backend,
    plan_privacy,
    preflight,
    prepare_data,
    sample_clients,
)
from fltac_ray.engine.scheduling import plan_passes
from fltac_ray.errors import ConfigError, ConfigIssue, RunFolderError
from fltac_ray.models.ranks import client_ranks, describe_ranks
from fltac_ray.privacy.ledger import PrivacyLedger
from fltac_ray.progress import Progress, format_run_summary
from fltac_ray.runs.checkpoint import Checkpoint, latest_checkpoint
from fltac_ray.runs.data_files import check_and_pin, load_data_files, record_data_files
from fltac_ray.runs.decisions import RunDecisions
from fltac_ray.runs.files import foreign_entries
from fltac_ray.runs.outputs import (
    RunWriter,
    discard_unused_run_dir,
    hold_run_folder,
    make_run_dir,
)


@dataclass
class RunResult:
    run_dir: Path
    metrics: pd.DataFrame  # one row per (round, task)
    rounds: pd.DataFrame  # one row per round
    wall_seconds: float


@dataclass
class RunState:
    """What a run settles in its set-up and the round loop reads every round."""

    #: client -> its adapters' task groups: slot i of a client trains on groups[client][i]
    groups: dict[int, list[list[str]]]
    #: (client, slot) -> local steps of each of its tasks (FedIT: its budget option)
    budgets: dict[tuple[int, int], tuple[int, ...]]
    #: each key's evaluation records, reused while its committed state is unchanged
    evaluated: EvaluationCache
    #: the built-in callbacks, then the caller's
    callbacks: list[Callback]
    #: a sweep's data in the object store when the workers read it from there
    data_source: SharedData | None
    #: the workers train many adapters per pass (set when the backend has started)
    batched: bool = False


class Simulation:
    """One run on the configured backend. `callbacks`: engine.callbacks.Callback objects (Ray
    Tune reporting, memory probes, ...), called in the driver after the built-in ones."""

    def __init__(
        self,
        config: ExperimentConfig,
        out: str | None = None,
        progress: Progress | None = None,
        callbacks: list[Callback] | tuple = (),
        resume_dir: Path | None = None,
        shared_data: SharedData | None = None,
        export_every_round: bool = False,
    ):
        # as config.yaml records it: a copy, so a caller that edits its config object after
        # handing it over (a sweep reusing one for the next trial) cannot change what is saved
        self.given = config.model_copy(deep=True)
        # the run's own copy, where its backend settles engine.min_passes and the other
        # decisions of runs/decisions.py (recorded in decisions.json, not in config.yaml)
        self.config = config.model_copy(deep=True)
        self.out = out
        self.progress = progress or Progress()
        self.callbacks = list(callbacks)
        self.resume_dir = resume_dir
        self.shared_data = shared_data  # a sweep's data in the object store (engine/ray/shared_data.py)
        self.export_every_round = export_every_round  # adapters/ always holds the newest round's
        self.lock = None  # the run folder's lock (outputs.hold_run_folder), held until the run ends
        self.state: RunState | None = None  # set up by run()
        self.backend: Backend | None = None  # started by run()
        self.run_info: RunInfo | None = None  # what callbacks see, once the backend has started
        self.privacy: PrivacyLedger | None = None  # privacy: the plan and epsilon per round (privacy/)

    @classmethod
    def resume(cls, run_dir: str | Path, progress: Progress | None = None, callbacks=(),
               **options) -> Simulation:
        """Continue an interrupted run from its newest valid checkpoint."""
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise RunFolderError(run_dir, "is not a run directory (no config.yaml); give the folder a run wrote")
        if foreign := foreign_entries(run_dir):  # a link or a pipe where the run wrote a file
            raise RunFolderError(run_dir, "holds what no run writes: " + "; ".join(
                f"{path.name} {problem}" for path, problem in foreign) + " (a run folder is resumed only "
                "from its own regular files)")
        return cls(load_config(run_dir / "config.yaml"), progress=progress, callbacks=callbacks,
                   resume_dir=run_dir, **options)

    # --- driver part ----------------------------------------------------------------------------
    def run(self) -> RunResult:
        try:
            return self._run_whole()
        finally:
            if self.lock is not None:
                self.lock.close()  # the run folder is free for a resume

    def _run_whole(self) -> RunResult:
        from fltac_ray.engine.ray.session import ray_session

        started = time.perf_counter()
        config, say = self.config, self.progress.say
        preflight(config)
        self.client_ranks = client_ranks(config)
        say(f"[fltac-ray] {config.name}: {config.algorithm}, {config.num_tasks} tasks, "
            f"{config.data.num_clients} clients, {config.rounds} rounds, model {config.model.name} "
            f"({describe_ranks(config, self.client_ranks)})")
        import torch

        from fltac_ray.client.precision import emulated_bfloat16_note

        on_cpu = config.engine.device == "cpu" or (config.engine.device == "auto" and config.engine.backend == "local"
                                                    and not torch.cuda.is_available())
        if (note := emulated_bfloat16_note(config.model.dtype, on_cpu)) is not None:
            say(f"  warning: {note}")
        algorithm = create_algorithm(config)  # driver-side: job grouping and data only
        # The run folder first: an unusable --out is refused before minutes of data preparation;
        # a folder made here is removed again if the data cannot be prepared.
        if self.resume_dir is not None:
            run_dir = self.resume_dir
            self.lock = hold_run_folder(run_dir)
            decided = RunDecisions.load(run_dir)
            if decided is not None:  # the passes are cut as they were before the interruption
                decided.apply(config.engine)
        else:
            made = self.out is None or not Path(self.out).exists()
            run_dir = make_run_dir(config.output_dir, config.name, self.out)
            self.lock = hold_run_folder(run_dir)
        shared = self.shared_data if self.shared_data is not None and self.shared_data.matches(config) else None
        built = shared.get() if shared is not None else None
        try:
            data, active = self._prepare_data(algorithm, run_dir, built)
        except BaseException:
            if self.resume_dir is None:
                self.lock.close()
                self.lock = None
                discard_unused_run_dir(run_dir, made)
            raise
        self._plan_privacy(algorithm, data, active)  # before the checkpoint's config is compared
        # the workers read the shared copy when the algorithm kept the data as built
        data_source = shared if built is not None and data is built else None
        if len(data.clients) == 1 and len(active) == 1 and config.data.num_clients > 1:
            say("  all clients' data pooled into one client; per-round steps per task "
                f"{data.clients[0].steps}")
        elif len(active) < len(data.clients):
            say(f"  {len(data.clients) - len(active)} of {len(data.clients)} clients hold no data after "
                f"the split (data.min_share = {config.data.resolved_min_share:g}, data.dirichlet_alpha = "
                f"{config.data.dirichlet_alpha:g}): they are never sampled")
        checkpoint = None
        if self.resume_dir is not None:
            checkpoint = self._resume_point(run_dir)
            if checkpoint is None:
                writer = RunWriter(run_dir, config, extra_columns=config.algorithm_class.round_metrics)
                writer.write_partition(self._partition_rows(data))
            else:
                writer = RunWriter(run_dir, config, resume_round=checkpoint.round,
                                   extra_columns=config.algorithm_class.round_metrics)
                say(f"  resuming {run_dir} after round {checkpoint.round} ({checkpoint.path.name})")
        else:
            writer = RunWriter(run_dir, config, extra_columns=config.algorithm_class.round_metrics)
            writer.write_partition(self._partition_rows(data))
        for name, bundle in data.tasks.items():
            holders = sum(1 for c in data.clients if name in c.tasks)
            kind = ("instruction task (generation)" if bundle.is_generation
                    else f"{bundle.num_classes} classes")
            baseline = "" if bundle.is_generation else f" (majority-class rate {bundle.majority_rate:.3f})"
            say(f"  task {name}: {kind}, {len(bundle.train)} train / {len(bundle.test)} test, "
                f"held by {holders} clients{baseline}")
        say(f"  run directory: {run_dir}")
        callbacks: list[Callback] = [CsvWriter(writer), Checkpointer(), SnapshotWriter()]
        if config.engine.kill_worker_at is not None:
            callbacks.append(FaultInjection(*config.engine.kill_worker_at))
        if config.engine.metrics and config.engine.backend == "ray":
            from fltac_ray.engine.ray.telemetry import DashboardMetrics

            callbacks.append(DashboardMetrics(config.name))
        groups = {c.client_id: algorithm.client_adapters(list(c.tasks)) for c in data.clients}
        budgets = {(client, slot): algorithm.task_steps(list(group), config.train.local_steps)
                   for client, client_groups in groups.items() for slot, group in enumerate(client_groups)}
        evaluated = EvaluationCache()  # in every checkpoint
        if checkpoint is not None and GROUP in checkpoint.groups:
            evaluated = EvaluationCache.from_group(checkpoint.groups.pop(GROUP), list(data.tasks))
        callbacks.append(Exporter(groups, every_round=self.export_every_round))
        if config.tracking.backends:  # after the exporter: they log its adapters
            from fltac_ray.tracking import make_trackers

            callbacks.extend(make_trackers(config))
        self.state = RunState(groups, budgets, evaluated, callbacks + self.callbacks, data_source)
        with ray_session(config.engine, say) if config.engine.backend == "ray" else contextlib.nullcontext():
            self._run(algorithm, data, active, writer, checkpoint, run_dir)
        wall = time.perf_counter() - started
        metrics = pd.read_csv(run_dir / "metrics.csv")
        rounds = pd.read_csv(run_dir / "rounds.csv")
        say("\n" + format_run_summary(metrics, rounds))
        say(f"[fltac-ray] done in {wall:.1f}s; results in {run_dir}")
        return RunResult(run_dir, metrics, rounds, wall)

    def _partition_rows(self, data: FederatedData) -> list[dict]:
        """partition.csv: each (client, task)'s examples and the client's LoRA rank."""
        return [{**row, "rank": int(self.client_ranks[row["client"]])} for row in data.partition_rows()]

    def _plan_privacy(self, algorithm: FederatedAlgorithm, data: FederatedData, active: list[int]) -> None:
        """privacy: settle the noise (a calibrated multiplier goes into the run's config, and so
        into the checkpoints a resume compares with) and say what the budget affords."""
        config, say = self.config, self.progress.say
        self.privacy = plan_privacy(config, algorithm, data, active)
        if self.privacy is None:
            return
        say(f"  {self.privacy.describe()}")
        if self.privacy.last_round < config.rounds:
            say(f"  privacy budget: epsilon {self.privacy.target_epsilon:g} affords rounds 1-"
                f"{self.privacy.last_round} of {config.rounds}; the run stops after round {self.privacy.last_round}")

    def _prepare_data(self, algorithm: FederatedAlgorithm, run_dir: Path, built: FederatedData | None
                      ) -> tuple[FederatedData, list[int]]:
        """The run's data, its local data files recorded in data_files.json. A resume reads the
        files the run was built from (the recorded absolute paths, whatever the working directory;
        a changed one is refused: runs/data_files.py) through its own copy of the settings, so the
        checkpoint's config is still compared with the settings as given."""
        source = self.config
        if self.resume_dir is not None:
            source = self.config.model_copy(deep=True)
            check_and_pin(run_dir, source)
        prepared = prepare_data(source, algorithm, built)
        if self.resume_dir is None or load_data_files(run_dir) is None:
            record_data_files(run_dir, source)
        return prepared

    def _resume_point(self, run_dir: Path) -> Checkpoint | None:
        """The checkpoint a resume continues from, its config checked against config.yaml; None:
        the run stopped before its first round was recorded, so it starts over (the state before
        round 1 is fixed by the config and seed)."""
        from fltac_ray.config import as_resolved_now, changes_results, config_changes
        from fltac_ray.runs.checkpoint import CheckpointError

        say = self.progress.say
        try:
            checkpoint = latest_checkpoint(run_dir / "checkpoints", warn=say)
        except CheckpointError as exc:
            rounds = run_dir / "rounds.csv"
            if rounds.is_file() and len(pd.read_csv(rounds)):
                raise  # recorded rounds without a usable checkpoint: the user decides
            say(f"  {run_dir} stopped before its first round was recorded ({exc}); starting it over "
                "from round 1")
            return None
        stored = checkpoint.meta.get("config")
        if stored is not None:
            changes = config_changes(as_resolved_now(stored), self.config.resolved())
            refused = {field: change for field, change in changes.items() if changes_results(field)}
            if refused:
                raise ConfigError([ConfigIssue(field, new, f"was {old!r} when round {checkpoint.round} was "
                                               "checkpointed; a resume continues the same run (restore it, or "
                                               "start a new run)")
                                   for field, (old, new) in refused.items()], str(run_dir / "config.yaml"))
            if changes:
                say("  resuming with changed settings that do not alter results: "
                    + ", ".join(f"{field} {old!r} -> {new!r}" for field, (old, new) in changes.items()))
        return checkpoint

    def _run(self, algorithm: FederatedAlgorithm, data: FederatedData, active: list[int],
             writer: RunWriter, checkpoint: Checkpoint | None, run_dir: Path) -> None:
        config, say = self.config, self.progress.say
        state = self.state
        backend = make_backend(config, config.algorithm_class, data, active, say, state.data_source)
        self.backend = backend
        failed = True
        try:
            save_config(self.given, run_dir / "config.yaml")
            info = backend.start()  # resolves engine.gpus_per_worker and engine.max_batched_adapters
            if config.engine.min_passes is None:
                config.engine.min_passes = info.workers
                say(f"  each round cut into at least {info.workers} passes (engine.min_passes: the "
                    "worker count at start; set it for results that do not depend on the pool)")
            # A resumed or recovered run cuts its rounds the same way.
            RunDecisions.of(config.engine).save(run_dir)
            if info.placement:  # Ray: each worker's node and GPUs, as Ray accounted them
                (run_dir / "placement.json").write_text(json.dumps(info.placement, indent=1))
            state.batched = info.batched
            note = f"; {info.server_note}" if info.server_note else ""
            fraction = config.federation.client_fraction
            sampled = f" ({clients_per_round(len(active), fraction)} sampled per round)" if fraction < 1 else ""
            say(f"  backend {backend.name}: {info.workers} client workers ({info.resources}, device "
                f"{info.device}) for {len(active)} clients{sampled}; adapter size {info.spec.size:,} "
                f"parameters{note}")
            run = RunInfo(config, run_dir, data, info.spec, backend, say, state.evaluated)
            self.run_info = run
            if checkpoint is None:
                # Algorithm 1: the server draws v^0 (IFCA: K of them) before round 1.
                backend.initialise(algorithm.num_initial_adapters())
            else:
                backend.load_server_state(checkpoint.groups)
            for callback in state.callbacks:
                callback.on_start(run)
            if checkpoint is None and config.train.eval_round_0:
                self._round_zero(run, active, writer)
            first = checkpoint.round + 1 if checkpoint is not None else 1
            done = pd.read_csv(writer.rounds_path)  # a resumed run's earlier rounds
            self.progress.start_rounds(config.rounds, first,
                                       float((done["bytes_up"] + done["bytes_down"]).sum()) if len(done) else 0.0)
            last = self.privacy.last_round if self.privacy is not None else config.rounds
            for round_index in range(first, last + 1):
                ctx = self._round(run, algorithm, round_index, active)
                for callback in state.callbacks:
                    callback.on_round_end(run, ctx)
                self.progress.advance(round_index)
            for callback in state.callbacks:
                callback.on_end(run)
            failed = False
        finally:
            self.progress.finish()
            if self.run_info is not None:
                for callback in state.callbacks:
                    try:
                        callback.on_stop(self.run_info, failed)
                    except Exception as exc:  # noqa: BLE001 - never hides the run's own error
                        say(f"  warning: {type(callback).__name__} could not close: {exc}")
            backend.shutdown()

    # --- one round ----------------------------------------------------------------------------
    def _jobs(self, data: FederatedData, clients: list[int]) -> list[TrainJob]:
        jobs = []
        for client in clients:
            shard = data.clients[client]
            for slot, group in enumerate(self.state.groups[client]):
                budget = self.state.budgets[(client, slot)]
                jobs.append(TrainJob((client, slot), tuple(group), sum(shard.num_train(t) for t in group),
                                     tuple(shard.steps.get(t, steps) for t, steps in zip(group, budget, strict=True))))
        return jobs

    def _evaluate(self, round_index: int, backend, data: FederatedData, active: list[int]
                  ) -> tuple[list[EvalRecord], int]:
        """Every active adapter's records, evaluating only those whose committed state changed
        (engine/evaluation.py). Returns (records, adapters evaluated now)."""
        return evaluate_changed(round_index, backend, eval_jobs(data, self.state.groups, active), self.state.evaluated,
                                self.config.engine.min_passes, self.progress.phase)

    def _adapters_per_pass(self) -> int:
        """engine.max_batched_adapters, fewer when a step of that many would exceed
        engine.max_pass_examples examples (each adapter brings train.batch_size)."""
        engine = self.config.engine
        return max(1, min(engine.max_batched_adapters, engine.max_pass_examples // self.config.train.batch_size))

    def _round(self, run: RunInfo, algorithm: FederatedAlgorithm, round_index: int, active: list[int]
               ) -> RoundContext:
        config, say, backend = self.config, self.progress.say, run.backend
        started = time.perf_counter()
        backend.replan(round_index)  # workers that came up join, lost ones are gone
        workers = backend.live_workers()
        sampled = sample_clients(config.seed, round_index, active, config.federation.client_fraction)
        jobs = self._jobs(run.data, sampled)
        passes = plan_passes(jobs, self._adapters_per_pass(), config.engine.min_passes, self.state.batched)
        self.progress.phase(f"round {round_index}: training {len(sampled)} clients ({len(passes)} passes)")

        def submitted() -> None:
            for callback in self.state.callbacks:
                callback.on_training_submitted(run, round_index)

        reports, failed_jobs = backend.train(round_index, passes, submitted)
        trained = time.perf_counter()
        failed = sorted({job.key[0] for job in failed_jobs})
        if failed:
            say(f"  round {round_index}: clients {failed} failed (their worker was lost "
                f"{config.engine.max_retries + 1} times)")
        completion = 1.0 - len(failed) / len(sampled)
        if completion < config.federation.min_completion_rate:
            say(f"round {round_index:>3}/{config.rounds}  REJECTED: {len(sampled) - len(failed)} of "
                f"{len(sampled)} sampled clients delivered (< federation.min_completion_rate = "
                f"{config.federation.min_completion_rate}); failed clients {failed}; state unchanged")
            row = self._spent(round_row(config, workers, round_index, sampled, failed, reports, None, {},
                                        started, trained, trained, "rejected"), round_index)
            return RoundContext(round_index, "rejected", row, (), (), None, tuple(reports))
        self.progress.phase(f"round {round_index}: aggregating")
        expected = [key for report in reports for key in report.keys]
        fed = config.federation
        # the true tasks go to the server only to measure an attack or a screen (server/attacks.py)
        truth = tasks_by_key(reports) if fed.attack.kind != "none" or fed.screening != "none" else None
        outcome = backend.close_round(round_index, expected, len(sampled) - len(failed), truth)
        for key, problem in outcome.rejected:
            say(f"  round {round_index}: rejected upload of client {key[0]} slot {key[1]}: {problem}")
        if outcome.screened:
            say(f"  round {round_index}: screened out {len(outcome.screened)} of "
                f"{len(outcome.screened) + len(outcome.keys)} uploads (federation.screening = "
                f"{fed.screening}): " + ", ".join(f"client {k[0]} slot {k[1]}" for k, _ in outcome.screened))
        if outcome.screening_note:
            say(f"  round {round_index}: warning: {outcome.screening_note}")
        aggregated = time.perf_counter()
        if outcome.uploads and not outcome.keys:  # every upload failed the server's checks
            say(f"round {round_index:>3}/{config.rounds}  REJECTED: all {outcome.uploads} uploads failed the "
                "server's checks (see the lines above); nothing was aggregated, the state is unchanged")
            row = self._spent(round_row(config, workers, round_index, sampled, failed, reports, outcome, {},
                                        started, trained, aggregated, "rejected"), round_index)
            return RoundContext(round_index, "rejected", row, (), (), None, tuple(reports))
        evaluate = round_index % config.train.eval_every == 0 or round_index == config.rounds
        per_task, per_client, task_accuracy, evaluated = [], [], {}, 0
        if evaluate:
            records, evaluated = self._evaluate(round_index, backend, run.data, active)
            per_task, task_accuracy = task_rows(round_index, records, run.data)
            per_client = client_rows(round_index, records, self.client_ranks)
        row = self._spent(round_row(config, workers, round_index, sampled, failed, reports, outcome,
                                    task_accuracy, started, trained, aggregated, "ok", evaluated), round_index)
        self.progress.round_line(round_index, config.rounds, row, task_accuracy)
        return RoundContext(round_index, "ok", row, tuple(per_task), tuple(per_client), outcome,
                            tuple(reports))

    def _spent(self, row: dict, round_index: int) -> dict:
        """The round's row with the privacy spent so far (rounds.csv `epsilon`; NaN without privacy)."""
        row["epsilon"] = self.privacy.epsilon_after(round_index) if self.privacy is not None else float("nan")
        return row

    def _round_zero(self, run: RunInfo, active: list[int], writer: RunWriter) -> None:
        """Round 0: every active client's starting adapter v^0 — the pre-trained model with a zero
        LoRA update (and a fresh head) — on its test examples, so every table has its
        pre-trained row (train.eval_round_0)."""
        self.progress.phase("round 0: evaluating the starting adapter")
        records, _ = self._evaluate(0, run.backend, run.data, active)
        rows, task_accuracy = task_rows(0, records, run.data)
        writer.append_metrics(rows)
        writer.append_client_metrics(client_rows(0, records, self.client_ranks))
        self.progress.round_zero_line(self.config.rounds, task_accuracy)
