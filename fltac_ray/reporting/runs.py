"""Read what a run directory (or a comparison of several) holds, for the report and the API."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from fltac_ray.config import algorithm_name
from fltac_ray.errors import RunFolderError


@dataclass
class RunTables:
    label: str  # the comparison label, or the run's algorithm
    run_dir: Path
    config: dict[str, Any]  # config.yaml as saved (defaults filled in)
    metrics: pd.DataFrame  # one row per (round, task)
    rounds: pd.DataFrame  # one row per round
    clients: pd.DataFrame  # one row per (round, client, task)
    partition: pd.DataFrame  # one row per (client, task)
    adapters: list[dict[str, Any]] = field(default_factory=list)  # adapters/index.json
    params: dict[str, Any] = field(default_factory=dict)  # a sweep trial's searched values

    @property
    def algorithm(self) -> str:
        return algorithm_name(self.config.get("algorithm", "?"))

    @property
    def tasks(self) -> list[str]:
        return list(self.config.get("data", {}).get("tasks", []))


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "rounds.csv").is_file()


def read_run(run_dir: str | Path, label: str | None = None) -> RunTables:
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise RunFolderError(run_dir, "is not a run directory (needs config.yaml and rounds.csv)")
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}

    def table(name: str) -> pd.DataFrame:
        path = run_dir / name
        return pd.read_csv(path) if path.is_file() and path.stat().st_size else pd.DataFrame()

    index = run_dir / "adapters" / "index.json"
    return RunTables(
        label=label or algorithm_name(config.get("algorithm", run_dir.name)),
        run_dir=run_dir,
        config=config,
        metrics=table("metrics.csv"),
        rounds=table("rounds.csv"),
        clients=table("clients.csv"),
        partition=table("partition.csv"),
        adapters=json.loads(index.read_text()) if index.is_file() else [],
    )


def config_value(config: dict[str, Any], dotted: str) -> Any:
    """`model.lora.rank` -> config["model"]["lora"]["rank"] (None when absent)."""
    value: Any = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def sweep_spec(path: Path) -> dict[str, Any]:
    """The `sweep:` part of a sweep folder's sweep.yaml (search space, metric, ...)."""
    return (yaml.safe_load((path / "sweep.yaml").read_text()) or {}).get("sweep", {})


def read_sweep(path: Path) -> tuple[list[RunTables], dict[str, Any]]:
    """Every trial of a Ray Tune sweep folder (trials/<id>/), labelled by its searched values
    and ordered by them; and the sweep spec (sweep.yaml)."""
    spec = sweep_spec(path)
    keys = list(spec.get("search", {}))
    trials = sorted(p for p in (path / "trials").iterdir() if is_run_dir(p)) if (path / "trials").is_dir() else []
    runs = []
    for trial in trials:
        run = read_run(trial)
        run.params = {key: config_value(run.config, key) for key in keys}
        run.label = " ".join(f"{key.rsplit('.', 1)[-1]}={value:g}" if isinstance(value, float)
                             else f"{key.rsplit('.', 1)[-1]}={value}" for key, value in run.params.items())
        runs.append(run)
    runs.sort(key=lambda r: tuple((0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, str(v))
                                  for v in r.params.values()))
    labels = [r.label for r in runs]
    for run in runs:  # random search may repeat values: the trial id tells them apart
        if labels.count(run.label) > 1:
            run.label = f"{run.label} ({run.run_dir.name[-5:]})"
    return runs, spec


def read_runs(path: str | Path) -> tuple[str, list[RunTables]]:
    """("run", [one]) for a run directory, ("comparison", [each entry in order]) for a
    comparison folder (summary.csv's order, else sorted sub-folders), ("sweep", [each trial])
    for a Ray Tune sweep folder."""
    path = Path(path)
    if not path.is_dir():
        raise RunFolderError(path, "(RUN_DIR) does not exist or is not a folder")
    if is_run_dir(path):
        return "run", [read_run(path)]
    if (path / "sweep.yaml").is_file():
        runs, _ = read_sweep(path)
        if not runs:
            raise RunFolderError(path, "(RUN_DIR) is a sweep folder without finished trials")
        return "sweep", runs
    summary = path / "summary.csv"
    labels = (pd.read_csv(summary)["label"].astype(str).tolist() if summary.is_file()
              else sorted(p.name for p in path.iterdir() if is_run_dir(p)))
    runs = [read_run(path / label, label) for label in labels if is_run_dir(path / label)]
    if not runs:
        raise RunFolderError(path, "(RUN_DIR) is neither a run directory (config.yaml, rounds.csv) nor a "
                             "comparison or sweep folder holding run directories")
    return "comparison", runs
