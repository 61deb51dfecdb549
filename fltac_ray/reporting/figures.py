"""The report's figures, drawn with matplotlib from run tables (no file IO here).

Each function returns a Figure, or None with nothing to draw (e.g. no algorithm in the run
clusters). Tasks keep one colour across figures; runs (algorithms) keep one colour and marker.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # files only: never open a window, works without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: E402

from fltac_ray.progress import short_task  # noqa: E402
from fltac_ray.reporting.runs import RunTables  # noqa: E402
from fltac_ray.runs.outputs import final_round_metrics  # noqa: E402
from fltac_ray.runs.snapshots import Snapshot, align_cluster_ids  # noqa: E402

MARKERS = "osD^vP*Xh<>"


def task_colours(tasks: list[str]) -> dict[str, tuple]:
    palette = plt.get_cmap("tab10" if len(tasks) <= 10 else "tab20")
    return {task: palette(i % palette.N) for i, task in enumerate(tasks)}


def run_styles(runs: list[RunTables]) -> dict[str, dict]:
    """Colour, marker and line width per run. Earlier runs draw thicker lines, so two runs with
    identical curves (FL-TAC and the oracle when K-means is perfect) both stay visible."""
    palette = plt.get_cmap("tab10")
    n = max(len(runs) - 1, 1)
    return {run.label: {"color": palette(i % 10), "marker": MARKERS[i % len(MARKERS)],
                        "linewidth": 1.2 + 1.8 * (1 - i / n) if len(runs) > 1 else 1.6}
            for i, run in enumerate(runs)}


def short_group(tasks: str) -> str:
    """A "+"-joined task group (FedIT's multi-task adapters) with every part shortened."""
    return "+".join(short_task(t) for t in tasks.split("+"))


def legend_below(fig: Figure, handles: list, title: str | None = None, fontsize: float = 9) -> None:
    """A legend under the axes in as many columns as the figure's width holds, and the layout
    tightened above it (rows of long labels never cover axis labels)."""
    width_in, height_in = fig.get_size_inches()
    longest = max((len(h.get_label()) for h in handles), default=1)
    # ~0.62 em per character plus ~5 em of marker and spacing, in inches (generous: a legend
    # wider than the figure is cut off, a narrower one only wraps earlier)
    per_column = (0.62 * longest + 5.0) * fontsize / 72
    ncol = max(1, min(len(handles), int(width_in / per_column)))
    rows = math.ceil(len(handles) / ncol) + (1 if title else 0)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, frameon=False, title=title,
               fontsize=fontsize, title_fontsize=fontsize)
    bottom = (rows * 1.9 * fontsize / 72 + 0.1) / height_in
    fig.tight_layout(rect=(0, min(bottom, 0.6), 1, 1))


def _grid(n: int, width: float = 4.2, height: float = 3.3, columns: int = 3) -> tuple[Figure, list]:
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _tasks(runs: list[RunTables]) -> list[str]:
    seen: list[str] = []
    for run in runs:
        for task in run.tasks or run.metrics.get("task", pd.Series(dtype=str)).unique().tolist():
            if task not in seen:
                seen.append(task)
    return seen


def _metric_name(runs: list[RunTables]) -> str:
    generation = any(run.metrics.get("rouge_l", pd.Series(dtype=float)).notna().any() for run in runs)
    return "accuracy (next-token, response)" if generation else "test accuracy"


def task_accuracy_over_rounds(runs: list[RunTables]) -> Figure | None:
    """One panel per task: accuracy after each evaluated round, one line per run; the
    majority-class rate as a dashed grey line."""
    return _task_metric_over_rounds(runs, "accuracy", _metric_name(runs), "Per-task accuracy over rounds")


def task_rouge_over_rounds(runs: list[RunTables]) -> Figure | None:
    """Instruction tasks: ROUGE-L F of greedy answers against the references, per round (None
    when no run has generation tasks)."""
    if not any("rouge_l" in run.metrics and run.metrics["rouge_l"].notna().any() for run in runs):
        return None
    return _task_metric_over_rounds(runs, "rouge_l", "ROUGE-L F (greedy answers)", "Per-task ROUGE-L over rounds")


