"""The run's tables, row by row: rounds.csv (one row per round), metrics.csv (one per round and
task) and clients.csv (one per round, client and task), from a round's reports, the server's
outcome and the evaluation records. Pure functions of what the round produced."""

from __future__ import annotations

import math
import time
from collections import defaultdict

import numpy as np

from fltac_ray.config import ExperimentConfig
from fltac_ray.data.federated import FederatedData
from fltac_ray.engine.messages import EvalRecord, PassReport, RoundOutcome, tasks_by_key
from fltac_ray.engine.scheduling import utilisation
from fltac_ray.runs.outputs import AUDIT_COLUMNS
from fltac_ray.server.clustering import adjusted_rand, hungarian_accuracy

BYTES_PER_PARAM = 4  # adapters travel as float32


def round_row(config: ExperimentConfig, round_workers: list[int], round_index: int, sampled: list[int],
              failed: list[int], reports: list[PassReport], outcome: RoundOutcome | None,
              task_accuracy: dict[str, float], started: float, trained: float, aggregated: float,
              status: str, evaluated: int = 0) -> dict:
    """One rounds.csv row: the round's clients, traffic, clustering scores against the true
tasks, timings and the algorithm's own measures; `round_workers`: the live workers."""
    task_of = tasks_by_key(reports)
    losses = [loss for rep in reports for loss in rep.losses]
    nan = float("nan")
    clustering_accuracy = ari = nan
    params_up = params_down = 0
    if outcome is not None:
        params_up, params_down = outcome.params_up, outcome.params_down
        truth = [task_of[key] for key in outcome.keys]
        if outcome.recovers_tasks and truth:
            clustering_accuracy = hungarian_accuracy(truth, outcome.labels)
            ari = adjusted_rand(truth, outcome.labels)
    accuracies = list(task_accuracy.values())
    # each worker's time inside local training steps, summed over its passes (0: idle)
    busy: dict[int, float] = dict.fromkeys(round_workers, 0.0)
    for rep in reports:
        busy[rep.worker] = busy.get(rep.worker, 0.0) + rep.step_seconds
    finished = time.perf_counter()
    return {
        "round": round_index,
        "status": status,
        "clients": len(sampled),
        "failed_clients": " ".join(str(c) for c in failed),
        "adapters": len(task_of),
        "clustering_accuracy": clustering_accuracy,
        "ari": ari,
        "clusters": outcome.clusters if outcome is not None else 0,
        "lora_product_error": outcome.lora_product_error if outcome is not None else nan,
        "clip_norm": outcome.clip_norm if outcome is not None else nan,
        "params_up": params_up,
        "params_up_per_client": params_up / len(sampled),
        "bytes_up": params_up * BYTES_PER_PARAM,
        "params_down": params_down,
        "bytes_down": params_down * BYTES_PER_PARAM,
        "rejected_uploads": len(outcome.rejected) if outcome is not None else 0,
        "screened_uploads": len(outcome.screened) if outcome is not None else 0,
        "suspected_kept": outcome.kept_apart if outcome is not None else 0,
        **{column: (outcome.audit.get(column, nan) if outcome is not None else nan) for column in AUDIT_COLUMNS},
        "train_loss": float(np.mean(losses)) if losses else nan,
        # float16: adapter steps skipped because their gradients overflowed (0 otherwise)
        "skipped_steps": sum(rep.skipped_steps for rep in reports),
        "mean_accuracy": float(np.mean(accuracies)) if accuracies else nan,
        "train_seconds": trained - started,
        # the busiest worker's time inside local training steps: the round's compute floor
        "step_seconds": max(busy.values(), default=0.0),
        # mean over max of the workers' step time: how evenly the round's work was spread
        "worker_utilisation": utilisation(list(busy.values())) if any(busy.values()) else nan,
        "aggregate_seconds": aggregated - trained,
        "evaluated_adapters": evaluated,  # the others' records reused (unchanged since evaluated)
        "eval_seconds": finished - aggregated,
        "seconds": finished - started,
        # the algorithm's own measures (its round_metrics; empty when the round had none)
        **{name: (outcome.metrics.get(name, "") if outcome is not None else "")
           for name in config.algorithm_class.round_metrics},
    }


def client_rows(round_index: int, records: list[EvalRecord], ranks: np.ndarray) -> list[dict]:
    """clients.csv rows; `ranks`: each client's LoRA rank (models/ranks.py)."""
    return [{"round": round_index, "client": r.client_id, "task": r.task,
             "accuracy": r.correct / r.scored, "loss": r.loss_sum / r.scored, "test_samples": r.count,
             "rank": int(ranks[r.client_id])}
            for r in sorted(records, key=lambda r: (r.client_id, r.task))]

def task_rows(round_index: int, records: list[EvalRecord], data: FederatedData):
    nan = float("nan")
    per_task: dict[str, list[EvalRecord]] = defaultdict(list)
    # summed in (client, task) order: the same floats whichever worker evaluated what
    for record in sorted(records, key=lambda r: (r.client_id, r.task)):
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
