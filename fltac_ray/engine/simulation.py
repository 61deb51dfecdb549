"""The round loop (Algorithm 1), written once for every algorithm.

Driver-side order of one round:
  sample clients -> workers train their clients' adapters (parallel) -> uploads go straight from
  the workers to the coordinator (object refs, never through the driver) -> coordinator clusters
  and aggregates -> each worker receives the outcome once (ray.put) and commits its clients'
  adapters -> workers evaluate their clients on their own test data -> metrics rows are written
  -> a checkpoint of the committed state is written atomically.

Failures: a worker that dies mid-round is restarted from the newest checkpointed state of its
clients and their (seeded, hence identical) training is retried; after engine.max_retries its
clients count as failed for the round. A round in which fewer than
federation.min_completion_rate of the sampled clients delivered is rejected: nothing is
aggregated and every worker discards the round, so the global state stays as it was.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fltac_ray.algorithms import FederatedAlgorithm, create_algorithm
from fltac_ray.checkpoint import Checkpoint, latest_checkpoint, save_checkpoint
from fltac_ray.clustering import adjusted_rand, hungarian_accuracy
from fltac_ray.config import ExperimentConfig, load_config
from fltac_ray.data.federated import FederatedData, build_federated_data
from fltac_ray.engine.messages import AdapterKey, AggregationOutcome, EvalRecord, TrainReport
from fltac_ray.engine.placement import assign_clients, plan_worker_count
from fltac_ray.engine.ray_session import cluster_totals, ray_session
from fltac_ray.errors import ConfigError, ConfigIssue, EngineError
from fltac_ray.outputs import RunWriter, make_run_dir
from fltac_ray.progress import Progress, format_run_summary
from fltac_ray.snapshots import snapshot_rounds

BYTES_PER_PARAM = 4  # adapters travel as float32


@dataclass
class RunResult:
    run_dir: Path
    metrics: pd.DataFrame  # one row per (round, task)
    rounds: pd.DataFrame  # one row per round
    wall_seconds: float


class WorkerLost(EngineError):
    """A worker actor died (its process is gone); during training its clients' work is retried."""


def sample_clients(seed: int, round_index: int, active: list[int], fraction: float) -> list[int]:
    """Seeded choice of ceil(fraction * |active|) clients for one round (all when fraction = 1)."""
    count = max(1, math.ceil(fraction * len(active)))
    if count >= len(active):
        return list(active)
    rng = np.random.default_rng([seed, 4, round_index])
    return sorted(int(c) for c in rng.choice(active, size=count, replace=False))


def _tasks_by_key(reports: list[TrainReport]) -> dict[AdapterKey, str]:
    """(client, slot) -> the "+"-joined true tasks its upload trained on (metrics only)."""
    return {key: task for rep in reports for key, task in zip(rep.keys, rep.tasks, strict=True)}


def prepare_data(config: ExperimentConfig, algorithm: FederatedAlgorithm) -> tuple[FederatedData, list[int]]:
    """The run's federated data and the clients that hold any of it (centralized: one client
    holding everything)."""
    from fltac_ray.data.encoding import make_featurizer

    data = build_federated_data(config, make_featurizer(config.model.name, config.data.max_length))
    active = _check_data(config, data)
    if algorithm.pools_data:
        data = data.pooled(config.train.local_steps, config.federation.client_fraction)
        active = [0]
    return data, active


def preflight(config: ExperimentConfig) -> None:
    """Checks that depend on this machine, run before Ray starts."""
    import torch

    from fltac_ray.models.builders import check_target_modules

    engine = config.engine
    local = engine.ray_address is None
    has_cuda = torch.cuda.is_available()
    if local and engine.gpus_per_worker > 0 and not has_cuda and not engine.num_gpus:
        raise ConfigError([ConfigIssue(
            "engine.gpus_per_worker", engine.gpus_per_worker,
            "no GPU is visible here (torch.cuda.is_available() is False); use 0, or declare GPUs "
            "to Ray with engine.num_gpus (scheduling only, training stays on the CPU)")])
    if local and engine.device == "cuda" and not has_cuda:
        raise ConfigError([ConfigIssue("engine.device", "cuda", "no CUDA device here; use auto or cpu")])
    check_target_modules(config.model.name, config.data.modality, config.model.lora.target_modules,
                         config.data.feature_dim)


