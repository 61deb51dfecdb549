"""Ray Tune sweeps over any experiment field. The only module that imports ray.tune.

A sweep file names a base experiment, fixed overrides (`set`) and a search space over dotted
config keys; each trial is one simulation whose driver, coordinator and worker actors live in
the trial's placement group (so concurrent trials never oversubscribe the cluster or deadlock).

Where things go, so that a sweep works on any number of nodes:
- Ray Tune persists every trial in its `storage` (a folder every node shares, or a URI Ray Tune
  accepts: s3://, gs://); on one node it defaults to the sweep folder itself. Several nodes and
  no storage: refused before any trial starts.
- A trial's run directory is `run/` inside Tune's own trial directory (its working directory on
  whatever node runs it), synced to the storage at every report with the trial's other
  artifacts; at the end the sweep folder gets a copy of every trial's run directory under
  `trials/<trial id>/` (engine checkpoints stay in the storage).
- Every round reports its metrics with a Tune checkpoint holding the round's engine checkpoint
  and the run's tables, so ASHA can stop weak trials early and an interrupted sweep resumes
  (`--resume`) with every trial continuing from its last round, on any node; Tune keeps the
  newest `keep_checkpoints` of them per trial.
- The adapters are exported after every round, so a trial the scheduler stops still leaves the
  adapters of its last reported round.
- The data is prepared once by the sweep's driver and put in the object store, shared by every
  trial whose searched keys do not change it (engine/ray/shared_data.py); the base model is never in
  the object store: each node keeps one copy in its cache folder (models/base_cache.py).

One trial name everywhere: Ray Tune's trial id (`a1b2c_00003`), which names the trial's folder
in the storage, its row in sweep.csv, its folder under trials/ and its run (with the experiment
name). The best trial is the one with the best metric at its last reported round; ties go to the
trial that ran more rounds, then to the smaller trial id (`rank_trials`), in the printed table,
best.json and `fltac_ray.load_result(sweep)` alike.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import tune

from fltac_ray.config import apply_overrides, build_config, read_yaml
from fltac_ray.engine.callbacks import Callback, RoundContext, RunInfo
from fltac_ray.engine.ray.shared_data import changes_data
from fltac_ray.errors import ConfigError, ConfigIssue
from fltac_ray.progress import Progress

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
REPORTED = ["round", "mean_accuracy", "clustering_accuracy", "ari", "train_loss", "bytes_up",
            "params_up_per_client", "seconds"]
RUN_FOLDER = "run"  # the trial's run directory inside Tune's trial directory
BEST_FILE = "best.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SchedulerSpec(_Strict):
    name: Literal["asha", "fifo"] = Field(default="asha", description="ASHA early stopping or none.")
    grace_period: int = Field(default=1, ge=1, description="Rounds every trial runs before ASHA may stop it.")
    reduction_factor: float = Field(default=2.0, gt=1, description="ASHA keeps 1/reduction_factor per rung.")


class TrialSpec(_Strict):
    workers: int = Field(default=1, ge=1, description="Client worker actors per trial.")
    cpus_per_worker: float = Field(default=0.95, gt=0, description="CPUs per worker actor.")
    gpus_per_worker: float | None = Field(
        default=None, ge=0,
        description="GPUs per worker actor. Default: 1 when the cluster has GPUs (each worker its "
        "own GPU, so trials spread over them), else 0. Ray fills one GPU with fractional "
        "requests before using the next.")
    driver_cpus: float = Field(default=0.05, gt=0, description="CPUs for the trial's driver (mostly waits).")


class SweepSpec(_Strict):
    name: str = Field(default="sweep", min_length=1)
    experiment: str = Field(description="Base experiment YAML, relative to the sweep file.")
    set: dict[str, Any] = Field(default_factory=dict, description="Fixed dotted-key overrides for every trial.")
    search: dict[str, dict[str, Any]] = Field(min_length=1, description="Dotted key -> {grid|choice|uniform|loguniform|randint: values}.")
    metric: str = Field(default="mean_accuracy", description=f"Per-round metric to optimise: one of {REPORTED}.")
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(default=1, ge=1, description="Repeats of the grid (random dims are redrawn).")
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    trial: TrialSpec = Field(default_factory=TrialSpec)
    output_dir: str = "runs"
    storage: str | None = Field(
        default=None,
        description="Where Ray Tune persists the trials: a folder every node can write (shared "
        "file system) or a URI Ray Tune accepts (s3://..., gs://...). Required on a cluster of "
        "several nodes; default on one node: the sweep folder. --storage overrides it.")
    keep_checkpoints: int = Field(default=2, ge=1, description="Newest Tune checkpoints kept per trial.")
    share_data: bool = Field(
        default=True,
        description="Prepare the data once and share it through the object store with every "
        "trial whose searched keys leave it unchanged (false: each trial prepares its own).")

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        if self.metric not in REPORTED and not self.metric.startswith("accuracy/"):
            raise ValueError(f"metric = {self.metric!r}: use one of {REPORTED} or accuracy/<task>")
        for key, dist in self.search.items():
            if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
                raise ValueError(f"search.{key} = {dist!r}: give exactly one of {list(DISTRIBUTIONS)}")
            kind, values = next(iter(dist.items()))
            if not isinstance(values, list) or not values:
                raise ValueError(f"search.{key}.{kind} = {values!r}: must be a non-empty list")
            if kind in ("uniform", "loguniform", "randint") and (len(values) != 2 or values[0] >= values[1]):
                raise ValueError(f"search.{key}.{kind} = {values!r}: must be [low, high] with low < high")
        return self


def _overrides(values: dict[str, Any]) -> list[str]:
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in values.items()]


def _trial_raw(base_raw: dict, spec: SweepSpec, params: dict[str, Any], trial_id: str | None = None,
               gpus_per_worker: float = 0.0) -> dict:
    raw = apply_overrides(copy.deepcopy(base_raw), _overrides({**spec.set, **params}))
    if trial_id is not None:  # names the run (and its dashboard metrics, tracked runs) after the trial
        raw["name"] = f"{raw.get('name', 'experiment')}_{trial_id}"
    engine = raw.setdefault("engine", {})
    # Inside a trial the worker pool is the trial's placement group, not the whole cluster; every
    # round is checkpointed (Tune's checkpoint carries it; the run folder keeps only the newest).
    engine.update({"num_workers": spec.trial.workers, "cpus_per_worker": spec.trial.cpus_per_worker,
                   "gpus_per_worker": gpus_per_worker, "clients_per_actor": None,
                   "checkpoint_every": 1, "keep_checkpoints": 1})
    return raw


def load_sweep(path: str | Path) -> tuple[SweepSpec, dict]:
    """Read and validate a sweep file and every grid combination of its trials, before Ray."""
    path = Path(path)
    raw = read_yaml(path)
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        issues = [ConfigIssue(".".join(str(p) for p in e["loc"]) or "(sweep)", e.get("input"),
                              e["msg"].removeprefix("Value error, ")) for e in exc.errors()]
        raise ConfigError(issues, str(path)) from None
    base_raw = read_yaml(path.parent / spec.experiment)
    # Every grid/choice value (and each range's bounds) must make a valid experiment.
    axes = []
    for key, dist in spec.search.items():
        kind, values = next(iter(dist.items()))
        axes.append([(key, v) for v in values])
    combinations = list(itertools.islice(itertools.product(*axes), 512))
    issues: list[ConfigIssue] = []
    for combination in combinations:
        try:
            build_config(_trial_raw(base_raw, spec, dict(combination)))
        except ConfigError as exc:
            where = ", ".join(f"{k}={v}" for k, v in combination)
            issues.extend(ConfigIssue(f"search [{where}]: {i.field}", i.value, i.allowed) for i in exc.issues)
    if issues:
        raise ConfigError(issues[:20], str(path))
    return spec, base_raw


def _space(spec: SweepSpec) -> dict:
    makers = {"grid": tune.grid_search, "choice": tune.choice,
              "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
              "randint": lambda v: tune.randint(*v)}
    return {key: makers[kind](values) for key, dist in spec.search.items() for kind, values in dist.items()}


# --- where the trials are persisted ----------------------------------------------------------------
def resolve_storage(storage: str | None, sweep_dir: Path, nodes: int) -> tuple[str, str]:
    """(Ray Tune's storage_path, the sweep's folder name in it). No storage: the sweep folder
    itself on one node, refused on several (a folder on the head is not where trials on other
    nodes can write). A local path is made absolute (Tune changes each trial's working
    directory) and must be writable; a URI must name a file system pyarrow knows."""
    if storage is None:
        if nodes > 1:
            raise ConfigError([ConfigIssue(
                "--storage", None,
                f"the cluster has {nodes} nodes, and trials on the others cannot write to "
                f"{sweep_dir.resolve()} on this one: give a folder every node shares (an NFS "
                "mount), or a cloud URI Ray Tune accepts (s3://bucket/path, gs://bucket/path), "
                "as --storage or `storage:` in the sweep file")])
        return str(sweep_dir.resolve()), "tune"
    if "://" in storage and not storage.startswith("file://"):
        import pyarrow.fs

        try:
            pyarrow.fs.FileSystem.from_uri(storage)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a bad URI
            raise ConfigError([ConfigIssue("--storage", storage, f"not a storage URI pyarrow can open ({exc}); "
                                           "use a shared folder, s3://bucket/path or gs://bucket/path")]) from None
        return storage.rstrip("/"), sweep_dir.name
    from fltac_ray.runs.outputs import folder_problem

    path = Path(storage.removeprefix("file://")).expanduser().resolve()
    if (problem := folder_problem(path)) is not None:
        raise ConfigError([ConfigIssue("--storage", storage, f"is not a writable folder ({problem})")])
    return str(path), sweep_dir.name


def _storage_fs(storage: str):
    """(pyarrow file system, path in it) of a storage location."""
    import pyarrow.fs

    if "://" in storage:
        return pyarrow.fs.FileSystem.from_uri(storage)
    return pyarrow.fs.LocalFileSystem(), storage


def collect_trial_runs(storage: str, experiment: str, trials: list[str], sweep_dir: Path) -> list[str]:
    """Copy each trial's run directory from the storage to sweep_dir/trials/<trial id>/, leaving
    its engine checkpoints there; returns the trials that had none (failed before round 1)."""
    import pyarrow.fs

    filesystem, root = _storage_fs(storage)
    local = pyarrow.fs.LocalFileSystem()
    missing = []
    for trial in trials:
        source = f"{root}/{experiment}/{trial}/{RUN_FOLDER}"
        files = [info for info in filesystem.get_file_info(pyarrow.fs.FileSelector(source, recursive=True,
                                                                                  allow_not_found=True))
                 if info.type == pyarrow.fs.FileType.File]
        if not files:
            missing.append(trial)
            continue
        target = sweep_dir / "trials" / trial
        shutil.rmtree(target, ignore_errors=True)
        for info in files:  # paths as the file system gives them, under `source`
            relative = info.path[len(source.rstrip("/")) + 1:]
            if relative.split("/", 1)[0] == "checkpoints":
                continue
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            pyarrow.fs.copy_files(info.path, str(target / relative), source_filesystem=filesystem,
                                  destination_filesystem=local)
    return missing


# --- the trial ----------------------------------------------------------------------------------
def _staging(trial_id: str) -> Path:
    return Path(tempfile.gettempdir()) / "fltac-ray-tune" / trial_id


def stage_checkpoint(run_dir: Path, engine_checkpoint: Path, folder: Path) -> Path:
    """A Tune checkpoint folder: the round's engine checkpoint (engine/) and the run's tables and
    config (run/), everything a trial needs to continue on any node."""
    shutil.rmtree(folder, ignore_errors=True)
    (folder / RUN_FOLDER).mkdir(parents=True)
    for path in run_dir.iterdir():
        if path.is_file() and path.suffix in (".csv", ".yaml", ".json"):
            shutil.copy2(path, folder / RUN_FOLDER / path.name)
    shutil.copytree(engine_checkpoint, folder / "engine" / engine_checkpoint.name)
    return folder


def restore_run_dir(checkpoint: Path, run_dir: Path) -> None:
    """The trial's run directory rebuilt from a Tune checkpoint (stage_checkpoint's layout)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(checkpoint / RUN_FOLDER, run_dir)
    for engine_checkpoint in (checkpoint / "engine").iterdir():
        shutil.copytree(engine_checkpoint, run_dir / "checkpoints" / engine_checkpoint.name)


