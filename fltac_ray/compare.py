"""Run several algorithms on the same partition and seed, and put their results side by side.

An experiment file with a `compare:` list is a comparison: the rest of the file is the shared
base, and each entry holds what differs for one algorithm (plus an optional `label`). Command-line
`--set` overrides apply to every entry last. Every entry is validated before anything runs.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fltac_ray.config import (
    ExperimentConfig,
    algorithm_name,
    apply_overrides,
    build_config,
    read_yaml,
)
from fltac_ray.errors import ConfigError, ConfigIssue
from fltac_ray.progress import Progress
from fltac_ray.runs.outputs import final_round_metrics


@dataclass
class Variant:
    label: str
    config: ExperimentConfig


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        # an entry's algorithm replaces the base's whole, options included (they belong to it)
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "algorithm":
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_variants(path: str | Path, overrides: list[str] | None = None) -> list[Variant] | None:
    """The variants of a comparison file, or None when the file holds a single experiment."""
    return variants_from_raw(read_yaml(path), overrides, str(path))


def variants_from_raw(raw: dict[str, Any], overrides: list[str] | None = None,
                      path: str = "<config>") -> list[Variant] | None:
    """The variants of a comparison mapping (`compare:` list), or None for a single experiment."""
    raw = copy.deepcopy(raw)
    entries = raw.pop("compare", None)
    if entries is None:
        return None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ConfigError([ConfigIssue("compare", entries, "must be a non-empty list of mappings")], str(path))
    issues: list[ConfigIssue] = []
    variants: list[Variant] = []
    for index, entry in enumerate(entries):
        entry = dict(entry)
        label = str(entry.pop("label", algorithm_name(entry.get("algorithm", raw.get("algorithm", "fltac")))))
        where = f"compare[{index}] ({label})"
        try:
            config = build_config(apply_overrides(_merge(raw, entry), list(overrides or [])))
        except ConfigError as exc:
            issues.extend(ConfigIssue(f"{where}: {i.field}", i.value, i.allowed) for i in exc.issues)
            continue
        variants.append(Variant(label, config))
    labels = [v.label for v in variants]
    for label in sorted({x for x in labels if labels.count(x) > 1}):
        issues.append(ConfigIssue("compare[].label", label, "labels must be unique; add `label:` to entries"))
    for index, variant in enumerate(variants[1:], start=1):
        first = variants[0].config
        if variant.config.data != first.data or variant.config.seed != first.seed:
            issues.append(ConfigIssue(
                f"compare[{index}] ({variant.label})", "data/seed",
                "differ from the first entry; a comparison runs every algorithm on the same "
                "partition and seed (vary data in a sweep instead)"))
    if issues:
        raise ConfigError(issues, str(path))
    return variants


def comparison_tables(results: dict[str, Any], variants: list[Variant]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(tidy table: one row per variant, round and task; summary: one row per variant)."""
    frames, summary = [], []
    for variant in variants:
        result = results[variant.label]
        config = variant.config
        rounds = result.rounds.set_index("round")
        per_task = result.metrics.join(
            rounds[["mean_accuracy", "clustering_accuracy", "params_up_per_client", "bytes_up", "bytes_down"]],
            on="round")
        per_task.insert(0, "lora_rank", config.model.lora.rank)
        per_task.insert(0, "algorithm", config.algorithm)
        per_task.insert(0, "label", variant.label)
        frames.append(per_task)
        last = final_round_metrics(result.metrics)
        row: dict[str, Any] = {"label": variant.label, "algorithm": config.algorithm,
                               "lora_rank": config.model.lora.rank}
        row.update({task: acc for task, acc in zip(last["task"], last["accuracy"], strict=True)})
        row["mean_accuracy"] = float(last["accuracy"].mean())
        row["params_up_per_client_per_round"] = float(rounds["params_up_per_client"].mean())
        row["bytes_up_total"] = int(rounds["bytes_up"].sum())
        row["final_clustering_accuracy"] = float(rounds["clustering_accuracy"].iloc[-1])
        row["wall_seconds"] = round(result.wall_seconds, 1)
        summary.append(row)
    return pd.concat(frames, ignore_index=True), pd.DataFrame(summary)


def run_comparison(variants: list[Variant], out: str | None, progress: Progress) -> tuple[Path, pd.DataFrame]:
    from fltac_ray.engine.ray.session import ray_session
    from fltac_ray.engine.run_setup import preflight
    from fltac_ray.engine.simulation import Simulation
    from fltac_ray.runs.outputs import make_run_dir

    for variant in variants:  # every machine-dependent check before the first run starts
        preflight(variant.config)
    base = variants[0].config
    run_dir = make_run_dir(base.output_dir, base.name, out)
    progress.say(f"[fltac-ray] comparison of {len(variants)} runs on the same partition: "
                 f"{', '.join(v.label for v in variants)}")
    results = {}
    started = time.perf_counter()
    with ray_session(base.engine, progress.say):  # one Ray for all runs
        for variant in variants:
            progress.say(f"\n=== {variant.label} ===")
            results[variant.label] = Simulation(
                variant.config, out=str(run_dir / variant.label), progress=progress).run()
    tidy, summary = comparison_tables(results, variants)
    tidy.to_csv(run_dir / "comparison.csv", index=False)
    summary.to_csv(run_dir / "summary.csv", index=False)
    progress.say(f"\n[fltac-ray] comparison done in {time.perf_counter() - started:.1f}s; "
                 f"{run_dir / 'comparison.csv'} (one row per run, round and task), "
                 f"{run_dir / 'summary.csv'}")
    progress.say(format_summary(summary))
    return run_dir, summary


def format_summary(summary: pd.DataFrame) -> str:
    shown = summary.copy()
    for column in shown.columns:
        if shown[column].dtype.kind == "f" and column != "wall_seconds":
            shown[column] = shown[column].map(lambda v: "-" if np.isnan(v) else f"{v:.3f}")
    shown["params_up_per_client_per_round"] = summary["params_up_per_client_per_round"].map(lambda v: f"{v:,.0f}")
    shown = shown.drop(columns=["bytes_up_total"]).rename(columns={
        "params_up_per_client_per_round": "params_up/client/round", "final_clustering_accuracy": "cluster_acc"})
    shown.columns = [c.removeprefix("wordnet_").removeprefix("synthetic_") for c in shown.columns]
    return shown.to_string(index=False)
