"""Live run metrics for the Ray dashboard and Prometheus, through `ray.util.metrics`.

A round callback of the simulation: after every round it sets gauges and bumps counters tagged
with the experiment (and task). Ray exports them in Prometheus text on each node's metrics
export port with a `ray_` prefix (e.g. `ray_fltac_task_accuracy{experiment=..., task=...}`) —
counters also with Prometheus' `_total` suffix (`ray_fltac_bytes_up_total`) — and the
dashboard's Metrics view charts them when Prometheus/Grafana are set up.
"""

from __future__ import annotations

import math
from typing import Any

from fltac_ray.engine.callbacks import Callback, RoundContext, RunInfo


def _finite(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


class DashboardMetrics(Callback):
    def __init__(self, experiment: str) -> None:
        self.experiment = experiment
        self.tags = {"experiment": experiment}

    def on_start(self, run: RunInfo) -> None:
        from ray.util.metrics import Counter, Gauge

        keys = ("experiment",)
        task_keys = ("experiment", "task")
        self.round = Gauge("fltac_round", "last completed round", tag_keys=keys)
        self.task_accuracy = Gauge("fltac_task_accuracy", "per-task test accuracy", tag_keys=task_keys)
        self.task_loss = Gauge("fltac_task_loss", "per-task test loss", tag_keys=task_keys)
        self.mean_accuracy = Gauge("fltac_mean_accuracy", "mean accuracy over tasks", tag_keys=keys)
        self.clustering_accuracy = Gauge("fltac_clustering_accuracy",
                                         "Hungarian-matched clustering accuracy", tag_keys=keys)
        self.ari = Gauge("fltac_ari", "adjusted Rand index of the clusters", tag_keys=keys)
        self.seconds = Gauge("fltac_round_seconds", "wall seconds of the last round", tag_keys=keys)
        self.epsilon = Gauge("fltac_epsilon", "privacy spent so far (privacy: epsilon at the run's delta)",
                             tag_keys=keys)
        self.lora_product_error = Gauge("fltac_lora_product_error",
                                        "relative error of averaging LoRA factors instead of products", tag_keys=keys)
        self.bytes_up = Counter("fltac_bytes_up", "bytes uploaded by clients", tag_keys=keys)
        self.bytes_down = Counter("fltac_bytes_down", "bytes downloaded by clients", tag_keys=keys)
        self.clients = Counter("fltac_clients_trained", "client trainings completed", tag_keys=keys)
        self.rejected = Counter("fltac_rejected_uploads", "uploads rejected by the server", tag_keys=keys)
        # A series appears only once recorded, and Counter.inc refuses 0: record each counter's 0
        # now, so a scrape sees rejected_uploads 0 (not no series) in a run that rejects nothing.
        for counter in (self.bytes_up, self.bytes_down, self.clients, self.rejected):
            counter._record(0.0, tags=self.tags)

    def on_round_end(self, run: RunInfo, ctx: RoundContext) -> None:
        tags, row = self.tags, ctx.row
        self.round.set(ctx.round_index, tags=tags)
        for task_row in ctx.task_rows:
            task_tags = {**tags, "task": task_row["task"]}
            self.task_accuracy.set(task_row["accuracy"], tags=task_tags)
            self.task_loss.set(task_row["loss"], tags=task_tags)
        for gauge, key in ((self.mean_accuracy, "mean_accuracy"), (self.seconds, "seconds"),
                           (self.clustering_accuracy, "clustering_accuracy"), (self.ari, "ari"),
                           (self.epsilon, "epsilon"), (self.lora_product_error, "lora_product_error")):
            if _finite(row.get(key)):
                gauge.set(row[key], tags=tags)
        failed = len(str(row.get("failed_clients") or "").split())
        for counter, value in ((self.bytes_up, row["bytes_up"]), (self.bytes_down, row["bytes_down"]),
                               (self.clients, row["clients"] - failed),
                               (self.rejected, row["rejected_uploads"])):
            if value > 0:
                counter.inc(value, tags=tags)