class _TuneReporter(Callback):
    """Round callback: one tune.report per round (integer round), with a Tune checkpoint of the
    round (stage_checkpoint). The exporter ran before it, so the reported round's adapters are in
    the run directory when Tune syncs it."""

    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id
        self.last: dict[str, float | int] = {}

    def on_round_end(self, run: RunInfo, ctx: RoundContext) -> None:
        metrics: dict[str, float | int] = {key: float(ctx.row[key]) for key in REPORTED if key in ctx.row}
        for task_row in ctx.task_rows:
            metrics[f"accuracy/{task_row['task']}"] = float(task_row["accuracy"])
        # A rejected round has no evaluation: repeat the last values so schedulers can compare.
        metrics = {**self.last, **{k: v for k, v in metrics.items() if v == v}, "round": ctx.round_index}
        self.last = metrics
        path = ctx.artifacts.get("checkpoint")
        checkpoint = None
        if path is not None:
            folder = stage_checkpoint(run.run_dir, Path(path), _staging(self.trial_id))
            checkpoint = tune.Checkpoint.from_directory(str(folder))
        tune.report(metrics, checkpoint=checkpoint)

    def on_stop(self, run: RunInfo, failed: bool) -> None:
        shutil.rmtree(_staging(self.trial_id), ignore_errors=True)