def _task_metric_over_rounds(runs: list[RunTables], column: str, ylabel: str, title: str) -> Figure | None:
    tasks = _tasks(runs)
    if not tasks or all(run.metrics.empty for run in runs):
        return None
    styles = run_styles(runs)
    fig, axes = _grid(len(tasks))
    baseline = False
    for ax, task in zip(axes, tasks, strict=True):
        for run in runs:
            rows = run.metrics[run.metrics["task"] == task] if not run.metrics.empty else run.metrics
            rows = rows[rows[column].notna()] if column in rows else rows.iloc[0:0]
            if rows.empty:
                continue
            ax.plot(rows["round"], rows[column], label=run.label, markersize=4, **styles[run.label])
            majority = rows["majority_accuracy"].dropna() if column == "accuracy" else ()
            if len(majority):
                baseline = True
                ax.axhline(float(majority.iloc[0]), color="0.6", linestyle="--", linewidth=1)
        ax.set_title(task)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    handles = [plt.Line2D([], [], label=run.label, markersize=4, **styles[run.label]) for run in runs]
    if baseline:
        handles.append(plt.Line2D([], [], color="0.6", linestyle="--", linewidth=1, label="majority class"))
    fig.suptitle(title)
    legend_below(fig, handles)
    return fig


def clustering_over_rounds(runs: list[RunTables]) -> Figure | None:
    """Clustering accuracy (Hungarian-matched) and adjusted Rand index of the server's grouping
    against the hidden tasks, per round, for runs whose algorithm groups uploads."""
    clustered = [run for run in runs if "clustering_accuracy" in run.rounds
                 and run.rounds["clustering_accuracy"].notna().any()]
    if not clustered:
        return None
    styles = run_styles(runs)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, column, title in ((axes[0], "clustering_accuracy", "clustering accuracy"),
                              (axes[1], "ari", "adjusted Rand index")):
        for run in clustered:
            rows = run.rounds[run.rounds[column].notna()]
            ax.plot(rows["round"], rows[column], label=run.label, markersize=4, **styles[run.label])
        ax.set_xlabel("round")
        ax.set_ylabel(title)
        ax.set_ylim(-0.05 if column == "clustering_accuracy" else -0.55, 1.05)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[1].legend(loc="lower right")
    fig.suptitle("How well the server's grouping recovers the hidden tasks")
    fig.tight_layout()
    return fig


def _labels_name_server_models(algorithm: str) -> bool:
    """The run's algorithm says its labels name the same server model every round (IFCA)."""
    from fltac_ray.algorithms.registry import UnknownAlgorithm, resolve_algorithm

    try:
        return resolve_algorithm(algorithm).labels_name_server_models
    except UnknownAlgorithm:  # a plug-in not importable here: match the labels, as for K-means
        return False


def adapter_projection(run: RunTables, snapshots: list[Snapshot], points: list[np.ndarray],
                       method: str) -> Figure | None:
    """Paper Fig. 4: each snapshot round's uploaded adapters in 2-D, coloured by true task,
    marker = the server's assignment (K-means cluster, IFCA choice). K-means numbers its
    clusters afresh every round, so its ids are matched across rounds (snapshots.align_cluster_ids)
    and a marker means one cluster in every panel; IFCA's choices already are global models."""
    if not snapshots:
        return None
    tasks = _tasks([run])
    tasks += sorted({t for snap in snapshots for t in snap.tasks} - set(tasks))  # FedIT "a+b"
    colours = task_colours(tasks)
    matched = not _labels_name_server_models(run.algorithm)
    labels_of = align_cluster_ids(snapshots) if matched else [snap.labels for snap in snapshots]
    # three panels a row: at the report's width the tick labels stay readable
    fig, axes = _grid(len(snapshots), width=3.6, height=3.4, columns=3)
    for ax, snap, xy, labels in zip(axes, snapshots, points, labels_of, strict=True):
        for task in tasks:
            for label in np.unique(labels):
                pick = np.array([t == task for t in snap.tasks]) & (labels == label)
                if pick.any():
                    ax.scatter(xy[pick, 0], xy[pick, 1], color=colours[task], s=36, alpha=0.85,
                               marker=MARKERS[int(label) % len(MARKERS)], edgecolors="black", linewidths=0.4)
        accuracy = run.rounds.loc[run.rounds["round"] == snap.round, "clustering_accuracy"]
        note = f", clustering acc {float(accuracy.iloc[0]):.2f}" if len(accuracy) and accuracy.notna().all() else ""
        ax.set_title(f"round {snap.round} ({len(snap.tasks)} adapters{note})", fontsize=9)
        ax.set_xlabel(f"{method} 1", fontsize=9)
        ax.set_ylabel(f"{method} 2", fontsize=9)
        ax.tick_params(labelsize=8)
    task_handles = [plt.Line2D([], [], linestyle="", marker="o", color=colours[t], label=short_group(t))
                    for t in tasks if any(t in snap.tasks for snap in snapshots)]
    ids = sorted({int(label) for labels in labels_of for label in labels})
    cluster_handles = [plt.Line2D([], [], linestyle="", marker=MARKERS[k % len(MARKERS)], color="0.4",
                                  label=f"cluster {k}") for k in ids[:8]]
    fig.suptitle(f"{run.label}: uploaded adapters projected with {method}")
    what = "server's cluster (ids matched across rounds)" if matched else "IFCA's chosen model"
    legend_below(fig, task_handles + cluster_handles, title=f"colour: true task   marker: {what}")
    return fig


