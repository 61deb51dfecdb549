"""Experiment tracking: TensorBoard, MLflow and Weights & Biases, as run callbacks. No Ray.

`tracking: [tensorboard, mlflow, wandb]` (any subset; config.TrackingConfig) adds one callback per
library to a run, each through the library's own API, in the driver:
- at the start: the resolved config, flattened to dotted keys (`model.lora.rank`), as parameters;
- after every round: the rounds.csv numbers (mean_accuracy, clustering_accuracy, bytes_up, ...)
  and `accuracy/<task>`, `loss/<task>`, at step = the round;
- at the end: the final adapters (adapters/: one peft folder per cluster) as artifacts — an
  MLflow artifact folder, a W&B model artifact; TensorBoard, which has no artifacts, gets the
  adapters' index and folder as text and the final metrics as hparams.
A run that fails marks its MLflow run FAILED and finishes its W&B run with exit code 1.

Where they write: TensorBoard event files in <run>/tensorboard; MLflow to tracking.mlflow_uri,
$MLFLOW_TRACKING_URI, or a local file store in <output_dir>/mlruns; W&B online when an API key
is set up, offline (into <run>/wandb, `wandb sync` uploads it later) otherwise.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fltac_ray.config import ExperimentConfig, flat_fields
from fltac_ray.engine.callbacks import Callback, RoundContext, RunInfo
from fltac_ray.errors import ConfigError, ConfigIssue, ResourceUnavailableError

INSTALL_HINT = "pip install 'fltac-ray[tracking]'"
# the module each back-end needs (torch.utils.tensorboard imports the tensorboard package)
MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_trackers(config: ExperimentConfig) -> None:
    """Refuse, before anything starts, a tracker whose library is not installed."""
    import importlib.util

    missing = [name for name in config.tracking.backends if importlib.util.find_spec(MODULES[name]) is None]
    if missing:
        raise ConfigError([ConfigIssue("tracking.backends", missing, f"not installed here; {INSTALL_HINT} "
                                       f"(or pip install {' '.join(MODULES[m] for m in missing)})")])
    if "mlflow" in config.tracking.backends and (folder := mlflow_store_folder(mlflow_uri(config))) is not None:
        from fltac_ray.runs.outputs import folder_problem

        if (problem := folder_problem(folder)) is not None:
            raise ResourceUnavailableError(f"tracking: the MLflow store {mlflow_uri(config)}: {folder} {problem}; "
                                           "set tracking.mlflow_uri (or $MLFLOW_TRACKING_URI) to a writable place")


def mlflow_store_folder(uri: str) -> Path | None:
    """The local folder an MLflow store writes into (a file store's root, a SQLite file's folder),
    checked before the run starts; None for a server (http, databricks), which only answers then."""
    if uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(uri).path))
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).expanduser().parent
    return None


def flat_params(values: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config as dotted parameters; lists and None as text (what trackers store)."""
    return {key: value if isinstance(value, (bool, int, float, str)) else str(value)
            for key, value in flat_fields(dict(values)).items()}


def round_metrics(ctx: RoundContext) -> dict[str, float]:
    """The round's finite numbers: rounds.csv's numeric columns and per-task accuracy and loss."""
    metrics = {key: float(value) for key, value in ctx.row.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "round"}
    for row in ctx.task_rows:
        metrics[f"accuracy/{row['task']}"] = float(row["accuracy"])
        metrics[f"loss/{row['task']}"] = float(row["loss"])
    return {key: value for key, value in metrics.items() if math.isfinite(value)}


def mlflow_uri(config: ExperimentConfig) -> str:
    """tracking.mlflow_uri, else $MLFLOW_TRACKING_URI, else a file store in <output_dir>/mlruns."""
    uri = config.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri if "://" in uri or uri.startswith("sqlite:") else Path(uri).resolve().as_uri()
    return (Path(config.output_dir) / "mlruns").resolve().as_uri()


def wandb_mode(config: ExperimentConfig) -> str:
    """tracking.wandb_mode, else $WANDB_MODE, else online only when an API key is set up."""
    if config.tracking.wandb_mode:
        return config.tracking.wandb_mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")
    return "online" if os.environ.get("WANDB_API_KEY") or logged_in else "offline"