def _trial(params: dict, spec_raw: dict, base_raw: dict, gpus_per_worker: float, shared) -> None:
    from fltac_ray.engine.ray.gpu_visibility import hide_unassigned_gpus
    from fltac_ray.engine.simulation import Simulation

    hide_unassigned_gpus()  # the trial's driver holds no GPU: its workers get theirs from Ray
    # Ray Train logs every persisted checkpoint at INFO, which Ray forwards to the sweep's terminal
    logging.getLogger("ray.train").setLevel(logging.WARNING)

    spec = SweepSpec.model_validate(spec_raw)
    context = tune.get_context()
    trial_id = context.get_trial_id()
    config = build_config(_trial_raw(base_raw, spec, params, trial_id, gpus_per_worker))
    if config.tracking.project is None:  # the trials of one sweep: runs of one tracked project
        config.tracking.project = spec.name
    # Tune's trial directory on this node (the trial's working directory), synced to the storage
    run_dir = Path(context.get_trial_dir()) / RUN_FOLDER
    options = {"progress": Progress(quiet=True), "callbacks": [_TuneReporter(trial_id)],
               "shared_data": shared, "export_every_round": True}
    restored = tune.get_checkpoint()
    if restored is not None:  # a resumed sweep or a retried trial, perhaps on another node
        with restored.as_directory() as folder:
            restore_run_dir(Path(folder), run_dir)
        simulation = Simulation.resume(run_dir, **options)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # a trial restarted before its first round
        simulation = Simulation(config, out=str(run_dir), **options)
    simulation.run()


