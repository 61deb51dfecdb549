"""`fltac-ray report RUN_DIR`: every figure as a PNG in RUN_DIR/report/ plus report.html, one
self-contained page (images embedded) with the figures and the final numbers."""

from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fltac_ray.errors import ConfigError, ConfigIssue, ResourceUnavailableError
from fltac_ray.reporting import figures
from fltac_ray.reporting.projection import METHODS, project, umap_available
from fltac_ray.reporting.runs import RunTables, read_runs, sweep_spec
from fltac_ray.runs.outputs import final_round_metrics
from fltac_ray.runs.snapshots import read_snapshots

MAX_PROJECTED_RUNS = 12  # one projection PNG per run; a large sweep would drown the page


@dataclass
class Report:
    html: Path
    figures: dict[str, Path] = field(default_factory=dict)  # figure name -> PNG
    skipped: dict[str, str] = field(default_factory=dict)  # figure name -> why not drawn


def check_projection(method: str) -> None:
    if method not in METHODS:
        raise ConfigError([ConfigIssue("--projection", method, f"use one of {list(METHODS)}")])
    if method == "umap" and not umap_available():
        raise ResourceUnavailableError("--projection umap: umap-learn is not installed "
                                       "(pip install 'fltac-ray[plot]'); use auto or pca")


def render_report(path: str | Path, projection: str = "auto") -> Report:
    """Draw every figure of the run, comparison or sweep at `path`; returns what was written.
    PNGs of an earlier report in `path/report/` are replaced (the folder is the report's)."""
    import matplotlib.pyplot as plt

    check_projection(projection)
    kind, runs = read_runs(path)
    root = Path(path)
    out = root / "report"
    out.mkdir(exist_ok=True)
    for stale in out.glob("*.png"):  # a figure not drawn this time must not linger
        stale.unlink()
    report = Report(html=root / "report.html")
    drawn: dict[str, tuple[str, str]] = {}  # name -> (title, caption)

    def save(name: str, fig, title: str, caption: str, missing: str) -> None:
        if fig is None:
            report.skipped[name] = missing
            return
        target = out / f"{name}.png"
        fig.savefig(target, dpi=110)
        plt.close(fig)
        report.figures[name] = target
        drawn[name] = (title, caption)

    if kind == "sweep":
        metric = str(sweep_spec(root).get("metric", "mean_accuracy"))  # the trials are read already
        at = figures.common_round([run for run in runs if len(run.rounds)])
        save("sweep", figures.sweep_by_parameter(runs, metric), f"{metric} at round {at} by searched value",
             f"Each trial's value at round {at}, the last round every trial reached (ASHA may stop a "
             "trial early; hollow markers: its last round), against each searched key.",
             "the sweep searched no keys")
    save("task_accuracy", figures.task_accuracy_over_rounds(runs), "Per-task accuracy over rounds",
         "Each client's current adapter on its own test examples, pooled per task; dashed: "
         "always predicting the most frequent class.", "no evaluated rounds yet")
    rouge = figures.task_rouge_over_rounds(runs)
    if rouge is not None:  # instruction tasks only; never listed as missing for classification
        save("task_rouge", rouge, "Per-task ROUGE-L over rounds",
             "Instruction tasks: ROUGE-L F of greedy answers against the reference responses.", "")
    save("clustering", figures.clustering_over_rounds(runs), "Clustering accuracy and ARI",
         "Hungarian-matched accuracy and adjusted Rand index of the server's grouping of the "
         "uploads against the true tasks (which the server never sees).",
         "no algorithm in this run groups uploads by task")
    if len(runs) > MAX_PROJECTED_RUNS:
        report.skipped["adapters"] = (f"{len(runs)} runs, more than {MAX_PROJECTED_RUNS}: run "
                                      "`fltac-ray report` on one run's folder for its projection")
    for run in runs if len(runs) <= MAX_PROJECTED_RUNS else []:
        name = "adapters" if kind == "run" else f"adapters_{_slug(run.label)}"
        fig, note = _projection_figure(run, projection)
        save(name, fig, f"Uploaded adapters ({run.label})", note, note)
    save("task_radar", figures.task_radar(runs), "Final accuracy per task",
         "The last evaluated round, by algorithm (paper Fig. 2b).", "no evaluated rounds yet")
    save("client_tasks", figures.client_task_shares(runs[0]), "Training examples per client and task",
         "The federation's Dirichlet split (paper Fig. 2a); every run of a comparison shares it "
         "(a sweep shows its first trial's).",
         "no partition.csv")
    save("accuracy_vs_bytes", figures.accuracy_vs_bytes(runs), "Accuracy against communication",
         "Mean accuracy over tasks after each evaluated round against the bytes sent so far, up "
         "and down (float32 adapters).", "no evaluated rounds yet")
    epsilon = figures.accuracy_vs_epsilon(runs)
    if epsilon is not None:  # private runs only; never listed as missing otherwise
        save("accuracy_vs_epsilon", epsilon, "Accuracy against the privacy budget",
             "Each private run's final mean accuracy and clustering accuracy against the epsilon it spent "
             "(rounds.csv epsilon), one line per algorithm and privacy mode; dotted: runs without privacy "
             "and runs that send nothing.", "")
    report.html.write_text(_page(kind, root, runs, report, drawn))
    return report


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


