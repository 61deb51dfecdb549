"""The run directory: resolved config, metric tables and partition (adapters: export.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from fltac_ray.config import ExperimentConfig, save_config
from fltac_ray.environment import record_session
from fltac_ray.errors import RunFolderError
from fltac_ray.runs.files import holds_something

# Generation (instruction) tasks: accuracy and loss are over response tokens; rouge_l,
# perplexity and judge_score are filled for them only (empty for classification tasks).
METRICS_COLUMNS = ["round", "task", "accuracy", "loss", "clients", "test_samples", "majority_accuracy",
                   "rouge_l", "perplexity", "judge_score"]
CLIENT_COLUMNS = ["round", "client", "task", "accuracy", "loss", "test_samples", "rank"]
ROUNDS_COLUMNS = [
    "round", "status", "clients", "failed_clients", "adapters", "clustering_accuracy", "ari", "clusters",
    "lora_product_error",
    "params_up", "params_up_per_client", "bytes_up", "params_down", "bytes_down", "rejected_uploads", "train_loss",
    "skipped_steps", "mean_accuracy", "train_seconds", "step_seconds", "worker_utilisation", "aggregate_seconds", "evaluated_adapters", "eval_seconds",
    "seconds", "epsilon", "clip_norm", "screened_uploads", "suspected_kept", "malicious_uploads", "malicious_accepted", "honest_screened",
    "honest_clustering_accuracy", "honest_aggregate_error",
]
# attacks.honest_damage's measures, filled when the run has federation.attack or .screening
AUDIT_COLUMNS = ROUNDS_COLUMNS[-5:]


def final_round_metrics(metrics: pd.DataFrame) -> pd.DataFrame:
    """The metrics.csv rows of the last evaluated round, one per task (empty before any)."""
    if metrics.empty:
        return metrics
    return metrics[metrics["round"] == metrics["round"].max()]


def make_run_dir(output_dir: str, name: str, out: str | None) -> Path:
    """`out` as given (must be new or empty, so no earlier results are overwritten), or
    `<output_dir>/<name>-<timestamp>` (runs, comparisons and sweeps alike). A folder that cannot
    be made (under a regular file, read-only) is a RunFolderError naming it, before anything runs."""
    if out is not None:
        path = Path(out)
        if holds_something(path):
            raise RunFolderError(path, "--out exists and is not an empty folder; choose a new folder "
                                 "(earlier results are never overwritten)")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(output_dir) / f"{name}-{stamp}"
        suffix = 1
        while path.exists():
            path = Path(output_dir) / f"{name}-{stamp}-{suffix}"
            suffix += 1
    if (problem := folder_problem(path)) is not None:
        raise RunFolderError(path, f"{problem}; choose another --out or output_dir")
    return path


def folder_problem(path: Path) -> str | None:
    """Create `path` (with its parents) and write a probe file in it; None when that works, else
    why not (a parent that is a regular file, or the system's reason)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".fltac-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        blocking = next((parent for parent in [path, *path.parents] if parent.exists() and not parent.is_dir()), None)
        return (f"{blocking} is a file, not a folder" if blocking is not None
                else f"cannot be created or written ({exc.strerror or exc})")
    return None


LOCK_FILE = ".lock"


def discard_unused_run_dir(run_dir: Path, made: bool) -> None:
    """After a failed start (the data could not be prepared), with nothing but the lock file
    written: remove the lock, and the folder itself when this process `made` it (an empty --out
    the user gave stays)."""
    if {p.name for p in run_dir.iterdir()} <= {LOCK_FILE}:
        (run_dir / LOCK_FILE).unlink(missing_ok=True)
        if made:
            run_dir.rmdir()


def hold_run_folder(run_dir: Path):
    """An exclusive lock on the run folder for as long as the returned file stays open (fcntl: the
    kernel releases it when the process ends, however it ends). A second run or resume of the
    same folder is refused, naming the process that holds it."""
    import fcntl
    import os

    handle = (run_dir / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunFolderError(run_dir, f"is in use by {holder}; wait for it to end (or stop it) before "
                             "resuming") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()}")
    handle.flush()
    return handle


class RunWriter:
    """Appends rows as rounds finish, so a crash keeps every completed round on disk."""

    def __init__(self, run_dir: Path, config: ExperimentConfig, resume_round: int | None = None,
                 extra_columns: tuple[str, ...] = ()) -> None:
        """A new run writes fresh files; a resumed one keeps the rows of rounds up to
        `resume_round` (rows of later rounds were written after that checkpoint and are redone).
        `extra_columns`: the algorithm's round_metrics, after rounds.csv's own columns."""
        self.run_dir = run_dir
        self.rounds_columns = ROUNDS_COLUMNS + [c for c in extra_columns if c not in ROUNDS_COLUMNS]
        self.metrics_path = run_dir / "metrics.csv"
        self.rounds_path = run_dir / "rounds.csv"
        self.clients_path = run_dir / "clients.csv"
        tables = ((self.metrics_path, METRICS_COLUMNS), (self.clients_path, CLIENT_COLUMNS),
                  (self.rounds_path, self.rounds_columns))
        record_session(run_dir, "start" if resume_round is None else "resume")
        if resume_round is None:
            save_config(config, run_dir / "config.yaml")
            for path, columns in tables:
                pd.DataFrame(columns=columns).to_csv(path, index=False)
            return
        for path, columns in tables:
            kept = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=columns)
            # a folder written before a column existed gets it (empty): appended rows line up
            kept = kept.reindex(columns=columns)
            kept[kept["round"] <= resume_round].to_csv(path, index=False)

    def write_partition(self, rows: list[dict]) -> None:
        pd.DataFrame(rows).to_csv(self.run_dir / "partition.csv", index=False)

    def append_metrics(self, rows: list[dict]) -> None:
        if rows:
            pd.DataFrame(rows, columns=METRICS_COLUMNS).to_csv(
                self.metrics_path, mode="a", header=False, index=False)

    def append_client_metrics(self, rows: list[dict]) -> None:
        if rows:
            pd.DataFrame(rows, columns=CLIENT_COLUMNS).to_csv(
                self.clients_path, mode="a", header=False, index=False)

    def append_round(self, row: dict) -> None:
        pd.DataFrame([row], columns=self.rounds_columns).to_csv(
            self.rounds_path, mode="a", header=False, index=False)
