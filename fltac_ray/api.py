"""The Python API for notebooks and scripts: `fltac_ray.run(config) -> Result`.

    import fltac_ray

    result = fltac_ray.run("experiments/offline_text.yaml", overrides=["rounds=3"], quiet=True)
    result.final                 # final accuracy per task (DataFrame)
    result.metrics               # one row per (round, task)
    result.rounds                # one row per round: clustering accuracy, bytes, timings
    result.adapters              # the exported cluster adapters, with their folders
    model = result.load_adapter(0)   # plain peft model of cluster 0

A comparison (a config with a `compare:` list) returns a ComparisonResult holding one Result per
entry. `fltac_ray.load_result(run_dir)` reads a finished run (or comparison) back.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fltac_ray.config import ExperimentConfig, apply_overrides, build_config, read_yaml
from fltac_ray.errors import ConfigError, ConfigIssue
from fltac_ray.progress import Progress
from fltac_ray.reporting.runs import RunTables, read_runs
from fltac_ray.runs.outputs import final_round_metrics


@dataclass
class Result:
    """One finished run, read from its run directory."""

    run_dir: Path
    config: dict[str, Any]  # config.yaml: the resolved configuration
    metrics: pd.DataFrame  # one row per (round, task): accuracy, loss, majority_accuracy, ...
    rounds: pd.DataFrame  # one row per round: clustering_accuracy, ari, bytes_up, seconds, ...
    clients: pd.DataFrame  # one row per (round, client, task): personalised accuracy and loss
    partition: pd.DataFrame  # one row per (client, task): Dirichlet share, train/test counts
    adapters: pd.DataFrame  # one row per exported adapter: cluster, majority_task, purity, path
    report: Path | None = None  # report.html when one was rendered

    @classmethod
    def from_tables(cls, tables: RunTables) -> Result:
        adapters = pd.DataFrame(tables.adapters)
        if len(adapters):
            adapters["path"] = [str(tables.run_dir / "adapters" / folder) for folder in adapters["folder"]]
        report = tables.run_dir / "report.html"
        return cls(tables.run_dir, tables.config, tables.metrics, tables.rounds, tables.clients,
                   tables.partition, adapters, report if report.is_file() else None)

    @property
    def final(self) -> pd.DataFrame:
        """The last evaluated round: one row per task (accuracy, loss, majority_accuracy, ...)."""
        if self.metrics.empty:
            return self.metrics
        return final_round_metrics(self.metrics).set_index("task").drop(columns=["round"])

    @property
    def mean_accuracy(self) -> float:
        return float(self.final["accuracy"].mean()) if len(self.final) else float("nan")

    def load_adapter(self, cluster: int = 0):
        """The exported adapter of `cluster` on its base model, loaded with peft
        (fltac_ray.runs.export.load_adapter: a classifier's call on standard inputs gives logits)."""
        from fltac_ray.runs.export import load_adapter

        if self.adapters.empty or cluster not in set(self.adapters["cluster"]):
            raise ConfigError([ConfigIssue("cluster", cluster, f"this run exported clusters "
                                           f"{sorted(self.adapters.get('cluster', []))}")])
        path = self.adapters.loc[self.adapters["cluster"] == cluster, "path"].iloc[0]
        return load_adapter(path)

    def client_examples(self, client: int, task: str, split: str = "test") -> pd.DataFrame:
        """The examples `client` held of `task` in this run (`split`: "test" or "train"), rebuilt
        from the run's config.yaml (the partition is seeded; nothing is encoded): one row per
        example, `index` (its position in the task's split, as the engine numbers it), `label`,
        `class` and the raw input: `text` (and `pair` for sentence pairs; for instructions,
        `text` is the prompt and `pair` the reference), `image` ((channels, h, w) uint8) or
        `features`. The rows where clients.csv scored the client; empty when it held no such
        example."""
        from fltac_ray.config import load_config
        from fltac_ray.data.federated import client_examples

        config = load_config(self.run_dir / "config.yaml")
        issues = [ConfigIssue(name, value, allowed) for name, value, allowed, bad in (
            ("split", split, "use 'train' or 'test'", split not in ("train", "test")),
            ("task", task, f"this run's tasks are {config.data.task_names}", task not in config.data.task_names),
            ("client", client, f"this run has clients 0-{config.data.num_clients - 1}",
             not 0 <= int(client) < config.data.num_clients)) if bad]
        if issues:
            raise ConfigError(issues)
        indices, examples = client_examples(config, int(client), task, split)
        frame = pd.DataFrame({"index": indices, "label": examples.labels})
        frame["class"] = [examples.class_names[label] if examples.class_names else "" for label in examples.labels]
        for column, values in (("text", examples.texts), ("pair", examples.pairs), ("image", examples.images),
                               ("features", examples.features)):
            if values is not None:
                frame[column] = list(values)
        return frame


@dataclass
class ComparisonResult:
    """Several algorithms on one partition: a Result per entry plus the side-by-side tables."""

    run_dir: Path
    runs: dict[str, Result] = field(default_factory=dict)  # label -> Result, in file order
    comparison: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per (label, round, task)
    summary: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per label
    report: Path | None = None


@dataclass
class SweepResult(ComparisonResult):
    """A Ray Tune sweep: a Result per trial (`runs`, by trial id), sweep.csv (`comparison`), and
    the best trial (`best`, as best.json names it: tune.rank_trials' rule)."""

    best: Result | None = None
    best_trial: str = ""
    best_info: dict[str, Any] = field(default_factory=dict)  # best.json: params, metric, value, round

    def load_adapter(self, cluster: int = 0):
        """The best trial's exported adapter of `cluster`, loaded with plain peft."""
        if self.best is None:
            raise ConfigError([ConfigIssue("sweep", str(self.run_dir), "names no best trial (no best.json)")])
        return self.best.load_adapter(cluster)


def load_result(run_dir: str | Path) -> Result | ComparisonResult:
    """Read a finished (or interrupted) run directory; a comparison folder gives a
    ComparisonResult, a sweep folder a SweepResult (`best` is the best trial's Result)."""
    import json

    kind, tables = read_runs(run_dir)
    if kind == "run":
        return Result.from_tables(tables[0])
    root = Path(run_dir)

    def csv(name: str) -> pd.DataFrame:
        return pd.read_csv(root / name) if (root / name).is_file() else pd.DataFrame()

    report = root / "report.html"
    if kind == "sweep":
        runs = {t.run_dir.name: Result.from_tables(t) for t in tables}
        best_file = root / "best.json"
        info = json.loads(best_file.read_text()) if best_file.is_file() else {}
        trial = info.get("trial", "")
        return SweepResult(root, runs, csv("sweep.csv"), pd.DataFrame(), report if report.is_file() else None,
                           best=runs.get(trial), best_trial=trial, best_info=info)
    return ComparisonResult(root, {t.label: Result.from_tables(t) for t in tables}, csv("comparison.csv"),
                            csv("summary.csv"), report if report.is_file() else None)


def _raw_config(config: str | Path | dict[str, Any] | ExperimentConfig) -> tuple[dict[str, Any], str]:
    if isinstance(config, ExperimentConfig):
        return config.resolved(), "<ExperimentConfig>"
    if isinstance(config, dict):
        return copy.deepcopy(config), "<dict>"
    if isinstance(config, (str, Path)):
        return read_yaml(config), str(config)
    raise ConfigError([ConfigIssue("config", type(config).__name__,
                                   "give an experiment YAML path, a dict or an ExperimentConfig")])


def run(
    config: str | Path | dict[str, Any] | ExperimentConfig,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    quiet: bool = False,
    report: bool = True,
    projection: str = "auto",
    quick: bool = False,
) -> Result | ComparisonResult:
    """Run an experiment (a YAML path, a dict of fields, or an ExperimentConfig) and return its
    results. `overrides`: `"key=value"` strings as with `--set`; `out`: a new or empty run
    directory; `report`: render report.html and the figures at the end; `projection`: the
    report's adapter projection (auto, umap, pca); `quick`: the quick profile (fltac_ray/quick.py:
    in process, the modality's tiny model, 4 clients, 2 rounds; `overrides` still win). Invalid
    settings raise ConfigError before Ray starts. Inside an existing Ray session (ray.init in a
    notebook) the run uses it."""
    from fltac_ray.compare import run_comparison, variants_from_raw
    from fltac_ray.engine.simulation import Simulation
    from fltac_ray.reporting.render import check_projection

    check_projection(projection)
    raw, source = _raw_config(config)
    progress = Progress(quiet=quiet)
    overrides = list(overrides)
    if quick:
        from fltac_ray.quick import quick_overrides

        variants = variants_from_raw(raw, overrides, source)
        first = variants[0].config if variants is not None else build_config(apply_overrides(copy.deepcopy(raw),
                                                                                               overrides), source)
        changes = quick_overrides(first)
        progress.say(f"[fltac-ray] quick profile: {', '.join(changes)}")
        overrides = changes + overrides
    variants = variants_from_raw(raw, overrides, source)
    if variants is not None:
        run_dir, _ = run_comparison(variants, None if out is None else str(out), progress)
    else:
        experiment = build_config(apply_overrides(raw, overrides), source)
        run_dir = Simulation(experiment, out=None if out is None else str(out), progress=progress).run().run_dir
    if report:
        finish_with_report(run_dir, projection, progress)
    return load_result(run_dir)


def resume(run_dir: str | Path, quiet: bool = False, report: bool = True, projection: str = "auto") -> Result:
    """Continue an interrupted run from its newest valid checkpoint."""
    from fltac_ray.engine.simulation import Simulation
    from fltac_ray.reporting.render import check_projection

    check_projection(projection)
    progress = Progress(quiet=quiet)
    run_dir = Simulation.resume(run_dir, progress=progress).run().run_dir
    if report:
        finish_with_report(run_dir, projection, progress)
    result = load_result(run_dir)
    assert isinstance(result, Result)
    return result


def finish_with_report(run_dir: Path, projection: str, progress: Progress) -> Path | None:
    """Render the report at the end of a run. The results are on disk already, so a failure
    here costs only the figures: it is reported as a warning (`fltac-ray report` redraws them)."""
    import sys

    from fltac_ray.reporting.render import render_report

    try:
        report = render_report(run_dir, projection)
    except Exception as exc:  # noqa: BLE001 - any drawing failure must not hide finished results
        print(f"fltac-ray: warning: the report could not be drawn ({exc.__class__.__name__}: {exc}); "
              f"results are in {run_dir}; retry with `fltac-ray report {run_dir}`", file=sys.stderr)
        return None
    progress.say(f"[fltac-ray] report: {report.html} ({len(report.figures)} figures in {run_dir / 'report'})")
    return report.html
