"""Terminal output of a run: a banner, one line per round, a live progress bar on a terminal,
and a final summary table. `quiet` mutes all of it (errors still go to stderr)."""

from __future__ import annotations

import math
import sys
import threading
import time
from typing import TextIO

import pandas as pd

from fltac_ray.outputs import final_round_metrics

BAR_WIDTH = 24


def short_task(task: str) -> str:
    """A task name short enough for a terminal column or a plot label."""
    for prefix in ("wordnet_", "synthetic_"):
        task = task.removeprefix(prefix)
    return task.replace("supersense", "ss")


def _megabytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


def _finite(value: float | None) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


class Progress:
    """`bar`: draw a live bar over rounds under the round lines (default: when the stream is a
    terminal; a log file gets the round lines only, never carriage returns)."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None, bar: bool | None = None) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stdout
        if bar is None:
            bar = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = bar and not quiet
        self._total = 0
        self._done = 0
        self._first = 1
        self._status = ""
        self._mean: float | None = None
        self._cluster: float | None = None
        self._sent = 0.0
        self._started = 0.0
        self._drawn = False
        # the bar's clock ticks once a second while a round runs (a daemon thread redraws it)
        self._lock = threading.Lock()
        self._stop_ticking: threading.Event | None = None

    def say(self, message: str) -> None:
        if self.quiet:
            return
        with self._lock:
            self._clear()
            print(message, file=self.stream, flush=True)
            self._draw()

    # --- the bar --------------------------------------------------------------------------
    def start_rounds(self, total: int, first: int = 1, sent_so_far: float = 0.0) -> None:
        """The run's rounds begin at `first` (after a resume, rounds before it are done)."""
        self._total, self._first, self._done = total, first, first - 1
        self._sent = sent_so_far
        self._started = time.perf_counter()
        self._redraw()
        if self.bar and self._stop_ticking is None:
            self._stop_ticking = threading.Event()
            threading.Thread(target=self._tick, args=(self._stop_ticking,), daemon=True,
                             name="fltac-progress").start()

    def _tick(self, stop: threading.Event) -> None:
        while not stop.wait(1.0):
            self._redraw()

    def phase(self, text: str) -> None:
        """What the current round is doing (training, aggregating, evaluating)."""
        self._status = text
        self._redraw()

    def _redraw(self) -> None:
        with self._lock:
            self._draw()

    def advance(self, round_index: int) -> None:
        """Round `round_index` is over (round_line does this; a rejected round has no line)."""
        self._done = round_index
        self._status = ""
        self._redraw()

    def finish(self) -> None:
        if self._stop_ticking is not None:
            self._stop_ticking.set()
            self._stop_ticking = None
        with self._lock:
            self._clear()
            self._total = 0

    def _bar_text(self) -> str:
        total = max(self._total, 1)
        filled = int(BAR_WIDTH * self._done / total)
        elapsed = time.perf_counter() - self._started
        finished_here = self._done - self._first + 1
        eta = (f" eta {_clock(elapsed / finished_here * (self._total - self._done))}"
               if finished_here > 0 and self._done < self._total else "")
        mean = f"  mean {self._mean:.3f}" if _finite(self._mean) else ""
        cluster = f"  cluster {self._cluster:.2f}" if _finite(self._cluster) else ""
        status = f"  [{self._status}]" if self._status else ""
        return (f"|{'#' * filled}{'.' * (BAR_WIDTH - filled)}| {self._done}/{self._total} rounds{mean}"
                f"{cluster}  sent {_megabytes(self._sent)}  {_clock(elapsed)}{eta}{status}")

    def _draw(self) -> None:
        if not self.bar or not self._total:
            return
        self.stream.write("\r\033[K" + self._bar_text())
        self.stream.flush()
        self._drawn = True

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False

    # --- round lines and the summary -----------------------------------------------------------
    def round_zero_line(self, rounds: int, task_accuracy: dict[str, float]) -> None:
        """The starting adapter's evaluation (train.eval_round_0), before round 1."""
        accs = _task_accuracies(task_accuracy)
        mean = sum(task_accuracy.values()) / len(task_accuracy) if task_accuracy else float("nan")
        self._status = ""
        self.say(f"round {0:>3}/{rounds}  {accs}  | mean {mean:.3f}  | the starting adapter (pre-trained model)")

    def round_line(self, round_index: int, rounds: int, row: dict, task_accuracy: dict[str, float]) -> None:
        self._done = round_index
        self._status = ""
        self._sent += float(row.get("bytes_up", 0)) + float(row.get("bytes_down", 0))
        mean = row.get("mean_accuracy")
        if _finite(mean):
            self._mean = mean
        clustering = row["clustering_accuracy"]
        if _finite(clustering):
            self._cluster = clustering
        accs = _task_accuracies(task_accuracy)
        mean_text = f"mean {mean:.3f}" if _finite(mean) else "mean -"
        cluster_text = (f"  | cluster acc {clustering:.2f} ARI {row['ari']:.2f}"
                        if _finite(clustering) else "")  # NaN: the algorithm does not cluster
        # uploads the server did not aggregate (their lines come before): said on the round too
        dropped = "".join(f"  | {row[column]} {label}" for column, label in
                          (("rejected_uploads", "rejected"), ("screened_uploads", "screened out"))
                          if row.get(column, 0))
        self.say(
            f"round {round_index:>3}/{rounds}  {accs}  | {mean_text}{cluster_text}{dropped}"
            f"  | up {_megabytes(row['bytes_up'])}  {row['seconds']:.1f}s"
        )