def _projection_figure(run: RunTables, method: str):
    snapshots = read_snapshots(run.run_dir)
    if not snapshots:
        sent = run.rounds.get("params_up")
        uploads_nothing = sent is not None and len(sent) > 0 and bool((sent == 0).all())
        why = ("its algorithm uploads nothing" if uploads_nothing
               else "the run saved no adapter snapshots (report.adapter_snapshots = 0)")
        return None, f"{run.label}: no projection, {why}"
    points, used = [], "PCA"
    for snap in snapshots:
        xy, used = project(snap.adapters, method, seed=int(run.config.get("seed", 0)))
        points.append(xy)
    caption = (f"Each round's uploads projected with {used} (computed per round), coloured by "
               "true task; the marker is the server's assignment (paper Fig. 4).")
    if used == "PCA" and method == "auto":
        caption += " Install umap-learn for UMAP."
    return figures.adapter_projection(run, snapshots, points, used), caption


def rank_label(config: dict) -> object:
    """The final table's rank: model.lora.rank, or under a rank profile its ranks and
    distribution ("1-8 heavy_tail"; every adapter padded to the largest)."""
    lora = config.get("model", {}).get("lora", {})
    profile = lora.get("rank_profile")
    if not profile:
        return lora.get("rank")
    ranks = profile.get("per_client") if profile.get("distribution") == "explicit" else profile.get("ranks")
    ranks = ranks or [lora.get("rank")]
    return f"{min(ranks)}-{max(ranks)} {profile.get('distribution')}"


def final_table(runs: list[RunTables]) -> pd.DataFrame:
    """One row per run: final accuracy per task, their mean, clustering accuracy, bytes sent;
    first, the pre-trained model's row (round 0: the starting adapter, train.eval_round_0), once
    per distinct starting point (runs of one model and seed share it)."""
    rows, starts = [], []
    for run in runs:
        zero = run.metrics[run.metrics["round"] == 0] if not run.metrics.empty else run.metrics
        if len(zero):
            accuracy = {figures.short_task(t): a for t, a in zip(zero["task"], zero["accuracy"], strict=True)}
            if accuracy not in starts:
                starts.append(accuracy)
                rows.append({"run": f"pre-trained (round 0){'' if len(runs) == 1 else ', as ' + run.label}",
                             "algorithm": "-", "rank": "-", **accuracy, "mean": float(zero["accuracy"].mean()),
                             "rounds": 0})
    for run in runs:
        row: dict[str, object] = {"run": run.label, "algorithm": run.algorithm, "rank": rank_label(run.config)}
        if not run.metrics.empty:
            last = final_round_metrics(run.metrics)
            row.update({figures.short_task(t): a for t, a in zip(last["task"], last["accuracy"], strict=True)})
            row["mean"] = float(last["accuracy"].mean())
        if not run.rounds.empty:
            row["cluster acc"] = float(run.rounds["clustering_accuracy"].iloc[-1])
            row["MB up"] = float(run.rounds["bytes_up"].sum() / 1e6)  # clients -> server, all rounds
            row["MB down"] = float(run.rounds["bytes_down"].sum() / 1e6)  # server -> clients
            row["rounds"] = int(run.rounds["round"].max())
            for column, name in (("lora_product_error", "A/B product err"), ("epsilon", "epsilon")):
                values = run.rounds[column].dropna() if column in run.rounds else run.rounds.iloc[:0]
                if len(values):  # the last round's: a run without the measure has no such column
                    row[name] = float(values.iloc[-1])
        rows.append(row)
    # the runs' column order, the pre-trained rows' columns among them
    order = list(dict.fromkeys([key for row in rows[len(starts):] for key in row] + [key for row in rows for key in row]))
    return pd.DataFrame(rows, columns=order)


def _table_html(frame: pd.DataFrame) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return "-" if np.isnan(value) else f"{value:.3f}" if abs(value) < 100 else f"{value:,.1f}"
        return html.escape(str(value))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><tr>{head}</tr>{body}</table>"


# The settings a reader needs to reproduce or compare a run, in this order; the report adds any
# other setting on which the runs of a comparison or sweep differ.
KEY_SETTINGS = ("algorithm", "seed", "rounds", "model.name", "model.lora.rank", "model.lora.rank_profile.distribution",
                "model.lora.rank_profile.ranks", "model.lora.rank_profile.per_client", "model.lora.alpha",
                "model.lora.target_modules", "model.pooling", "model.head", "model.dtype", "train.lr",
                "train.local_steps", "train.batch_size", "train.weight_decay", "data.tasks", "data.num_clients",
                "data.dirichlet_alpha", "data.train_per_task", "federation.client_fraction",
                "algorithm.n_clusters", "algorithm.weighting", "algorithm.aggregation")


