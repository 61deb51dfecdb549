"""Terminal output of a run: a banner, one line per round, a live progress bar on a terminal,
and a final summary table. `quiet` mutes all of it (errors still go to stderr)."""

from __future__ import annotations

import math
import sys
import threading
import time
from typing import TextIO

import pandas as pd

from fltac_ray.runs.outputs import final_round_metrics


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


def _interactive(stream: TextIO) -> bool:
    """A terminal, or a Jupyter kernel (where tqdm.auto draws a notebook widget)."""
    return bool(getattr(stream, "isatty", lambda: False)()) or "ipykernel" in sys.modules


class Progress:
    """`bar`: draw a live tqdm bar over rounds under the round lines (default: on a terminal or in
    a notebook; a log file gets the round lines only, never carriage returns)."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None, bar: bool | None = None) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stdout
        if bar is None:
            bar = _interactive(self.stream)
        self.bar = bar and not quiet
        self._tqdm = None  # the bar while rounds run
        self._total = 0
        self._done = 0
        self._first = 1
        self._status = ""
        self._mean: float | None = None
        self._cluster: float | None = None
        self._sent = 0.0
        self._started = 0.0
        self._round_ended = 0.0  # when the last round ended (clock of the ETA)
        # the bar's clock ticks once a second while a round runs (a daemon thread redraws it)
        self._lock = threading.Lock()
        self._stop_ticking: threading.Event | None = None

    def say(self, message: str) -> None:
        if self.quiet:
            return
        with self._lock:
            if self._tqdm is not None:  # clears the bar, prints the line, draws the bar again
                self._tqdm.write(message, file=self.stream)
            else:
                print(message, file=self.stream, flush=True)

    # --- the bar --------------------------------------------------------------------------
    def start_rounds(self, total: int, first: int = 1, sent_so_far: float = 0.0) -> None:
        """The run's rounds begin at `first` (after a resume, rounds before it are done)."""
        self._total, self._first, self._done = total, first, first - 1
        self._sent = sent_so_far
        self._started = self._round_ended = time.perf_counter()
        if not self.bar:
            return
        from tqdm.auto import tqdm

        with self._lock:
            if self._tqdm is None:
                self._tqdm = tqdm(total=total, initial=first - 1, file=self.stream, leave=False,
                                  dynamic_ncols=True, mininterval=0.0,
                                  bar_format="{n_fmt}/{total_fmt} rounds |{bar}| {elapsed}{postfix}")
            self._draw()
        if self._stop_ticking is None:
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
        self._round_over(round_index)
        self._redraw()

    def _round_over(self, round_index: int) -> None:
        if round_index != self._done:
            self._done = round_index
            self._round_ended = time.perf_counter()
        self._status = ""

    def finish(self) -> None:
        if self._stop_ticking is not None:
            self._stop_ticking.set()
            self._stop_ticking = None
        with self._lock:
            if self._tqdm is not None:
                self._tqdm.close()
                self._tqdm = None
            self._total = 0

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left: the mean round so far times the rounds left, less the time the current
        round has already run (so it counts down during a round); None before a round ended."""
        finished_here = self._done - self._first + 1
        if finished_here <= 0 or self._done >= self._total:
            return None
        now = time.perf_counter() if now is None else now
        per_round = (self._round_ended - self._started) / finished_here
        return max(per_round * (self._total - self._done) - (now - self._round_ended), 0.0)

    def _postfix(self) -> str:
        eta = self.eta()
        parts = [f"eta {_clock(eta)}" if eta is not None else "",
                 f"mean {self._mean:.3f}" if _finite(self._mean) else "",
                 f"cluster {self._cluster:.2f}" if _finite(self._cluster) else "",
                 f"sent {_megabytes(self._sent)}", f"[{self._status}]" if self._status else ""]
        return "  ".join(part for part in parts if part)

    def _draw(self) -> None:
        if self._tqdm is None or not self._total:
            return
        self._tqdm.n = self._done
        self._tqdm.postfix = self._postfix()
        self._tqdm.refresh(nolock=True)

    # --- round lines and the summary -----------------------------------------------------------
    def round_zero_line(self, rounds: int, task_accuracy: dict[str, float]) -> None:
        """The starting adapter's evaluation (train.eval_round_0), before round 1."""
        accs = _task_accuracies(task_accuracy)
        mean = sum(task_accuracy.values()) / len(task_accuracy) if task_accuracy else float("nan")
        self._status = ""
        self.say(f"round {0:>3}/{rounds}  {accs}  | mean {mean:.3f}  | the starting adapter (pre-trained model)")

    def round_line(self, round_index: int, rounds: int, row: dict, task_accuracy: dict[str, float]) -> None:
        self._round_over(round_index)
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
                          (("rejected_uploads", "rejected"), ("screened_uploads", "screened out"),
                           ("suspected_kept", "kept apart (screening may not hold)"))
                          if row.get(column, 0))
        spent = f"  | epsilon {row['epsilon']:.3g}" if _finite(row.get("epsilon")) else ""  # privacy
        self._redraw()
        self.say(
            f"round {round_index:>3}/{rounds}  {accs}  | {mean_text}{cluster_text}{dropped}{spent}"
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
        skipped = int(rounds["skipped_steps"].fillna(0).sum()) if "skipped_steps" in rounds else 0
        if skipped:
            parts.append(f"{skipped} adapter steps skipped (float16 overflow; rounds.csv skipped_steps)")
        spent = rounds["epsilon"].dropna() if "epsilon" in rounds else rounds.iloc[:0]
        if len(spent):
            parts.append(f"privacy spent: epsilon {spent.iloc[-1]:.3g} (rounds.csv epsilon)")
        parts.append(f"mean round {rounds['seconds'].mean():.1f}s")
        lines.append("; ".join(parts))
        apart = rounds[rounds["suspected_kept"].fillna(0) > 0] if "suspected_kept" in rounds else rounds.iloc[:0]
        if len(apart):
            lines.append(f"warning: screening may not have held in {len(apart)} round(s) "
                         f"{apart['round'].astype(int).tolist()}: uploads apart from the rest were kept "
                         "(rounds.csv suspected_kept; federation.screening_stop ends a run there)")
    return "\n".join(lines)