def _final_scores(runs: list[RunTables], tasks: list[str]) -> dict[str, list[float]]:
    scores = {}
    for run in runs:
        if run.metrics.empty:
            continue
        last = final_round_metrics(run.metrics).set_index("task")
        scores[run.label] = [float(last["accuracy"].get(task, np.nan)) for task in tasks]
    return scores


def task_radar(runs: list[RunTables]) -> Figure | None:
    """Paper Fig. 2b: final accuracy per task, one polygon per run (bars below 3 tasks, where a
    radar has no area)."""
    tasks = _tasks(runs)
    scores = _final_scores(runs, tasks)
    if not scores:
        return None
    styles = run_styles(runs)
    labels = [short_task(t) for t in tasks]
    if len(tasks) < 3:
        fig, ax = plt.subplots(figsize=(6, 4))
        width = 0.8 / len(scores)
        for i, (label, values) in enumerate(scores.items()):
            ax.bar(np.arange(len(tasks)) + i * width, values, width, label=label, color=styles[label]["color"])
        ax.set_xticks(np.arange(len(tasks)) + width * (len(scores) - 1) / 2, labels)
        ax.set_ylabel(f"final {_metric_name(runs)}")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.set_title("Final accuracy per task")
        fig.tight_layout()
        return fig
    angles = np.linspace(0, 2 * np.pi, len(tasks), endpoint=False).tolist()
    fig, ax = plt.subplots(figsize=(6.4, 5.6), subplot_kw={"projection": "polar"})
    for label, values in scores.items():
        closed = values + values[:1]
        ax.plot(angles + angles[:1], closed, label=label, color=styles[label]["color"],
                marker=styles[label]["marker"], markersize=4)
        ax.fill(angles + angles[:1], np.nan_to_num(closed), color=styles[label]["color"],
                alpha=0.3 / len(scores))
    ax.set_xticks(angles, labels)
    ax.set_ylim(0, 1)
    ax.set_yticks([0.25, 0.5, 0.75, 1.0], ["0.25", "0.5", "0.75", "1"], fontsize=7)
    ax.set_rlabel_position(math.degrees(angles[1]) / 2)  # between the first two task axes
    ax.set_title(f"Final {_metric_name(runs)} per task", pad=18)
    legend_below(fig, ax.get_legend_handles_labels()[0], fontsize=8)
    return fig


