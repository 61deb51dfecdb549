"""The round loop (Algorithm 1), written once for every algorithm.

Driver-side order of one round:
  sample clients -> workers train their clients' adapters (parallel) -> uploads go straight from
  the workers to the coordinator (object refs, never through the driver) -> coordinator clusters
  and aggregates -> each worker receives the outcome once (ray.put) and replaces its clients'
  adapters -> workers evaluate their clients on their own test data -> metrics rows are written.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fltac_ray.algorithms import FederatedAlgorithm, create_algorithm
from fltac_ray.clustering import adjusted_rand, hungarian_accuracy
from fltac_ray.config import ExperimentConfig
from fltac_ray.data.federated import FederatedData, build_federated_data
from fltac_ray.engine.messages import AggregationOutcome, EvalRecord, TrainReport
from fltac_ray.engine.placement import assign_clients, plan_worker_count
from fltac_ray.engine.ray_session import cluster_totals, ray_session
from fltac_ray.errors import ConfigError, ConfigIssue, EngineError
from fltac_ray.outputs import RunWriter, make_run_dir
from fltac_ray.progress import Progress

BYTES_PER_PARAM = 4  # adapters travel as float32


@dataclass
class RunResult:
    run_dir: Path
    metrics: pd.DataFrame  # one row per (round, task)
    rounds: pd.DataFrame  # one row per round
    wall_seconds: float


def sample_clients(seed: int, round_index: int, active: list[int], fraction: float) -> list[int]:
    """Seeded choice of ceil(fraction * |active|) clients for one round (all when fraction = 1)."""
    count = max(1, math.ceil(fraction * len(active)))
    if count >= len(active):
        return list(active)
    rng = np.random.default_rng([seed, 4, round_index])
    return sorted(int(c) for c in rng.choice(active, size=count, replace=False))


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
    check_target_modules(config.model.name, config.model.lora.target_modules)


def _check_data(config: ExperimentConfig, data: FederatedData) -> list[int]:
    active = [c.client_id for c in data.clients if c.tasks]
    adapters = sum(len(c.tasks) for c in data.clients)
    k = config.resolved_n_clusters
    if k > adapters:
        raise ConfigError([ConfigIssue(
            "federation.n_clusters", k, f"must be in 1..{adapters} (the adapters this partition holds)")])
    return active


class Simulation:
    def __init__(self, config: ExperimentConfig, out: str | None = None, progress: Progress | None = None):
        self.config = config
        self.out = out
        self.progress = progress or Progress()

    def run(self) -> RunResult:
        started = time.perf_counter()
        config, say = self.config, self.progress.say
        preflight(config)
        from fltac_ray.models.builders import text_encoder

        say(f"[fltac-ray] {config.name}: {config.algorithm}, {len(config.data.tasks)} tasks, "
            f"{config.data.num_clients} clients, {config.rounds} rounds, model {config.model.name} "
            f"(LoRA rank {config.model.lora.rank})")
        algorithm = create_algorithm(config)  # driver-side: flags only (the server lives in Ray)
        data = build_federated_data(config, text_encoder(config.model.name, config.data.max_length))
        active = _check_data(config, data)
        if algorithm.pools_data:
            data = data.pooled(config.train.local_steps, config.federation.client_fraction)
            active = [0]
            say("  centralized: all clients' data pooled into one client; per-round steps per task "
                f"{data.clients[0].steps}")
        run_dir = make_run_dir(config, self.out)
        writer = RunWriter(run_dir, config)
        writer.write_partition(data.partition_rows())
        for name, bundle in data.tasks.items():
            holders = sum(1 for c in data.clients if name in c.tasks)
            say(f"  task {name}: {bundle.num_classes} classes, {len(bundle.train)} train / "
                f"{len(bundle.test)} test, held by {holders} clients "
                f"(majority-class rate {bundle.majority_rate:.3f})")
        say(f"  run directory: {run_dir}")
        with ray_session(config.engine):
            self._run_rounds(algorithm, data, active, writer)
        wall = time.perf_counter() - started
        metrics = pd.read_csv(run_dir / "metrics.csv")
        rounds = pd.read_csv(run_dir / "rounds.csv")
        say(f"[fltac-ray] done in {wall:.1f}s; results in {run_dir}")
        return RunResult(run_dir, metrics, rounds, wall)

    # --- Ray part -----------------------------------------------------------------------------
    def _get(self, refs, what: str):
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        timeout = self.config.engine.actor_timeout_s
        try:
            return ray.get(refs, timeout=timeout)
        except GetTimeoutError as exc:
            raise EngineError(f"{what} took longer than engine.actor_timeout_s = {timeout:g}s") from exc
        except (RayActorError, RayTaskError) as exc:
            raise EngineError(f"{what} failed: {exc}") from exc

    def _run_rounds(self, algorithm: FederatedAlgorithm, data: FederatedData, active: list[int],
                    writer: RunWriter) -> None:
        import ray

        from fltac_ray.engine.client_worker import ClientWorker
        from fltac_ray.engine.coordinator import Coordinator

        config, engine, say = self.config, self.config.engine, self.progress.say
        cpus, gpus = cluster_totals()
        n_workers = plan_worker_count(len(active), engine, cpus, gpus)
        loads = {c: len(data.clients[c].tasks) for c in active}
        placement = assign_clients(loads, n_workers, engine.clients_per_actor)
        raw_config = config.resolved()  # what config.yaml holds; loads back as the same config
        tasks_ref = ray.put(data.tasks)  # shipped once, zero-copy numpy in every worker
        worker_cls = ray.remote(ClientWorker)
        threads = max(1, int(engine.cpus_per_worker))
        workers = [
            worker_cls.options(num_cpus=engine.cpus_per_worker, num_gpus=engine.gpus_per_worker).remote(
                index, raw_config, [data.clients[c] for c in clients], tasks_ref,
                data.head_classes, threads)
            for index, clients in enumerate(placement)
        ]
        worker_of = {c: w for w, clients in enumerate(placement) for c in clients}
        coordinator = None
        try:
            described = self._get([w.describe.remote() for w in workers], "starting client workers")
            adapter_size = described[0]["adapter_size"]
            layout = described[0]["layout"]
            adaptor_index = (self._get(workers[0].adaptor_index.remote(), "reading the adaptor layout")
                             if algorithm.uses_mixture else None)
            coordinator = ray.remote(Coordinator).options(num_cpus=engine.coordinator_cpus).remote(
                raw_config, adapter_size, adaptor_index)
            backend = self._get(coordinator.clustering_backend.remote(), "starting the coordinator")
            say(f"  {n_workers} client workers ({engine.cpus_per_worker:g} CPU, "
                f"{engine.gpus_per_worker:g} GPU each, device {described[0]['device']}) for "
                f"{len(active)} clients; adapter size {adapter_size:,} parameters; "
                f"K-means backend: {backend}")
            # Algorithm 1: the server draws v^0 (IFCA: K of them) and broadcasts it.
            initial = self._get(workers[0].initial_adapters.remote(algorithm.num_global_adapters()),
                                "initialising the adapters")
            initial_ref = ray.put(initial)
            self._get([w.set_initial_adapters.remote(initial_ref) for w in workers]
                      + [coordinator.set_initial_adapters.remote(initial_ref)], "broadcasting v^0")
            outcome, reports = None, []
            for round_index in range(1, config.rounds + 1):
                outcome, reports = self._round(algorithm, round_index, workers, coordinator,
                                               worker_of, active, data, adapter_size, writer)
            if outcome is not None and len(outcome.keys):
                self._export(outcome, reports, layout, writer)
        finally:
            for actor in workers:
                ray.kill(actor)
            if coordinator is not None:
                ray.kill(coordinator)

    def _round(self, algorithm, round_index, workers, coordinator, worker_of, active, data,
               adapter_size, writer):
        import ray

        config = self.config
        started = time.perf_counter()
        sampled = sample_clients(config.seed, round_index, active, config.federation.client_fraction)
        by_worker: dict[int, list[int]] = defaultdict(list)
        for client in sampled:
            by_worker[worker_of[client]].append(client)
        upload_refs, report_refs = [], []
        for w, clients in sorted(by_worker.items()):
            upload_ref, report_ref = workers[w].train.options(num_returns=2).remote(round_index, clients)
            upload_refs.append(upload_ref)
            report_refs.append(report_ref)
        # Uploads flow worker -> coordinator directly; the driver only waits on small reports.
        if algorithm.communicates:
            outcome_ref = coordinator.aggregate.remote(round_index, *upload_refs)
        reports: list[TrainReport] = self._get(report_refs, f"round {round_index} local training")
        trained = time.perf_counter()
        outcome: AggregationOutcome | None = None
        if algorithm.communicates:
            outcome = self._get(outcome_ref, f"round {round_index} aggregation")
        aggregated = time.perf_counter()
        evaluate = round_index % config.train.eval_every == 0 or round_index == config.rounds
        shared_outcome = ray.put(outcome) if outcome is not None else None
        records: list[EvalRecord] = [
            r for batch in self._get([w.download.remote(shared_outcome, evaluate) for w in workers],
                                     f"round {round_index} download/evaluation")
            for r in batch
        ]
        finished = time.perf_counter()

        task_of = {key: task for rep in reports for key, task in zip(rep.keys, rep.tasks, strict=True)}
        losses = [loss for rep in reports for loss in rep.losses]
        task_rows, task_accuracy = self._task_rows(round_index, records, data)
        accuracies = list(task_accuracy.values())
        nan = float("nan")
        uploads = params_down = 0
        clustering_accuracy = ari = nan
        if outcome is not None:
            uploads = len(task_of)
            if algorithm.client_selects_global:  # every sampled client receives all K adapters
                params_down = len(sampled) * len(outcome.adapters) * adapter_size
            else:  # each accepted upload is answered with one adapter
                params_down = len(outcome.keys) * adapter_size
            truth = [task_of[key] for key in outcome.keys]
            if algorithm.clusters_tasks and truth:
                clustering_accuracy = hungarian_accuracy(truth, outcome.labels)
                ari = adjusted_rand(truth, outcome.labels)
        # FLoRAL also sends each upload's C mixture weights (never the router itself).
        mixture_size = config.resolved_num_adaptors if algorithm.uses_mixture else 0
        params_up = uploads * (adapter_size + mixture_size)
        row = {
            "round": round_index,
            "clients": len(sampled),
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
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "mean_accuracy": float(np.mean(accuracies)) if accuracies else float("nan"),
            "train_seconds": trained - started,
            "aggregate_seconds": aggregated - trained,
            "eval_seconds": finished - aggregated,
            "seconds": finished - started,
        }
        writer.append_metrics(task_rows)
        writer.append_client_metrics([
            {"round": round_index, "client": r.client_id, "task": r.task, "accuracy": r.correct / r.count,
             "loss": r.loss_sum / r.count, "test_samples": r.count}
            for r in records
        ])
        writer.append_round(row)
        self.progress.round_line(round_index, config.rounds, row, task_accuracy)
        return outcome, reports

    @staticmethod
    def _task_rows(round_index: int, records: list[EvalRecord], data: FederatedData):
        per_task: dict[str, list[EvalRecord]] = defaultdict(list)
        for record in records:
            per_task[record.task].append(record)
        rows, accuracy = [], {}
        for task, bundle in data.tasks.items():
            items = per_task.get(task)
            if not items:
                continue
            count = sum(r.count for r in items)
            accuracy[task] = sum(r.correct for r in items) / count
            rows.append({
                "round": round_index,
                "task": task,
                "accuracy": accuracy[task],
                "loss": sum(r.loss_sum for r in items) / count,
                "clients": len({r.client_id for r in items}),
                "test_samples": count,
                "majority_accuracy": bundle.majority_rate,
            })
        return rows, accuracy

    def _export(self, outcome: AggregationOutcome, reports: list[TrainReport], layout, writer: RunWriter) -> None:
        task_of = {key: task for rep in reports for key, task in zip(rep.keys, rep.tasks, strict=True)}
        clusters = []
        for cluster in range(len(outcome.adapters)):
            members = [task_of[k] for k, label in zip(outcome.keys, outcome.labels, strict=True)
                       if label == cluster]
            task, hits = Counter(members).most_common(1)[0]
            clusters.append({
                "cluster": cluster,
                "file": f"cluster_{cluster}.safetensors",
                "members": len(members),
                "majority_task": task,
                "purity": hits / len(members),
            })
        folder = writer.write_adapters(outcome.adapters, layout, clusters)
        self.progress.say(f"  final cluster adapters: {folder}")