def _task_accuracies(task_accuracy: dict[str, float]) -> str:
    """A round line's per-task part: `noun_ss 0.273  verb_ss 0.270  ...`."""
    return "  ".join(f"{short_task(t)} {a:.3f}" for t, a in task_accuracy.items())


def format_run_summary(metrics: pd.DataFrame, rounds: pd.DataFrame) -> str:
    """The end-of-run table: per task the final and best accuracy (and its round) against the
    majority-class rate, then the run's totals."""
    lines = []
    if not metrics.empty:
        final = final_round_metrics(metrics).set_index("task")["accuracy"]
        # round 0 (train.eval_round_0): the starting adapter, i.e. the pre-trained model
        start = metrics[metrics["round"] == 0].set_index("task")["accuracy"]
        rows = []
        for task, group in metrics.groupby("task", sort=False):
            best = group.loc[group["accuracy"].idxmax()]
            rows.append({"task": task, **({"round 0": float(start.get(task, float("nan")))} if len(start) else {}),
                         "final": float(final.get(task, float("nan"))),
                         "best": float(best["accuracy"]), "best round": int(best["round"]),
                         "majority class": float(group["majority_accuracy"].iloc[0]),
                         "test examples": int(group["test_samples"].iloc[-1])})
        table = pd.DataFrame(rows)
        mean = {"task": "mean", "final": table["final"].mean(), "best": float("nan"),
                "best round": "", "majority class": table["majority class"].mean(), "test examples": ""}
        if "round 0" in table:
            mean["round 0"] = table["round 0"].mean()
        table = pd.concat([table, pd.DataFrame([mean])], ignore_index=True)
        for column in ("round 0", "final", "best", "majority class"):
            if column not in table:
                continue
            table[column] = table[column].map(lambda v: "-" if not _finite(v) else f"{v:.3f}")
        lines.append(table.to_string(index=False))
    if not rounds.empty:
        ok = rounds[rounds["status"] == "ok"] if "status" in rounds else rounds
        clustering = rounds["clustering_accuracy"].dropna()
        parts = [f"{len(rounds)} rounds ({len(rounds) - len(ok)} rejected)",
                 f"sent {_megabytes(rounds['bytes_up'].sum())} up, {_megabytes(rounds['bytes_down'].sum())} down"]
        if len(clustering):
            parts.append(f"final clustering accuracy {clustering.iloc[-1]:.2f} (ARI {rounds['ari'].dropna().iloc[-1]:.2f})")
        parts.append(f"mean round {rounds['seconds'].mean():.1f}s")
        lines.append("; ".join(parts))
    return "\n".join(lines)