def client_task_shares(run: RunTables) -> Figure | None:
    """Paper Fig. 2a: each client's training examples per task after the Dirichlet split
    (shares below data.min_share dropped)."""
    partition = run.partition
    if partition.empty:
        return None
    tasks = _tasks([run])
    colours = task_colours(tasks)
    counts = partition.pivot_table(index="client", columns="task", values="train_samples",
                                   aggfunc="sum", fill_value=0).reindex(columns=tasks, fill_value=0)
    data = run.config.get("data", {})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(counts) + 3), 4))
    bottom = np.zeros(len(counts))
    for task in tasks:
        ax.bar(counts.index, counts[task], bottom=bottom, color=colours[task], label=short_task(task),
               width=0.85 if len(counts) < 60 else 1.0)
        bottom += counts[task].to_numpy()
    ax.set_xlabel("client")
    ax.set_ylabel("training examples")
    if len(counts) <= 30:
        ax.set_xticks(counts.index)
    ax.legend(title="task", fontsize=8)
    ax.set_title(f"Training examples per client and task\nDirichlet(alpha = {data.get('dirichlet_alpha', '?')}) "
                 f"split per task, shares below {data.get('min_share', '?')} dropped", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def accuracy_vs_bytes(runs: list[RunTables]) -> Figure | None:
    """Mean accuracy after each evaluated round against the bytes communicated so far (up and
    down, log scale); runs that communicate nothing (local, centralized) as horizontal lines."""
    styles = run_styles(runs)
    fig, ax = plt.subplots(figsize=(7, 4.4))
    drawn = False
    for run in runs:
        rounds = run.rounds
        if rounds.empty or "mean_accuracy" not in rounds:
            continue
        sent = (rounds["bytes_up"] + rounds["bytes_down"]).cumsum() / 1e6
        evaluated = rounds["mean_accuracy"].notna()
        if not evaluated.any():
            continue
        drawn = True
        style = styles[run.label]
        if sent.iloc[-1] <= 0:
            ax.axhline(float(rounds.loc[evaluated, "mean_accuracy"].iloc[-1]), color=style["color"],
                       linestyle=":", label=f"{run.label} (no communication)")
            continue
        ax.plot(sent[evaluated], rounds.loc[evaluated, "mean_accuracy"], color=style["color"],
                alpha=0.5, linewidth=1, marker=".", markersize=5)
        ax.plot(sent[evaluated].iloc[-1], rounds.loc[evaluated, "mean_accuracy"].iloc[-1],
                linestyle="", markersize=9, label=f"{run.label} (final)", **style)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # labels within a decade too
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    ax.set_xlabel("bytes communicated so far, up + down (MB, log scale)")
    ax.set_ylabel("mean accuracy over tasks")
    ax.grid(alpha=0.3, which="both")
    ax.set_title("Accuracy against communication (line: rounds; marker: final)")
    legend_below(fig, ax.get_legend_handles_labels()[0], fontsize=8)
    return fig


def privacy_series(run: RunTables) -> str:
    """The line a run belongs to in accuracy_vs_epsilon: its algorithm, privacy mode and
    whether its uploads carried a clustering sketch."""
    privacy = run.config.get("privacy") or {}
    mode = privacy.get("mode", "none")
    if mode == "none":
        return run.algorithm
    sketch = f" + {privacy['sketch']} sketch" if privacy.get("sketch", "none") != "none" else ""
    return f"{run.algorithm}, {mode}{sketch}"


def accuracy_vs_epsilon(runs: list[RunTables]) -> Figure | None:
    """Final mean accuracy (left) and clustering accuracy (right) against the run's epsilon (log
    scale), one line per algorithm and privacy mode; runs without privacy (epsilon infinite) and
    runs that send nothing (local training) as horizontal reference lines. None without a
    private run."""
    points: dict[str, list[tuple[float, float, float]]] = {}
    references: list[tuple[str, float, float]] = []
    for run in runs:
        rounds = run.rounds
        if rounds.empty or "mean_accuracy" not in rounds or not rounds["mean_accuracy"].notna().any():
            continue
        accuracy = float(rounds["mean_accuracy"].dropna().iloc[-1])
        clustering = (float(rounds["clustering_accuracy"].dropna().iloc[-1])
                      if "clustering_accuracy" in rounds and rounds["clustering_accuracy"].notna().any() else math.nan)
        epsilon = rounds["epsilon"].dropna() if "epsilon" in rounds else pd.Series(dtype=float)
        if epsilon.empty:
            sent = float((rounds["bytes_up"] + rounds["bytes_down"]).sum()) if "bytes_up" in rounds else 1.0
            references.append((f"{run.label} ({'nothing sent' if sent <= 0 else 'no privacy'})", accuracy, clustering))
            continue
        points.setdefault(privacy_series(run), []).append((float(epsilon.iloc[-1]), accuracy, clustering))
    if not points:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    palette = plt.get_cmap("tab10")
    for i, (series, values) in enumerate(sorted(points.items())):
        values.sort()
        x = [v[0] for v in values]
        style = {"color": palette(i % 10), "marker": MARKERS[i % len(MARKERS)]}
        left.plot(x, [v[1] for v in values], label=series, **style)
        if any(not math.isnan(v[2]) for v in values):
            right.plot(x, [v[2] for v in values], **style)
    for j, (label, accuracy, clustering) in enumerate(references):
        colour = plt.get_cmap("Dark2")(j % 8)
        left.axhline(accuracy, color=colour, linestyle=":", label=label)
        if not math.isnan(clustering):
            right.axhline(clustering, color=colour, linestyle=":")
    for ax, ylabel in ((left, "final mean accuracy over tasks"), (right, "final clustering accuracy")):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.set_xlabel("epsilon spent (log scale)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    left.set_title("Accuracy against the privacy budget")
    right.set_title("How well the server recovers the tasks")
    legend_below(fig, left.get_legend_handles_labels()[0], fontsize=8)
    return fig


def final_metric(run: RunTables, metric: str) -> float:
    """A run's last value of a sweep metric: a rounds.csv column (mean_accuracy,
    clustering_accuracy, train_loss, ...) or `accuracy/<task>`."""
    return metric_at_round(run, metric, math.inf)


def metric_at_round(run: RunTables, metric: str, round_index: int) -> float:
    """A run's `metric` at `round_index`: its last evaluated value up to that round."""
    if metric.startswith("accuracy/"):
        rows = run.metrics[run.metrics["task"] == metric.split("/", 1)[1]] if not run.metrics.empty else run.metrics
        rows = rows[rows["round"] <= round_index] if len(rows) else rows
        return float(rows["accuracy"].iloc[-1]) if len(rows) else float("nan")
    if metric not in run.rounds:
        return float("nan")
    rows = run.rounds[run.rounds["round"] <= round_index]
    values = rows[metric].dropna()
    return float(values.iloc[-1]) if len(values) else float("nan")


def common_round(runs: list[RunTables]) -> int:
    """The last round every run reached (trials an early-stopping scheduler cut end sooner)."""
    return int(min(run.rounds["round"].max() for run in runs if len(run.rounds))) if runs else 0


def searched_level(value):
    """A searched value as a figure's level: as it is, or a mapping or list (an algorithm given
    with its options) as its compact JSON text."""
    if isinstance(value, (dict, list, tuple)):
        import json

        return json.dumps(value, sort_keys=True, separators=(", ", ": "))
    return value


def sweep_by_parameter(runs: list[RunTables], metric: str) -> Figure | None:
    """Ray Tune sweeps: each trial's `metric` at the last round every trial reached, against each
    searched value (one panel per searched key; the line joins the mean over the other keys at
    each value). Comparing at one round keeps trials ASHA stopped early from dragging a value's
    mean below one that ran longer; each trial's final value is drawn hollow beside it."""
    keys = list(runs[0].params) if runs else []
    if not keys:
        return None
    fig, axes = _grid(len(keys), width=5.2, height=3.6)
    at = common_round([run for run in runs if len(run.rounds)])
    values_at = np.array([metric_at_round(run, metric, at) for run in runs])
    finals = np.array([final_metric(run, metric) for run in runs])
    stopped_early = any(len(run.rounds) and run.rounds["round"].max() != at for run in runs)
    for ax, key in zip(axes, keys, strict=True):
        values = [searched_level(run.params[key]) for run in runs]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        levels = sorted(set(values), key=lambda v: (float(v), "") if numeric else (0.0, str(v)))
        x = np.array([float(v) for v in values]) if numeric else np.array([levels.index(v) for v in values])
        ax.scatter(x, values_at, color="tab:blue", alpha=0.7, s=30, label=f"trial at round {at}")
        if stopped_early:
            ax.scatter(x, finals, facecolors="none", edgecolors="tab:gray", s=30,
                       label="trial at its last round")
        centres = [float(levels[i]) if numeric else i for i in range(len(levels))]
        means = [np.nanmean(values_at[x == c]) if np.isfinite(values_at[x == c]).any() else np.nan for c in centres]
        ax.plot(centres, means, color="tab:orange", marker="_", markersize=14,
                label=f"mean over other keys at round {at}")
        if not numeric:  # long labels (an algorithm with its options) slant to fit
            long = max(len(str(v)) for v in levels) > 12
            ax.set_xticks(range(len(levels)), [str(v) for v in levels], rotation=25 if long else 0,
                          ha="right" if long else "center", fontsize=7 if long else None)
        elif len(levels) > 2 and min(levels) > 0 and max(levels) / min(levels) >= 100:
            ax.set_xscale("log")
        elif len(levels) <= 10:  # a grid: tick exactly the searched values
            ax.set_xticks([float(v) for v in levels], [f"{v:g}" for v in levels])
        ax.set_xlabel(key)
        ax.set_ylabel(f"{metric} at round {at}")
        ax.grid(alpha=0.3)
    reached = "the last round every trial reached" if stopped_early else "the last round"
    fig.suptitle(f"Sweep: each trial's {metric} at round {at} ({reached})")
    legend_below(fig, axes[0].get_legend_handles_labels()[0])
    return fig