class Tracker(Callback):
    """One tracking library. Subclasses open a run, log parameters, metrics and the adapters'
    folder, and close with a status."""

    name = ""  # as tracking.backends names it

    def __init__(self) -> None:
        self.opened = self.closed = False

    def on_start(self, run: RunInfo) -> None:
        self.open(run, flat_params(run.config.resolved()))
        self.opened = True  # a tracker that failed to open has nothing to close

    def on_round_end(self, run: RunInfo, ctx: RoundContext) -> None:
        metrics = round_metrics(ctx)
        if metrics:
            self.log(metrics, ctx.round_index)

    def on_end(self, run: RunInfo) -> None:
        adapters = run.run_dir / "adapters"
        if adapters.is_dir():
            self.log_adapters(adapters)
        self.close(failed=False)

    def on_stop(self, run: RunInfo, failed: bool) -> None:
        if self.opened and not self.closed:
            self.close(failed)

    def open(self, run: RunInfo, params: dict[str, Any]) -> None:
        raise NotImplementedError

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_adapters(self, folder: Path) -> None:
        raise NotImplementedError

    def close(self, failed: bool) -> None:
        self.closed = True


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def open(self, run: RunInfo, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.params = params  # flat_params: every value a bool, number or text, as hparams want
        self.final: dict[str, float] = {}
        self.writer = SummaryWriter(log_dir=str(run.run_dir / "tensorboard"))
        table = "\n".join(f"| {key} | {value} |" for key, value in params.items())
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + table, 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.final.update(metrics)
        self.writer.flush()

    def log_adapters(self, folder: Path) -> None:
        index = folder / "index.json"
        text = index.read_text() if index.is_file() else ""
        self.writer.add_text("adapters", f"folder: {folder}\n\n```\n{text}\n```", 0)
        wanted = ("mean_accuracy", "clustering_accuracy", "ari", "train_loss")
        self.writer.add_hparams(self.params, {f"final/{k}": v for k, v in self.final.items() if k in wanted},
                                run_name=".")

    def close(self, failed: bool) -> None:
        self.writer.close()
        super().close(failed)


class MlflowTracker(Tracker):
    name = "mlflow"

    def open(self, run: RunInfo, params: dict[str, Any]) -> None:
        uri = mlflow_uri(run.config)
        try:
            self._open(run, params, uri)
        except Exception as exc:  # noqa: BLE001 - MLflow, its HTTP client and the OS each raise their own
            said = str(exc).strip().splitlines()
            raise ResourceUnavailableError(
                f"tracking: the MLflow store {uri} cannot be used ({type(exc).__name__}: "
                f"{said[0][:200] if said else ''}); set tracking.mlflow_uri (or $MLFLOW_TRACKING_URI) to a store "
                "that answers, or leave mlflow out of tracking.backends") from None

    def _open(self, run: RunInfo, params: dict[str, Any], uri: str) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        if uri.startswith("file:"):  # MLflow 3 wants an opt-in for its (maintained) file store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(uri)
        project = run.config.tracking.project or run.config.name
        experiment = self.client.get_experiment_by_name(project)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(project)
            except MlflowException:  # another trial created it meanwhile
                experiment_id = self.client.get_experiment_by_name(project).experiment_id
        else:
            experiment_id = experiment.experiment_id
        self.run_id = self.client.create_run(experiment_id, run_name=run.config.name,
                                             tags={"fltac_ray.run_dir": str(run.run_dir.resolve())}).info.run_id
        items = [Param(key, str(value)[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=items[start:start + 100])
        run.say(f"  tracking: MLflow run {self.run_id} in experiment {project!r} at {uri}")

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()])

    def log_adapters(self, folder: Path) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path="adapters")

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
        super().close(failed)


class WandbTracker(Tracker):
    name = "wandb"

    def open(self, run: RunInfo, params: dict[str, Any]) -> None:
        import wandb

        mode = wandb_mode(run.config)
        project = run.config.tracking.project or run.config.name
        self.name_ = run.config.name
        # silent, no console capture: the run's own progress output stays as it is
        self.run = wandb.init(project=project, name=run.config.name, config=params, mode=mode,
                              dir=str(run.run_dir), reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off"))
        where = f"offline in {run.run_dir / 'wandb'} (wandb sync uploads it)" if mode == "offline" else mode
        run.say(f"  tracking: W&B run {self.run.id} in project {project!r}, {where}")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_adapters(self, folder: Path) -> None:
        import wandb

        artifact = wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]", "-", f"{self.name_}-adapters"), type="model")
        artifact.add_dir(str(folder))
        self.run.log_artifact(artifact)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)
        super().close(failed)


TRACKER_CLASSES: dict[str, type[Tracker]] = {
    tracker.name: tracker for tracker in (TensorBoardTracker, MlflowTracker, WandbTracker)}


def make_trackers(config: ExperimentConfig) -> list[Tracker]:
    return [TRACKER_CLASSES[name]() for name in config.tracking.backends]
