"""Terminal output of a run: a banner, one line per round, a final summary. `quiet` mutes it."""

from __future__ import annotations

import sys
from typing import TextIO


def short_task(task: str) -> str:
    """A task name short enough for a terminal column or a plot label."""
    for prefix in ("wordnet_", "synthetic_"):
        task = task.removeprefix(prefix)
    return task.replace("supersense", "ss")


def _megabytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


class Progress:
    def __init__(self, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stdout

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=self.stream, flush=True)

    def round_line(self, round_index: int, rounds: int, row: dict, task_accuracy: dict[str, float]) -> None:
        accs = "  ".join(f"{short_task(t)} {a:.3f}" for t, a in task_accuracy.items())
        mean = row.get("mean_accuracy")
        mean_text = f"mean {mean:.3f}" if mean == mean and mean is not None else "mean -"
        clustering = row["clustering_accuracy"]
        cluster_text = (f"  | cluster acc {clustering:.2f} ARI {row['ari']:.2f}"
                        if clustering == clustering else "")  # NaN: the algorithm does not cluster
        self.say(
            f"round {round_index:>3}/{rounds}  {accs}  | {mean_text}{cluster_text}"
            f"  | up {_megabytes(row['bytes_up'])}  {row['seconds']:.1f}s"
        )