def _trial_folder(trial) -> str:
    """The trial's folder in the storage: its id, the name used everywhere."""
    return trial.trial_id


def trial_bundles(spec: SweepSpec, gpus_per_worker: float, coordinator_cpus: float,
                  coordinator_gpus: float) -> list[dict[str, float]]:
    """The trial's placement group: its driver, its coordinator when that reserves anything,
    and its workers (each with its GPU share)."""
    bundles = [{"CPU": spec.trial.driver_cpus}]
    coordinator = {name: amount for name, amount in (("CPU", coordinator_cpus), ("GPU", coordinator_gpus)) if amount}
    if coordinator:
        bundles.append(coordinator)
    worker = {"CPU": spec.trial.cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    return bundles + [dict(worker) for _ in range(spec.trial.workers)]


def bundle_problem(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> str | None:
    """Why some bundle fits on no node (each node's total resources), or None."""
    for bundle in bundles:
        if not any(all(node.get(name, 0.0) >= amount for name, amount in bundle.items()) for node in nodes):
            shape = " + ".join(f"{amount:g} {name}" for name, amount in bundle.items())
            have = "; ".join(f"{node.get('CPU', 0):g} CPU, {node.get('GPU', 0):g} GPU" for node in nodes)
            return f"no node has {shape} for one bundle of a trial (the nodes have: {have})"
    return None


_TERMINAL = None  # where SweepProgress writes while run_sweep mutes Ray Tune's own stdout


class SweepProgress(tune.Callback):
    """One line per trial start, result and end, in fltac-ray's words (instead of Ray Tune's
    tables, whose "current best trial" follows another tie rule than rank_trials)."""

    def __init__(self, keys: list[str], metric: str, rounds: int) -> None:
        self.keys, self.metric, self.rounds = keys, metric, rounds

    def _say(self, line: str) -> None:
        # the terminal run_sweep saw before muting Tune's stdout (kept at module level: Tune
        # pickles its callbacks with the experiment state, and a stream does not pickle)
        print(line, file=_TERMINAL or sys.stdout, flush=True)

    def _label(self, trial) -> str:
        return ", ".join(f"{key.rsplit('.', 1)[-1]}={trial.config.get(key)}" for key in self.keys)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._say(f"  trial {trial.trial_id} ({self._label(trial)}) started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric, float("nan"))
        self._say(f"  trial {trial.trial_id} ({self._label(trial)}) round {result.get('round')}/"
                  f"{self.rounds}: {self.metric} {value:.4f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = (trial.last_result or {}).get("round", 0)
        how = "finished" if last == self.rounds else f"stopped by the scheduler after round {last}"
        self._say(f"  trial {trial.trial_id} ({self._label(trial)}) {how}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._say(f"  trial {trial.trial_id} ({self._label(trial)}) FAILED (its error: {trial.path})")


def _tuner(spec: SweepSpec, base_raw: dict, storage: str, experiment: str, restore: bool, rounds: int,
           bundles: list[dict[str, float]], gpus_per_worker: float, shared, quiet: bool):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    trainable = tune.with_resources(
        tune.with_parameters(_trial, spec_raw=spec.model_dump(mode="json"), base_raw=base_raw,
                             gpus_per_worker=gpus_per_worker, shared=shared),
        tune.PlacementGroupFactory(bundles),
    )
    if restore:
        return tune.Tuner.restore(f"{storage}/{experiment}", trainable=trainable, resume_errored=True)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=rounds,
                               grace_period=min(spec.scheduler.grace_period, rounds),
                               reduction_factor=spec.scheduler.reduction_factor)
                 if spec.scheduler.name == "asha" else FIFOScheduler())
    return tune.Tuner(
        trainable,
        param_space=_space(spec),
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler,
                                    num_samples=spec.num_samples,
                                    max_concurrent_trials=spec.max_concurrent_trials,
                                    trial_dirname_creator=_trial_folder),
        run_config=tune.RunConfig(
            name=experiment, storage_path=storage, verbose=0,
            callbacks=[] if quiet else [SweepProgress(list(spec.search), spec.metric, rounds)],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.keep_checkpoints),
            sync_config=tune.SyncConfig(sync_artifacts=True, sync_artifacts_on_checkpoint=True)),
    )


# --- results ------------------------------------------------------------------------------------
def sweep_table(results, spec: SweepSpec) -> pd.DataFrame:
    """One row per (trial, reported round), with the trial's searched values as columns."""
    frames = []
    for result in results:
        frame = result.metrics_dataframe
        if frame is None or frame.empty:
            continue
        keep = [c for c in frame.columns if c in REPORTED or c.startswith("accuracy/")]
        frame = frame[keep].copy()
        frame["round"] = frame["round"].astype(int)
        for key in spec.search:
            frame.insert(0, key, result.config.get(key))
        frame.insert(0, "trial", Path(result.path).name)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def rank_trials(table: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """Each trial's last reported round, best first: by `metric`, then more rounds, then the
    smaller trial id (the one tie rule of every sweep output)."""
    last = table.sort_values("round").groupby("trial").tail(1)
    return last.sort_values([metric, "round", "trial"], ascending=[mode == "min", False, True],
                            na_position="last").reset_index(drop=True)


class StorePeak:
    """The object store's peak usage over the cluster while a sweep runs, sampled twice a second
    (Ray's memory summary: what `ray memory --stats-only` prints)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def used_bytes() -> int:
        import re

        from ray._private.internal_api import memory_summary

        match = re.search(r"Plasma memory usage ([\d.]+) MiB", memory_summary(stats_only=True))
        return int(float(match.group(1)) * 2**20) if match else 0

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.peak = max(self.peak, self.used_bytes())
            except Exception:  # noqa: BLE001 - a probe never stops the sweep
                return

    def __enter__(self) -> StorePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _resolve_trial_gpus(spec: SweepSpec, say) -> float:
    from fltac_ray.engine.ray.pool import cluster_gpus_per_worker
    from fltac_ray.engine.ray.session import cluster_totals

    if spec.trial.gpus_per_worker is not None:
        gpus = spec.trial.gpus_per_worker
    else:
        gpus = cluster_gpus_per_worker(cluster_totals()[1])
    if 0 < gpus < 1:
        say(f"  trial.gpus_per_worker = {gpus:g}: Ray places fractional GPU requests on one GPU until "
            "it is full, then on the next; use 1 to give every worker its own GPU")
    return gpus


def run_sweep(path: str | Path | None, out: str | None, progress: Progress, resume: str | None = None,
              storage: str | None = None):
    """Run (or resume) a sweep; returns (sweep folder, tidy table, best row)."""
    import ray

    from fltac_ray.engine.ray.session import ray_session
    from fltac_ray.runs.outputs import make_run_dir

    if resume is not None:
        sweep_dir = Path(resume).resolve()
        saved = sweep_dir / "sweep.yaml"
        if not saved.is_file():
            raise ConfigError([ConfigIssue("--resume", str(sweep_dir), "is not a sweep folder (no sweep.yaml)")])
        stored = read_yaml(saved)
        spec, base_raw = SweepSpec.model_validate(stored["sweep"]), stored["base"]
        if storage is not None and storage != spec.storage:
            raise ConfigError([ConfigIssue("--storage", storage, f"this sweep keeps its trials in {spec.storage}; "
                                           "resume without --storage")])
    else:
        spec, base_raw = load_sweep(path)
        if storage is not None:
            spec = spec.model_copy(update={"storage": storage})
        sweep_dir = make_run_dir(spec.output_dir, spec.name, out).resolve()
    base_config = build_config(_trial_raw(base_raw, spec, {}))
    started = time.perf_counter()
    say = progress.say
    # Tune warns when trials checkpoint more often than every 5 s; a round per report is how
    # ASHA and --resume work here, and short rounds are no bottleneck worth a warning
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    with ray_session(base_config.engine, say):
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        storage_path, experiment = resolve_storage(spec.storage, sweep_dir, len(nodes))
        if resume is None:  # the resolved storage, so that --resume finds the trials
            spec = spec.model_copy(update={"storage": storage_path if storage_path != str(sweep_dir) else None})
            (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(
                {"sweep": spec.model_dump(mode="json"), "base": base_raw,
                 "tune": {"storage_path": storage_path, "experiment": experiment}}, sort_keys=False))
        gpus = _resolve_trial_gpus(spec, say)
        engine = base_config.engine
        bundles = trial_bundles(spec, gpus, engine.coordinator_cpus, engine.coordinator_gpus)
        if (problem := bundle_problem(bundles, nodes)) is not None:
            if engine.ray_address is None:
                raise ConfigError([ConfigIssue("trial", spec.trial.model_dump(), problem)])
            say(f"  note: {problem}; the trials wait for a node that has it (an autoscaler may add one)")
        say(f"[fltac-ray] sweep {spec.name}: {', '.join(spec.search)} -> {sweep_dir}")
        say(f"  trials persisted in {storage_path}/{experiment} ({len(nodes)} node(s)); each trial: "
            + " + ".join("{" + ", ".join(f"{a:g} {n}" for n, a in b.items()) + "}" for b in bundles))
        shared = None
        changing = [key for key in spec.search if changes_data(key)]
        if spec.share_data and not changing:
            from fltac_ray.engine.ray.shared_data import share_data

            shared = share_data(base_config)
            say(f"  data prepared once: {shared.nbytes / 2**20:,.1f} MiB in the object store, shared by every trial")
        elif changing:
            say(f"  searched {', '.join(changing)} changes the data: each trial prepares its own")
        # Tune's driver-side reporter prints its header box and a TensorBoard hint into Ray's temp
        # folder even at verbose=0: its stdout is muted, and SweepProgress writes to the terminal
        global _TERMINAL
        _TERMINAL = sys.stdout
        try:
            with StorePeak() as store, contextlib.redirect_stdout(io.StringIO()):
                results = _tuner(spec, base_raw, storage_path, experiment, resume is not None, base_config.rounds,
                                 bundles, gpus, shared, progress.quiet).fit()
        finally:
            _TERMINAL = None
        table = sweep_table(results, spec)
        shared_bytes = shared.nbytes if shared is not None else 0
        del shared  # the store's copy goes with the last reference
    table.to_csv(sweep_dir / "sweep.csv", index=False)
    if table.empty:
        raise ConfigError([ConfigIssue("sweep", spec.name, "no trial reported a round (see the trial errors above)")])
    for trial in table["trial"].unique():  # staged checkpoints of trials stopped inside tune.report
        shutil.rmtree(_staging(trial), ignore_errors=True)
    missing = collect_trial_runs(storage_path, experiment, sorted(table["trial"].unique()), sweep_dir)
    if missing:
        say(f"  warning: no run directory in the storage for trials {missing}")
    failed = sorted(Path(result.path).name for result in results if result.error is not None)
    if failed:
        print(f"fltac-ray: warning: {len(failed)} trial(s) failed: {', '.join(failed)} (their errors: "
              f"{storage_path}/{experiment}/<trial>/error.txt); `fltac-ray tune --resume {sweep_dir}` "
              "continues them from their last round", file=sys.stderr)
    ranked = rank_trials(table, spec.metric, spec.mode)
    best = ranked.iloc[0]
    adapters = sweep_dir / "trials" / best["trial"] / "adapters"
    (sweep_dir / BEST_FILE).write_text(json.dumps({
        "trial": best["trial"], "params": {k: _plain(best[k]) for k in spec.search},
        "metric": spec.metric, "mode": spec.mode, "value": float(best[spec.metric]), "round": int(best["round"]),
        "run_dir": f"trials/{best['trial']}", "adapters": f"trials/{best['trial']}/adapters",
        "tie_rule": "best metric at the trial's last reported round, then more rounds, then the smaller trial id",
        "store_peak_bytes": store.peak, "shared_data_bytes": shared_bytes,
    }, indent=2))
    say(f"\n[fltac-ray] sweep done in {time.perf_counter() - started:.0f}s: {len(ranked)} trials, "
        f"{len(table)} trial-rounds in {sweep_dir / 'sweep.csv'}; object store peak {store.peak / 2**20:,.1f} MiB")
    say(ranked[["trial", *spec.search, "round", spec.metric]].to_string(index=False))
    searched = ", ".join(f"{k}={best[k]}" for k in spec.search)
    say(f"best: trial {best['trial']} ({searched}) -> {spec.metric} {best[spec.metric]:.4f} after round "
        f"{int(best['round'])}; adapters in {adapters}")
    return sweep_dir, table, best


def _plain(value: Any) -> Any:
    """numpy scalars as JSON numbers."""
    return value.item() if hasattr(value, "item") else value