def _check_data(config: ExperimentConfig, data: FederatedData) -> list[int]:
    active = [c.client_id for c in data.clients if c.tasks]
    adapters = sum(len(c.tasks) for c in data.clients)
    k = config.resolved_n_clusters
    if k > adapters:
        raise ConfigError([ConfigIssue(
            "federation.n_clusters", k, f"must be in 1..{adapters} (the adapters this partition holds)")])
    return active


class Simulation:
    """One run. `callbacks`: objects with optional `on_start(simulation)` and
    `on_round_end(simulation, round_index, row, task_rows)` methods (Tune reporting, memory
    probes, ...), called in the driver."""

    def __init__(
        self,
        config: ExperimentConfig,
        out: str | None = None,
        progress: Progress | None = None,
        callbacks: list[Any] | tuple = (),
        resume_dir: Path | None = None,
    ):
        self.config = config
        self.out = out
        self.progress = progress or Progress()
        self.callbacks = list(callbacks)
        self.resume_dir = resume_dir
        self.workers: list[Any] = []
        self.coordinator: Any = None

    @classmethod
    def resume(cls, run_dir: str | Path, progress: Progress | None = None, callbacks=()) -> Simulation:
        """Continue an interrupted run from its newest valid checkpoint."""
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError([ConfigIssue("--resume", str(run_dir), "is not a run directory (no config.yaml)")])
        return cls(load_config(run_dir / "config.yaml"), progress=progress, callbacks=callbacks,
                   resume_dir=run_dir)

    # --- driver part ----------------------------------------------------------------------------
    def run(self) -> RunResult:
        started = time.perf_counter()
        config, say = self.config, self.progress.say
        preflight(config)
        say(f"[fltac-ray] {config.name}: {config.algorithm}, {config.num_tasks} tasks, "
            f"{config.data.num_clients} clients, {config.rounds} rounds, model {config.model.name} "
            f"(LoRA rank {config.model.lora.rank})")
        algorithm = create_algorithm(config)  # driver-side: flags only (the server lives in Ray)
        data, active = prepare_data(config, algorithm)
        if algorithm.pools_data:
            say("  centralized: all clients' data pooled into one client; per-round steps per task "
                f"{data.clients[0].steps}")
        checkpoint = None
        if self.resume_dir is not None:
            run_dir = self.resume_dir
            checkpoint = latest_checkpoint(run_dir / "checkpoints", warn=say)
            writer = RunWriter(run_dir, config, resume_round=checkpoint.round)
            say(f"  resuming {run_dir} after round {checkpoint.round} ({checkpoint.path.name})")
        else:
            run_dir = make_run_dir(config.output_dir, config.name, self.out)
            writer = RunWriter(run_dir, config)
            writer.write_partition(data.partition_rows())
        for name, bundle in data.tasks.items():
            holders = sum(1 for c in data.clients if name in c.tasks)
            kind = ("instruction task (generation)" if bundle.is_generation
                    else f"{bundle.num_classes} classes")
            baseline = "" if bundle.is_generation else f" (majority-class rate {bundle.majority_rate:.3f})"
            say(f"  task {name}: {kind}, {len(bundle.train)} train / {len(bundle.test)} test, "
                f"held by {holders} clients{baseline}")
        say(f"  run directory: {run_dir}")
        if config.engine.metrics:
            from fltac_ray.telemetry import DashboardMetrics

            self.callbacks.insert(0, DashboardMetrics(config.name))
        with ray_session(config.engine):
            self._run_rounds(algorithm, data, active, writer, checkpoint)
        wall = time.perf_counter() - started
        metrics = pd.read_csv(run_dir / "metrics.csv")
        rounds = pd.read_csv(run_dir / "rounds.csv")
        say("\n" + format_run_summary(metrics, rounds))
        say(f"[fltac-ray] done in {wall:.1f}s; results in {run_dir}")
        return RunResult(run_dir, metrics, rounds, wall)

    # --- Ray part -------------------------------------------------------------------------------
    def _get(self, refs, what: str):
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        timeout = self.config.engine.actor_timeout_s
        try:
            return ray.get(refs, timeout=timeout)
        except GetTimeoutError as exc:
            raise EngineError(f"{what} took longer than engine.actor_timeout_s = {timeout:g}s") from exc
        except RayActorError as exc:
            raise WorkerLost(f"{what}: {exc}") from exc
        except RayTaskError as exc:
            raise EngineError(f"{what} failed: {exc}") from exc

    def _put_base_weights(self):
        """The frozen base, loaded once here and put in the object store as numpy: workers attach
        it without a copy, so the workers of a node share one copy of the base in memory."""
        import ray
        from transformers.utils import logging as hf_logging

        from fltac_ray.models.builders import load_backbone
        from fltac_ray.models.shared_weights import export_weights

        hf_logging.disable_progress_bar()  # the progress output is ours
        config = self.config
        backbone = load_backbone(config.model.name, config.data.modality, seed=config.seed,
                                 feature_dim=config.data.feature_dim)
        weights = export_weights(backbone)
        ref = ray.put(weights)
        self.progress.say(f"  base model {config.model.name}: {weights.nbytes / 2**20:,.1f} MiB, "
                          "shared by the workers through the object store")
        return ref

    def process_ids(self) -> dict[str, int]:
        """PIDs of this run's processes: the driver, the coordinator and every client worker
        (for memory probes; valid once the actors have started)."""
        coordinator = self._get(self.coordinator.pid.remote(), "asking the coordinator's pid")
        ids = {"driver": os.getpid(), "coordinator": coordinator}
        ids.update({f"worker_{index}": pid for index, pid in enumerate(self.worker_pids)})
        return ids

    def _start_worker(self, index: int, data: FederatedData):
        import ray

        from fltac_ray.engine.client_worker import ClientWorker

        engine = self.config.engine
        return ray.remote(ClientWorker).options(
            num_cpus=engine.cpus_per_worker, num_gpus=engine.gpus_per_worker,
        ).remote(index, self._raw_config, [data.clients[c] for c in self.placement[index]],
                 self._tasks_ref, data.head_classes, max(1, int(engine.cpus_per_worker)), self._base_ref)

    def _run_rounds(self, algorithm: FederatedAlgorithm, data: FederatedData, active: list[int],
                    writer: RunWriter, checkpoint: Checkpoint | None) -> None:
        import ray

        from fltac_ray.engine.coordinator import Coordinator

        config, engine, say = self.config, self.config.engine, self.progress.say
        cpus, gpus = cluster_totals()
        n_workers = plan_worker_count(len(active), engine, cpus, gpus)
        loads = {c: len(data.clients[c].tasks) for c in active}
        self.placement = assign_clients(loads, n_workers, engine.clients_per_actor)
        self._raw_config = config.resolved()  # what config.yaml holds; loads back the same
        self._tasks_ref = ray.put(data.tasks)  # shipped once, zero-copy numpy in every worker
        self._base_ref = self._put_base_weights()
        self.workers = [self._start_worker(index, data) for index in range(n_workers)]
        worker_of = {c: w for w, clients in enumerate(self.placement) for c in clients}
        self.snapshot_rounds = set(snapshot_rounds(config.rounds, config.report.adapter_snapshots))
        try:
            described = self._get([w.describe.remote() for w in self.workers], "starting client workers")
            self.worker_pids = [d["pid"] for d in described]
            adapter_size = described[0]["adapter_size"]
            layout = described[0]["layout"]
            adaptor_index = (self._get(self.workers[0].adaptor_index.remote(), "reading the adaptor layout")
                             if algorithm.uses_mixture else None)
            self.coordinator = ray.remote(Coordinator).options(num_cpus=engine.coordinator_cpus).remote(
                self._raw_config, adapter_size, adaptor_index)
            backend = self._get(self.coordinator.clustering_backend.remote(), "starting the coordinator")
            kmeans = f"; K-means backend: {backend}" if algorithm.name == "fltac" else ""
            say(f"  {n_workers} client workers ({engine.cpus_per_worker:g} CPU, "
                f"{engine.gpus_per_worker:g} GPU each, device {described[0]['device']}) for "
                f"{len(active)} clients; adapter size {adapter_size:,} parameters{kmeans}")
            if checkpoint is None:
                # Algorithm 1: the server draws v^0 (IFCA: K of them) and broadcasts it.
                initial = self._get(self.workers[0].initial_adapters.remote(algorithm.num_global_adapters()),
                                    "initialising the adapters")
                initial_ref = ray.put(initial)
                self._get([w.set_initial_adapters.remote(initial_ref) for w in self.workers]
                          + [self.coordinator.set_initial_adapters.remote(initial_ref)], "broadcasting v^0")
                # what a worker restarted before the first checkpoint restores
                self.state = Checkpoint(0, {"adapters": {}, "private": {}, "globals": {"globals": initial},
                                            "server": {}})
            else:
                self._restore(checkpoint)
            for callback in self.callbacks:
                if hasattr(callback, "on_start"):
                    callback.on_start(self)
            outcome = self.state.groups.get("outcome")
            first = self.state.round + 1
            done = pd.read_csv(writer.rounds_path)  # a resumed run's earlier rounds
            self.progress.start_rounds(config.rounds, first,
                                       float((done["bytes_up"] + done["bytes_down"]).sum()) if len(done) else 0.0)
            self.last_checkpoint = self.state.path
            for round_index in range(first, config.rounds + 1):
                committed, row, task_rows = self._round(algorithm, round_index, worker_of, active,
                                                        data, adapter_size, writer)
                if committed is not None:
                    outcome = committed
                every = engine.checkpoint_every
                if every and (round_index % every == 0 or round_index == config.rounds):
                    self._checkpoint(round_index, outcome, writer)
                # after the checkpoint, so a callback can hand it on (Ray Tune)
                for callback in self.callbacks:
                    if hasattr(callback, "on_round_end"):
                        callback.on_round_end(self, round_index, row, task_rows)
            if outcome is not None and len(outcome["labels"]):
                self._export(outcome, data, algorithm, layout, writer)
        finally:
            self.progress.finish()
            for actor in self.workers:
                ray.kill(actor)
            if self.coordinator is not None:
                ray.kill(self.coordinator)

    def _restore(self, checkpoint: Checkpoint) -> None:
        import ray

        state_ref = ray.put(checkpoint.groups)
        self._get([w.import_state.remote(state_ref) for w in self.workers]
                  + [self.coordinator.load_state.remote(checkpoint.groups.get("server", {}))],
                  "restoring the checkpoint")
        self.state = checkpoint

    def _checkpoint(self, round_index: int, outcome: dict | None, writer: RunWriter) -> None:
        exported = self._get([w.export_state.remote() for w in self.workers], "collecting client state")
        groups: dict[str, dict[str, np.ndarray]] = {"adapters": {}, "private": {}, "server": {}}
        for part in exported:
            groups["adapters"].update(part["adapters"])
            groups["private"].update(part["private"])
        groups["globals"] = exported[0]["globals"]  # every worker holds the same copy
        groups["server"] = self._get(self.coordinator.state.remote(), "collecting server state")
        if outcome is not None:
            groups["outcome"] = outcome
        checkpoint = Checkpoint(round_index, groups, {"config_name": self.config.name})
        checkpoint.path = save_checkpoint(writer.run_dir / "checkpoints", checkpoint,
                                          keep=self.config.engine.keep_checkpoints)
        self.state = checkpoint
        self.last_checkpoint = checkpoint.path

    def _restart_worker(self, index: int, data: FederatedData) -> None:
        import ray

        ray.kill(self.workers[index])
        self.workers[index] = self._start_worker(index, data)
        self._get(self.workers[index].import_state.remote(self.state.groups), f"restarting worker {index}")

    def _train_with_retries(self, round_index: int, by_worker: dict[int, list[int]], data: FederatedData):
        """Submit every worker's training; retry a dead worker's clients on a restarted worker.
        Returns ({worker: (upload ref, report)}, failed clients)."""
        import ray

        engine, say = self.config.engine, self.progress.say
        submitted = {w: self.workers[w].train.options(num_returns=2).remote(round_index, clients)
                     for w, clients in sorted(by_worker.items())}
        if engine.kill_worker_at is not None and tuple(engine.kill_worker_at)[1] == round_index:
            victim = engine.kill_worker_at[0] % len(self.workers)
            say(f"  fault injection: killing worker {victim} during round {round_index}")
            ray.kill(self.workers[victim], no_restart=True)
        done, failed = {}, []
        for w, (upload_ref, report_ref) in submitted.items():
            for attempt in range(engine.max_retries + 1):
                try:
                    done[w] = (upload_ref, self._get(report_ref, f"round {round_index} training on worker {w}"))
                    break
                except WorkerLost as exc:
                    if attempt == engine.max_retries:
                        failed.extend(by_worker[w])
                        say(f"  round {round_index}: worker {w} lost ({exc.__class__.__name__}); "
                            f"clients {by_worker[w]} failed after {engine.max_retries} retries")
                        # replaced for the next rounds, its clients as of the newest checkpoint
                        self._restart_worker(w, data)
                        break
                    say(f"  round {round_index}: worker {w} died; restarting it from round "
                        f"{self.state.round}'s state and retrying clients {by_worker[w]}")
                    self._restart_worker(w, data)
                    upload_ref, report_ref = self.workers[w].train.options(num_returns=2).remote(
                        round_index, by_worker[w])
        return done, failed

    def _round(self, algorithm, round_index, worker_of, active, data, adapter_size, writer):
        import ray

        config, say = self.config, self.progress.say
        started = time.perf_counter()
        sampled = sample_clients(config.seed, round_index, active, config.federation.client_fraction)
        self.progress.phase(f"round {round_index}: training {len(sampled)} clients")
        by_worker: dict[int, list[int]] = defaultdict(list)
        for client in sampled:
            by_worker[worker_of[client]].append(client)
        done, failed = self._train_with_retries(round_index, by_worker, data)
        reports: list[TrainReport] = [report for _, report in done.values()]
        trained = time.perf_counter()
        completion = 1.0 - len(failed) / len(sampled)
        if completion < config.federation.min_completion_rate:
            # Rejected: nothing aggregated, every worker forgets the round's training.
            self._get([w.discard.remote() for w in self.workers], "discarding the round")
            say(f"round {round_index:>3}/{config.rounds}  REJECTED: {len(sampled) - len(failed)} of "
                f"{len(sampled)} sampled clients delivered (< federation.min_completion_rate = "
                f"{config.federation.min_completion_rate}); failed clients {failed}; state unchanged")
            row = self._round_row(round_index, sampled, failed, reports, None, algorithm,
                                  adapter_size, {}, started, trained, trained, "rejected")
            writer.append_round(row)
            self.progress.advance(round_index)
            return None, row, []
        outcome: AggregationOutcome | None = None
        if algorithm.communicates:
            self.progress.phase(f"round {round_index}: aggregating")
            expected = [key for rep in reports for key in rep.keys]
            outcome = self._get(
                self.coordinator.aggregate.remote(round_index, expected, *[u for u, _ in done.values()]),
                f"round {round_index} aggregation")
            for key, problem in outcome.rejected:
                say(f"  round {round_index}: rejected upload of client {key[0]} slot {key[1]}: {problem}")
        aggregated = time.perf_counter()
        if outcome is not None and round_index in self.snapshot_rounds:  # not in aggregate_seconds
            self._save_snapshot(round_index, reports, writer)
        evaluate = round_index % config.train.eval_every == 0 or round_index == config.rounds
        self.progress.phase(f"round {round_index}: {'evaluating' if evaluate else 'committing'}")
        shared_outcome = ray.put(outcome) if outcome is not None else None
        records: list[EvalRecord] = [
            r for batch in self._get([w.download.remote(shared_outcome, evaluate) for w in self.workers],
                                     f"round {round_index} download/evaluation")
            for r in batch
        ]
        task_rows, task_accuracy = self._task_rows(round_index, records, data)
        row = self._round_row(round_index, sampled, failed, reports, outcome, algorithm, adapter_size,
                              task_accuracy, started, trained, aggregated, "ok")
        writer.append_metrics(task_rows)
        writer.append_client_metrics([
            {"round": round_index, "client": r.client_id, "task": r.task, "accuracy": r.correct / r.scored,
             "loss": r.loss_sum / r.scored, "test_samples": r.count}
            for r in records
        ])
        writer.append_round(row)
        self.progress.round_line(round_index, config.rounds, row, task_accuracy)
        if failed:
            say(f"  round {round_index}: failed clients {failed} (not aggregated this round)")
        if outcome is None:
            return None, row, task_rows
        committed = {"adapters": outcome.adapters, "labels": np.asarray(outcome.labels, dtype=np.int64),
                     "keys": np.asarray(outcome.keys, dtype=np.int64).reshape(-1, 2)}
        return committed, row, task_rows

    def _save_snapshot(self, round_index: int, reports: list[TrainReport], writer: RunWriter) -> None:
        """The round's uploads (as the coordinator kept them) with their true tasks, for the report."""
        from fltac_ray.snapshots import Snapshot, write_snapshot

        kept = self._get(self.coordinator.take_snapshot.remote(), f"round {round_index} adapter snapshot")
        if kept is None or not len(kept["keys"]):
            return
        task_of = _tasks_by_key(reports)
        keys = kept["keys"]
        write_snapshot(writer.run_dir, Snapshot(
            round_index, kept["adapters"], keys[:, 0], keys[:, 1], kept["labels"],
            [task_of[(int(c), int(s))] for c, s in keys]))

    def _round_row(self, round_index, sampled, failed, reports, outcome, algorithm, adapter_size,
                   task_accuracy, started, trained, aggregated, status) -> dict:
        task_of = _tasks_by_key(reports)
        losses = [loss for rep in reports for loss in rep.losses]
        nan = float("nan")
        uploads = params_down = 0
        clustering_accuracy = ari = nan
        if outcome is not None:
            uploads = len(task_of)
            if algorithm.client_selects_global:  # every sampled client receives all K adapters
                params_down = (len(sampled) - len(failed)) * len(outcome.adapters) * adapter_size
            else:  # each accepted upload is answered with one adapter
                params_down = len(outcome.keys) * adapter_size
            truth = [task_of[key] for key in outcome.keys]
            if algorithm.clusters_tasks and truth:
                clustering_accuracy = hungarian_accuracy(truth, outcome.labels)
                ari = adjusted_rand(truth, outcome.labels)
        # FLoRAL also sends each upload's C mixture weights (never the router itself).
        mixture_size = self.config.resolved_num_adaptors if algorithm.uses_mixture else 0
        params_up = uploads * (adapter_size + mixture_size)
        accuracies = list(task_accuracy.values())
        finished = time.perf_counter()
        return {
            "round": round_index,
            "status": status,
            "clients": len(sampled),
            "failed_clients": " ".join(str(c) for c in failed),
            "adapters": len(task_of),
            "clustering_accuracy": clustering_accuracy,
            "ari": ari,
            "clusters": len(outcome.adapters) if outcome is not None else 0,
            "kmeans_backend": outcome.backend if algorithm.name == "fltac" and outcome else "",
            "params_up": params_up,
            "params_up_per_client": params_up / len(sampled),
            "bytes_up": params_up * BYTES_PER_PARAM,
            "params_down": params_down,
            "bytes_down": params_down * BYTES_PER_PARAM,
            "rejected_uploads": len(outcome.rejected) if outcome is not None else 0,
            "train_loss": float(np.mean(losses)) if losses else nan,
            "mean_accuracy": float(np.mean(accuracies)) if accuracies else nan,
            "train_seconds": trained - started,
            # the slowest worker's time inside local training steps: the round's compute floor
            "step_seconds": max((rep.step_seconds for rep in reports), default=0.0),
            "aggregate_seconds": aggregated - trained,
            "eval_seconds": finished - aggregated,
            "seconds": finished - started,
        }

    @staticmethod
    def _task_rows(round_index: int, records: list[EvalRecord], data: FederatedData):
        nan = float("nan")
        per_task: dict[str, list[EvalRecord]] = defaultdict(list)
        for record in records:
            per_task[record.task].append(record)
        rows, accuracy = [], {}
        for task, bundle in data.tasks.items():
            items = per_task.get(task)
            if not items:
                continue
            count = sum(r.count for r in items)
            scored = sum(r.scored for r in items)
            accuracy[task] = sum(r.correct for r in items) / scored
            loss = sum(r.loss_sum for r in items) / scored
            generation = bundle.is_generation
            rows.append({
                "round": round_index,
                "task": task,
                "accuracy": accuracy[task],
                "loss": loss,
                "clients": len({r.client_id for r in items}),
                "test_samples": count,
                "majority_accuracy": bundle.majority_rate,
                # generation tasks: accuracy is next-token accuracy on response tokens
                "rouge_l": sum(r.rouge_sum for r in items) / count if generation else nan,
                "perplexity": math.exp(min(loss, 50.0)) if generation else nan,
                "judge_score": sum(r.judge_sum for r in items) / count if generation else nan,
            })
        return rows, accuracy

    def _export(self, outcome: dict, data: FederatedData, algorithm: FederatedAlgorithm, layout,
                writer: RunWriter) -> None:
        # The true tasks behind each upload key follow from the partition (metrics only).
        groups = {c.client_id: algorithm.client_adapters(list(c.tasks)) for c in data.clients}
        truth = ["+".join(groups[int(c)][int(s)]) for c, s in outcome["keys"]]
        clusters = []
        for cluster in range(len(outcome["adapters"])):
            members = [t for t, label in zip(truth, outcome["labels"], strict=True) if label == cluster]
            if not members:  # an IFCA adapter nobody chose in the last round
                task, hits = "", 0
            else:
                task, hits = Counter(members).most_common(1)[0]
            clusters.append({
                "cluster": cluster,
                "members": len(members),
                "majority_task": task,
                "purity": hits / len(members) if members else float("nan"),
            })
        from fltac_ray.export import export_adapters

        class_names = {name: bundle.class_names for name, bundle in data.tasks.items()}
        assignments = [{"client": int(c), "slot": int(s), "tasks": tasks, "cluster": int(label)}
                       for (c, s), tasks, label in zip(outcome["keys"], truth, outcome["labels"], strict=True)]
        folder = export_adapters(writer.run_dir, outcome["adapters"], layout, clusters, self.config,
                                 class_names, assignments)
        self.progress.say(f"  final cluster adapters: {folder} (peft layout)"
                          if algorithm.name != "floral" else f"  final adaptors: {folder}")
