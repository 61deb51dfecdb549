"""Reports, snapshots, the Python API and the terminal output."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import fltac_ray
from fltac_ray.cli import main
from fltac_ray.environment import cpu, describe_cpu
from fltac_ray.progress import format_run_summary
from fltac_ray.reporting.projection import pca_2d, project, umap_available
from fltac_ray.runs.snapshots import Snapshot, align_cluster_ids, sample_rows, snapshot_rounds

from .conftest import TINY_EXPERIMENT

FIGURES = {"task_accuracy", "clustering", "adapters", "task_radar", "client_tasks", "accuracy_vs_bytes"}


# --- pure pieces ------------------------------------------------------------------------------
def test_snapshot_rounds_are_evenly_spaced_with_first_and_last():
    assert snapshot_rounds(8, 4) == [1, 3, 6, 8]  # linspace(1, 8, 4) = 1, 3.33, 5.67, 8
    assert snapshot_rounds(2, 4) == [1, 2]
    assert snapshot_rounds(5, 1) == [5]
    assert snapshot_rounds(5, 0) == []


def test_snapshot_sample_is_seeded_sorted_and_bounded():
    assert sample_rows(5, 10, seed=0, round_index=1).tolist() == [0, 1, 2, 3, 4]
    rows = sample_rows(100, 7, seed=0, round_index=3)
    assert len(rows) == 7 == len(set(rows.tolist())) and (np.diff(rows) > 0).all()
    assert rows.tolist() == sample_rows(100, 7, seed=0, round_index=3).tolist()
    assert rows.tolist() != sample_rows(100, 7, seed=0, round_index=4).tolist()


def test_pca_puts_collinear_points_on_the_first_axis():
    points = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [3.0, 3.0, 0.0]])
    xy = pca_2d(points)
    # centred at mean (4/3, 4/3): distances along the line are -4/3, -1/3, 5/3 times sqrt(2)
    np.testing.assert_allclose(np.abs(xy[:, 0]), np.sqrt(2) * np.array([4, 1, 5]) / 3, atol=1e-12)
    np.testing.assert_allclose(xy[:, 1], 0.0, atol=1e-12)
    assert project(points, "pca")[1] == "PCA"
    assert project(points[:3], "auto")[1] == "PCA"  # too few points for UMAP


def test_run_summary_table_from_hand_made_rows():
    metrics = pd.DataFrame({"round": [1, 1, 2, 2], "task": ["a", "b", "a", "b"],
                            "accuracy": [0.5, 0.9, 0.7, 0.8], "majority_accuracy": [0.25, 0.5, 0.25, 0.5],
                            "test_samples": [10, 20, 10, 20]})
    rounds = pd.DataFrame({"round": [1, 2], "status": ["ok", "rejected"], "clustering_accuracy": [1.0, 0.5],
                           "ari": [1.0, 0.0], "bytes_up": [2e6, 1e6], "bytes_down": [1e6, 0.0],
                           "seconds": [3.0, 5.0]})
    text = format_run_summary(metrics, rounds)
    lines = text.splitlines()
    assert re.search(r"\ba\s+0\.700\s+0\.700\s+2\s+0\.250\s+10", lines[1])
    assert re.search(r"\bb\s+0\.800\s+0\.900\s+1\s+0\.500\s+20", lines[2])
    assert re.search(r"mean\s+0\.750", lines[3])
    assert lines[-1] == ("2 rounds (1 rejected); sent 3.00 MB up, 1.00 MB down; final clustering accuracy "
                         "0.50 (ARI 0.00); mean round 4.0s")


def test_run_summary_has_a_round_0_column_when_the_start_was_evaluated():
    metrics = pd.DataFrame({"round": [0, 0, 1, 1], "task": ["a", "b", "a", "b"],
                            "accuracy": [0.1, 0.3, 0.7, 0.8], "majority_accuracy": [0.25, 0.5, 0.25, 0.5],
                            "test_samples": [10, 20, 10, 20]})
    lines = format_run_summary(metrics, pd.DataFrame()).splitlines()
    assert re.search(r"task\s+round 0\s+final\s+best", lines[0])
    assert re.search(r"\ba\s+0\.100\s+0\.700\s+0\.700\s+1\b", lines[1])
    assert re.search(r"mean\s+0\.200\s+0\.750", lines[3])


def _snapshot(round_index: int, keys: list[int], labels: list[int]) -> Snapshot:
    n = len(keys)
    return Snapshot(round_index, np.zeros((n, 2), np.float32), np.array(keys), np.zeros(n, np.int64),
                    np.array(labels), ["t"] * n)


def test_cluster_ids_are_matched_across_rounds_by_the_uploads_they_share():
    rounds = [
        _snapshot(1, [0, 1, 2, 3, 4, 5], [0, 0, 1, 1, 2, 2]),
        _snapshot(2, [0, 1, 2, 3, 4, 5], [2, 2, 0, 0, 1, 1]),  # same clusters, renumbered by K-means
        # clients 0-1 stay together (id 0 last round) and so do 2-3 (id 1); 4-5 are not sampled;
        # 6 and 7 are new clients in a cluster of their own
        _snapshot(3, [0, 1, 2, 3, 6, 7], [1, 1, 0, 0, 2, 2]),
        _snapshot(4, [0, 2, 4, 5], [0, 0, 1, 1]),  # 0 and 2 merged; 4-5 back with their old id 2
    ]
    aligned = align_cluster_ids(rounds)
    assert aligned[0].tolist() == [0, 0, 1, 1, 2, 2]  # the first round keeps its ids
    assert aligned[1].tolist() == [0, 0, 1, 1, 2, 2]
    # K-means' 1 -> 0 and 0 -> 1 (2 shared uploads each); its 2 shares nothing: a new id, 3
    assert aligned[2].tolist() == [0, 0, 1, 1, 3, 3]
    # the merged cluster shares one upload with 0 and one with 1 (a tie: one of them); 4-5 share
    # none with round 3, so their cluster takes the next unused id, 4 — ids are never reused
    assert aligned[3][:2].tolist() in ([0, 0], [1, 1]) and aligned[3][2:].tolist() == [4, 4]


def test_settings_table_lists_the_key_settings_and_every_difference():
    from fltac_ray.reporting.render import settings_table
    from fltac_ray.reporting.runs import RunTables

    def run(label, lr, extra):
        config = {"algorithm": "fltac", "seed": 3, "train": {"lr": lr, "local_steps": 15}, **extra}
        return RunTables(label, Path("."), config, *(pd.DataFrame(),) * 4)

    table = settings_table([run("a", 0.002, {"engine": {"num_workers": 2}}), run("b", 0.01, {})]).set_index("setting")
    assert list(table.index) == ["algorithm", "seed", "train.lr", "train.local_steps", "engine.num_workers"]
    assert table.loc["train.lr"].tolist() == ["0.002", "0.01"] and table.loc["seed"].tolist() == ["3", "3"]
    assert table.loc["engine.num_workers"].tolist() == ["2", "-"]


def test_the_final_table_shows_privacy_spent_and_the_product_error_where_measured():
    from fltac_ray.reporting.render import final_table
    from fltac_ray.reporting.runs import RunTables

    def run(label, extra):
        rounds = pd.DataFrame({"round": [1, 2], "clustering_accuracy": [0.5, 1.0], "bytes_up": [1e6, 1e6],
                               "bytes_down": [2e6, 2e6], **extra})
        return RunTables(label, Path("."), {"algorithm": "fltac"}, pd.DataFrame(), rounds, pd.DataFrame(),
                         pd.DataFrame())

    table = final_table([run("private", {"epsilon": [1.5, 2.25], "lora_product_error": [0.3, 0.2]}),
                         run("plain", {"epsilon": [float("nan")] * 2})]).set_index("run")
    assert table.loc["private", "epsilon"] == 2.25 and table.loc["private", "A/B product err"] == 0.2
    assert pd.isna(table.loc["plain", "epsilon"]) and table.loc["plain", "MB up"] == 2.0


def test_the_report_names_each_runs_rank_profile_in_the_final_and_settings_tables():
    from fltac_ray.reporting.render import final_table, settings_table
    from fltac_ray.reporting.runs import RunTables

    profile = {"rank": 8, "rank_profile": {"distribution": "heavy_tail", "ranks": [1, 2, 4, 8]}}
    explicit = {"rank": 4, "rank_profile": {"distribution": "explicit", "ranks": [1, 4], "per_client": [4, 1, 1]}}
    runs = [RunTables(label, Path("."), {"algorithm": "flora", "model": {"lora": lora}}, *(pd.DataFrame(),) * 4)
            for label, lora in (("profile", profile), ("explicit", explicit), ("one", {"rank": 2}))]
    assert final_table(runs).set_index("run")["rank"].tolist() == ["1-8 heavy_tail", "1-4 explicit", 2]
    settings = settings_table(runs).set_index("setting")
    assert settings.loc["model.lora.rank_profile.distribution"].tolist() == ["heavy_tail", "explicit", "-"]
    assert settings.loc["model.lora.rank_profile.ranks"].tolist() == ["1, 2, 4, 8", "1, 4", "-"]


def test_report_of_a_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "RUN_DIR" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "neither a run directory" in capsys.readouterr().err


@pytest.mark.skipif(umap_available(), reason="umap-learn is installed here")
def test_umap_without_umap_learn_is_refused_before_anything_runs(tmp_path, capsys):
    from fltac_ray.errors import ResourceUnavailableError

    with pytest.raises(ResourceUnavailableError, match="umap-learn is not installed"):
        fltac_ray.run(TINY_EXPERIMENT, out=tmp_path / "never", projection="umap")
    assert not (tmp_path / "never").exists()


# --- end to end --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api_run(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    return fltac_ray.run(TINY_EXPERIMENT, overrides=["rounds=3"], out=out, quiet=True)


def test_api_returns_the_run_as_dataframes(api_run):
    result = api_run
    assert isinstance(result, fltac_ray.Result)
    assert result.rounds["round"].tolist() == [1, 2, 3]
    assert len(result.metrics) == (1 + 3) * 3 and set(result.final.index) == set(TINY_EXPERIMENT["data"]["tasks"])
    assert math.isclose(result.mean_accuracy, result.final["accuracy"].mean())
    pd.testing.assert_frame_equal(result.metrics, pd.read_csv(result.run_dir / "metrics.csv"))
    assert len(result.adapters) == 3 and all((result.run_dir / "adapters" / f).is_dir()
                                            for f in result.adapters["folder"])
    model = result.load_adapter(int(result.adapters["cluster"].iloc[0]))
    assert type(model).__name__ == "PeftModel"
    again = fltac_ray.load_result(result.run_dir)
    pd.testing.assert_frame_equal(again.rounds, result.rounds)


def test_every_run_leaves_the_report_with_all_six_figures(api_run):
    report = api_run.report
    assert report is not None and report.name == "report.html"
    page = report.read_text()
    assert page.count("data:image/png;base64,") == len(FIGURES)  # self-contained: images inline
    assert {p.stem for p in (api_run.run_dir / "report").glob("*.png")} == FIGURES
    for png in (api_run.run_dir / "report").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Exported adapters" in page and "Not drawn" not in page
    assert "<td>pre-trained (round 0)</td>" in page  # the final table's zero-shot row
    assert "<th>MB up</th><th>MB down</th>" in page  # each direction, as the terminal prints them
    # the settings, the seed and the software the run started with (environment.json)
    assert "<h2>Settings</h2>" in page and "<td>seed</td>" in page and "<td>train.lr</td>" in page
    environment = json.loads((api_run.run_dir / "environment.json").read_text())
    versions = environment["sessions"][0]["versions"]
    assert environment["sessions"][0]["kind"] == "start" and versions["torch"] == torch.__version__
    assert f"<td>{versions['peft']}</td>" in page and f"<td>{versions['fltac-ray']}</td>" in page
    # and the CPU the figures are tied to
    assert environment["sessions"][0]["cpu"] == cpu() and f"<td>{describe_cpu(cpu())}</td>" in page
    # snapshots at rounds 1, 2, 3 (report.adapter_snapshots = 4 > rounds) of 3 x n uploads
    assert sorted(p.name for p in (api_run.run_dir / "snapshots").iterdir()) == [
        f"round_0000{r}.safetensors" for r in (1, 2, 3)]


def test_the_cpu_is_named_by_its_widest_vector_extension():
    def info(flags: str) -> str:
        return f"processor\t: 0\nmodel name\t: Test CPU 9\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\n"

    assert cpu(info("avx2 avx512f avx512_bf16 amx_bf16"))["extensions"] == "AMX"
    assert cpu(info("avx2 avx512f avx512_bf16"))["extensions"] == "AVX512_BF16"
    assert cpu(info("avx2 avx512f"))["extensions"] == "AVX512"
    assert cpu(info("avx avx2"))["extensions"] == "AVX2"
    assert cpu(info("avx"))["extensions"] == "none"
    assert cpu(info("avx2"))["model"] == "Test CPU 9"
    assert cpu("")["extensions"] == "unknown"


def test_report_command_redraws_a_finished_run(api_run, capsys):
    assert main(["report", str(api_run.run_dir), "--projection", "pca"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in FIGURES) and "not drawn" not in out


def test_comparison_report_draws_each_algorithm_and_says_what_it_skips(ray_cluster, tmp_path):
    raw = dict(TINY_EXPERIMENT, rounds=2, compare=[{"algorithm": "fltac"}, {"algorithm": "local"}])
    result = fltac_ray.run(raw, out=tmp_path / "cmp", quiet=True)
    assert isinstance(result, fltac_ray.ComparisonResult)
    assert list(result.runs) == ["fltac", "local"] and list(result.summary["label"]) == ["fltac", "local"]
    assert result.runs["local"].adapters.empty  # nothing is federated, nothing exported
    names = {p.stem for p in (tmp_path / "cmp" / "report").glob("*.png")}
    assert names == (FIGURES - {"adapters"}) | {"adapters_fltac"}
    page = result.report.read_text()
    assert "local: no projection, its algorithm uploads nothing" in page


def _hand_made_run(folder, algorithm: str, rouge: bool):
    """A run directory written by hand: 2 tasks, 2 rounds, no clustering, no snapshots."""
    import yaml

    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(
        {"name": "hand", "algorithm": algorithm, "seed": 0,
         "data": {"tasks": ["t1", "t2"], "num_clients": 2, "dirichlet_alpha": 0.5, "min_share": 0.01},
         "model": {"name": "m", "lora": {"rank": 1}}}))
    nan = float("nan")
    pd.DataFrame({"round": [1, 1, 2, 2], "task": ["t1", "t2"] * 2, "accuracy": [0.1, 0.2, 0.3, 0.4],
                  "loss": [1.0] * 4, "clients": [2] * 4, "test_samples": [5] * 4,
                  "majority_accuracy": [nan] * 4 if rouge else [0.5] * 4,
                  "rouge_l": [0.05, 0.1, 0.15, 0.2] if rouge else [nan] * 4}).to_csv(folder / "metrics.csv", index=False)
    pd.DataFrame({"round": [1, 2], "status": ["ok", "ok"], "clustering_accuracy": [nan, nan], "ari": [nan, nan],
                  "bytes_up": [100.0, 100.0], "bytes_down": [100.0, 100.0], "mean_accuracy": [0.15, 0.35],
                  "seconds": [1.0, 1.0]}).to_csv(folder / "rounds.csv", index=False)
    pd.DataFrame({"client": [0, 0, 1, 1], "task": ["t1", "t2"] * 2, "share": [0.5] * 4,
                  "train_samples": [3, 4, 5, 0], "test_samples": [1] * 4}).to_csv(folder / "partition.csv", index=False)
    return folder


def test_instruction_runs_get_a_rouge_figure_and_missing_figures_say_why(tmp_path):
    from fltac_ray.reporting.figures import task_rouge_over_rounds
    from fltac_ray.reporting.render import render_report
    from fltac_ray.reporting.runs import read_run

    run = read_run(_hand_made_run(tmp_path / "lm", "fedit", rouge=True))
    fig = task_rouge_over_rounds([run])
    lines = [ax.get_lines()[0] for ax in fig.axes if ax.get_lines()]
    assert [line.get_ydata().tolist() for line in lines] == [[0.05, 0.15], [0.1, 0.2]]
    report = render_report(run.run_dir)
    assert "task_rouge" in report.figures
    assert report.skipped == {
        "clustering": "no algorithm in this run groups uploads by task",
        "adapters": "fedit: no projection, the run saved no adapter snapshots (report.adapter_snapshots = 0)"}
    classification = read_run(_hand_made_run(tmp_path / "cls", "fedit", rouge=False))
    assert task_rouge_over_rounds([classification]) is None
    assert "task_rouge" not in render_report(classification.run_dir).figures


def test_sweep_figure_averages_each_searched_value(tmp_path):
    from fltac_ray.reporting.figures import final_metric, sweep_by_parameter
    from fltac_ray.reporting.runs import read_run

    runs = []
    for i, (rank, weighting) in enumerate([(1, "samples"), (1, "uniform"), (4, "samples")]):
        run = read_run(_hand_made_run(tmp_path / f"t{i}", "fltac", rouge=False))
        run.rounds.loc[1, "mean_accuracy"] = 0.2 * (i + 1)  # finals 0.2, 0.4, 0.6
        run.params = {"model.lora.rank": rank, "algorithm.weighting": weighting}
        runs.append(run)
    assert [final_metric(r, "mean_accuracy") for r in runs] == pytest.approx([0.2, 0.4, 0.6])
    assert final_metric(runs[0], "accuracy/t2") == pytest.approx(0.4)
    fig = sweep_by_parameter(runs, "mean_accuracy")
    rank_axis, weighting_axis = fig.axes[:2]
    means = rank_axis.get_lines()[0]
    assert means.get_xdata().tolist() == [1.0, 4.0]
    assert means.get_ydata().tolist() == pytest.approx([0.3, 0.6])  # rank 1: mean of 0.2 and 0.4
    assert [t.get_text() for t in weighting_axis.get_xticklabels()] == ["samples", "uniform"]
    assert weighting_axis.get_lines()[0].get_ydata().tolist() == pytest.approx([0.4, 0.4])
