"""Ray Tune sweeps over any experiment field. The only module that imports ray.tune.

A sweep file names a base experiment, fixed overrides (`set`) and a search space over dotted
config keys; each trial is one simulation whose worker actors live inside the trial's placement
group (so concurrent trials never oversubscribe the cluster or deadlock). Every round reports
its metrics with that round's engine checkpoint, so ASHA can stop weak trials early and an
interrupted sweep resumes (`--resume`) with every trial continuing from its last round.
"""

from __future__ import annotations

import copy
import itertools
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fltac_ray.config import apply_overrides, build_config, read_yaml
from fltac_ray.engine.callbacks import Callback, RoundContext, RunInfo
from fltac_ray.errors import ConfigError, ConfigIssue
from fltac_ray.progress import Progress

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
REPORTED = ["round", "mean_accuracy", "clustering_accuracy", "ari", "train_loss", "bytes_up",
            "params_up_per_client", "seconds"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SchedulerSpec(_Strict):
    name: Literal["asha", "fifo"] = Field(default="asha", description="ASHA early stopping or none.")
    grace_period: int = Field(default=1, ge=1, description="Rounds every trial runs before ASHA may stop it.")
    reduction_factor: float = Field(default=2.0, gt=1, description="ASHA keeps 1/reduction_factor per rung.")


class TrialSpec(_Strict):
    workers: int = Field(default=1, ge=1, description="Client worker actors per trial.")
    cpus_per_worker: float = Field(default=0.95, gt=0, description="CPUs per worker actor.")
    gpus_per_worker: float = Field(default=0.0, ge=0, description="GPUs per worker actor.")
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


def _trial_raw(base_raw: dict, spec: SweepSpec, params: dict[str, Any], trial_id: str | None = None) -> dict:
    raw = apply_overrides(copy.deepcopy(base_raw), _overrides({**spec.set, **params}))
    if trial_id is not None:  # names the run (and its dashboard metrics) after the trial
        raw["name"] = f"{raw.get('name', 'experiment')}_{trial_id}"
    engine = raw.setdefault("engine", {})
    # Inside a trial the worker pool is the trial's placement group, not the whole cluster.
    engine.update({"num_workers": spec.trial.workers, "cpus_per_worker": spec.trial.cpus_per_worker,
                   "gpus_per_worker": spec.trial.gpus_per_worker, "clients_per_actor": None})
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
    from ray import tune

    makers = {"grid": tune.grid_search, "choice": tune.choice,
              "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
              "randint": lambda v: tune.randint(*v)}
    return {key: makers[kind](values) for key, dist in spec.search.items() for kind, values in dist.items()}


class _TuneReporter(Callback):
    """Round callback: one tune.report per round, with the round's engine checkpoint."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def on_round_end(self, run: RunInfo, ctx: RoundContext) -> None:
        from ray import tune

        metrics = {key: float(ctx.row[key]) for key in REPORTED if key in ctx.row}
        for task_row in ctx.task_rows:
            metrics[f"accuracy/{task_row['task']}"] = float(task_row["accuracy"])
        # A rejected round has no evaluation: repeat the last values so schedulers can compare.
        metrics = {**self.last, **{k: v for k, v in metrics.items() if v == v}}
        self.last = metrics
        path = ctx.artifacts.get("checkpoint")
        checkpoint = tune.Checkpoint.from_directory(str(path)) if path is not None else None
        tune.report(metrics, checkpoint=checkpoint)


def _trial(params: dict, spec_raw: dict, base_raw: dict, sweep_dir: str) -> None:
    from ray import tune

    from fltac_ray.engine.gpu_visibility import hide_unassigned_gpus
    from fltac_ray.engine.simulation import Simulation

    hide_unassigned_gpus()  # the trial's driver holds no GPU: its workers get theirs from Ray

    spec = SweepSpec.model_validate(spec_raw)
    trial_id = tune.get_context().get_trial_id()
    config = build_config(_trial_raw(base_raw, spec, params, trial_id))
    run_dir = Path(sweep_dir) / "trials" / trial_id
    progress = Progress(quiet=True)
    if tune.get_checkpoint() is not None and any((run_dir / "checkpoints").glob("round_*")):
        simulation = Simulation.resume(run_dir, progress=progress, callbacks=[_TuneReporter()])
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # a trial restarted before its first round
        simulation = Simulation(config, out=str(run_dir), progress=progress, callbacks=[_TuneReporter()])
    simulation.run()


def _tuner(spec: SweepSpec, base_raw: dict, sweep_dir: Path, restore: bool, rounds: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    bundles = [{"CPU": spec.trial.driver_cpus}] + [
        {"CPU": spec.trial.cpus_per_worker, **({"GPU": spec.trial.gpus_per_worker} if spec.trial.gpus_per_worker else {})}
    ] * spec.trial.workers
    trainable = tune.with_resources(
        tune.with_parameters(_trial, spec_raw=spec.model_dump(mode="json"), base_raw=base_raw,
                             sweep_dir=str(sweep_dir)),
        tune.PlacementGroupFactory(bundles),
    )
    if restore:
        return tune.Tuner.restore(str(sweep_dir / "tune"), trainable=trainable, resume_errored=True)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=rounds,
                               grace_period=min(spec.scheduler.grace_period, rounds),
                               reduction_factor=spec.scheduler.reduction_factor)
                 if spec.scheduler.name == "asha" else FIFOScheduler())
    return tune.Tuner(
        trainable,
        param_space=_space(spec),
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler,
                                    num_samples=spec.num_samples,
                                    max_concurrent_trials=spec.max_concurrent_trials),
        run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir.resolve()), verbose=1),
    )


def sweep_table(results, spec: SweepSpec) -> pd.DataFrame:
    """One row per (trial, reported round), with the trial's searched values as columns."""
    frames = []
    for result in results:
        frame = result.metrics_dataframe
        if frame is None or frame.empty:
            continue
        keep = [c for c in frame.columns if c in REPORTED or c.startswith("accuracy/")]
        frame = frame[keep].copy()
        for key in spec.search:
            frame.insert(0, key, result.config.get(key))
        frame.insert(0, "trial", Path(result.path).name)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def run_sweep(path: str | Path | None, out: str | None, progress: Progress, resume: str | None = None):
    """Run (or resume) a sweep; returns (sweep folder, tidy table, best row)."""
    from fltac_ray.engine.ray_session import ray_session
    from fltac_ray.outputs import make_run_dir

    if resume is not None:
        sweep_dir = Path(resume)
        saved = sweep_dir / "sweep.yaml"
        if not saved.is_file():
            raise ConfigError([ConfigIssue("--resume", str(sweep_dir), "is not a sweep folder (no sweep.yaml)")])
        stored = yaml.safe_load(saved.read_text())
        spec, base_raw = SweepSpec.model_validate(stored["sweep"]), stored["base"]
    else:
        spec, base_raw = load_sweep(path)
        sweep_dir = make_run_dir(spec.output_dir, spec.name, out)
        (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(
            {"sweep": spec.model_dump(mode="json"), "base": base_raw}, sort_keys=False))
    base_config = build_config(_trial_raw(base_raw, spec, {}))
    started = time.perf_counter()
    progress.say(f"[fltac-ray] sweep {spec.name}: {', '.join(spec.search)} -> {sweep_dir}")
    with ray_session(base_config.engine):
        results = _tuner(spec, base_raw, sweep_dir, resume is not None, base_config.rounds).fit()
    table = sweep_table(results, spec)
    table.to_csv(sweep_dir / "sweep.csv", index=False)
    if table.empty:
        raise ConfigError([ConfigIssue("sweep", spec.name, "no trial reported a round (see the trial errors above)")])
    last = table.sort_values("round").groupby("trial").tail(1)
    best = (last.sort_values(spec.metric, ascending=spec.mode == "min").iloc[0])
    progress.say(f"\n[fltac-ray] sweep done in {time.perf_counter() - started:.0f}s: {len(last)} trials, "
                 f"{len(table)} trial-rounds in {sweep_dir / 'sweep.csv'}")
    shown = last[["trial", *spec.search, "round", spec.metric]].sort_values(spec.metric, ascending=spec.mode == "min")
    progress.say(shown.to_string(index=False))
    searched = ", ".join(f"{k}={best[k]}" for k in spec.search)
    progress.say(f"best: {searched} -> {spec.metric} {best[spec.metric]:.4f} after round {int(best['round'])}")
    return sweep_dir, table, best