def _settings(config: dict) -> dict[str, object]:
    """config.yaml as dotted settings (config.flat_fields), lists as "a, b", empty sections left out."""
    from fltac_ray.config import flat_fields

    return {key: ", ".join(map(str, value)) if isinstance(value, list) else value
            for key, value in flat_fields(config).items() if value != {}}


def settings_table(runs: list[RunTables]) -> pd.DataFrame:
    """One row per setting (KEY_SETTINGS, then every other one the runs differ on), one column
    per run: the values from each run's config.yaml."""
    flat = [_settings(run.config) for run in runs]
    differing = sorted({key for values in flat for key in values
                        if len({repr(values_.get(key)) for values_ in flat}) > 1} - set(KEY_SETTINGS))
    keys = [key for key in KEY_SETTINGS if any(key in values for values in flat)] + differing
    rows = [{"setting": key, **{run.label: values.get(key, "-") for run, values in zip(runs, flat, strict=True)}}
            for key in keys]
    return pd.DataFrame(rows).astype(str)


def _settings_html(runs: list[RunTables]) -> list[str]:
    """Settings, seed and the software each run ran with (environment.json)."""
    import yaml

    from fltac_ray.environment import describe_cpu, read_sessions, versions

    parts = ["<h2>Settings</h2>", "<p>From each run's <code>config.yaml</code>; the full configuration "
             "is below.</p>", _table_html(settings_table(runs))]
    for run in runs:
        parts.append(f"<details><summary>full configuration{'' if len(runs) == 1 else ' of ' + html.escape(run.label)}"
                     f"</summary><pre>{html.escape(yaml.safe_dump(run.config, sort_keys=False))}</pre></details>")
    rows = []
    for run in runs:
        for entry in read_sessions(run.run_dir):
            rows.append({"run": run.label, "session": entry.get("kind", ""), "time": entry.get("time", ""),
                         **entry.get("versions", {}), "platform": entry.get("platform", ""),
                         "cpu": describe_cpu(entry["cpu"]) if "cpu" in entry else "-"})
    parts.append("<h2>Software</h2>")
    if rows:
        parts += ["<p>What each run started (and every resume) with, from its <code>environment.json</code>.</p>",
                  _table_html(pd.DataFrame(rows).fillna("-").astype(str))]
    else:  # runs from before environment.json
        now = ", ".join(f"{name} {version}" for name, version in versions().items())
        parts.append(f"<p>Not recorded by these runs; this report was made with {html.escape(now)}.</p>")
    return parts


def _page(kind: str, root: Path, runs: list[RunTables], report: Report,
          drawn: dict[str, tuple[str, str]]) -> str:
    first = runs[0].config
    data = first.get("data", {})
    title = f"fltac-ray report: {first.get('name', root.name)}"
    summary = {"comparison": f"comparison of {len(runs)} runs", "sweep": f"Ray Tune sweep of {len(runs)} trials"
               }.get(kind, f"algorithm {runs[0].algorithm}")
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(summary)}; model {html.escape(str(first.get('model', {}).get('name')))}, "
        f"{len(data.get('tasks', []))} tasks, {data.get('num_clients')} clients. "
        f"Folder: <code>{html.escape(str(root))}</code>. Made {time.strftime('%Y-%m-%d %H:%M')}.</p>",
        "<h2>Final results</h2>", _table_html(final_table(runs)),
    ]
    for name, path in report.figures.items():
        heading, caption = drawn[name]
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        parts += [f"<h2>{html.escape(heading)}</h2>", f"<p>{html.escape(caption)}</p>",
                  f'<img alt="{html.escape(heading)}" src="data:image/png;base64,{encoded}">']
    adapters = [dict(entry, run=run.label) for run in runs for entry in run.adapters]
    if adapters:
        frame = pd.DataFrame(adapters)
        columns = [c for c in ("run", "cluster", "members", "majority_task", "purity", "folder", "format")
                   if c in frame]
        parts += ["<h2>Exported adapters</h2>",
                  "<p>The final global adapter of every cluster, under each run's <code>adapters/</code> "
                  "(plain peft adapters of the Hugging Face base: each folder's README.md says how to load it; "
                  "<code>fltac_ray.runs.export.load_adapter(folder)</code> does it for any).</p>", _table_html(frame[columns])]
    parts += _settings_html(runs)
    if report.skipped:
        parts += ["<h2>Not drawn</h2>", "<ul>" + "".join(
            f"<li>{html.escape(name)}: {html.escape(why)}</li>" for name, why in report.skipped.items()) + "</ul>"]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
             "pre{background:#f7f7f7;padding:1em;font-size:12px;overflow-x:auto}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
