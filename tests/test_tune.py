"""Ray Tune sweeps: validation before Ray, and a tiny sweep end to end on the shared session."""

import pandas as pd
import pytest
import yaml

from fltac_ray.errors import ConfigError
from fltac_ray.progress import Progress
from fltac_ray.tune import load_sweep, run_sweep

from .conftest import TINY_EXPERIMENT


def _sweep(tmp_path, **fields):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**TINY_EXPERIMENT, "rounds": 2}))
    spec = {"name": "tiny_sweep", "experiment": "base.yaml",
            "search": {"model.lora.rank": {"grid": [1, 2]}},
            "scheduler": {"name": "fifo"}, **fields}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"search": {"model.lora.rank": {"grid": [0, 1]}}}, "model.lora.rank"),
        ({"search": {"train.lr": {"loguniform": [1e-2, 1e-4]}}}, "low < high"),
        ({"search": {"train.lr": {"gaussian": [0, 1]}}}, "exactly one of"),
        ({"search": {"federation.n_clusters": {"grid": [2]}}, "set": {"algorithm": "fedit"}}, "not used by algorithm"),
        ({"metric": "accuracy"}, "metric"),
        ({"search": {}}, "search"),
    ],
)
def test_bad_sweeps_fail_before_ray(tmp_path, fields, words):
    with pytest.raises(ConfigError) as info:
        load_sweep(_sweep(tmp_path, **fields))
    assert words in str(info.value)


@pytest.mark.usefixtures("ray_cluster")
def test_tiny_sweep_reports_every_round_and_resumes(tmp_path):
    out = tmp_path / "sweep"
    sweep_dir, table, best = run_sweep(_sweep(tmp_path), str(out), Progress(quiet=True))
    assert sweep_dir == out
    saved = pd.read_csv(out / "sweep.csv")
    assert len(saved) == 2 * 2  # trials x rounds: one report per round
    assert sorted(saved["model.lora.rank"].unique()) == [1, 2]
    assert saved.groupby("trial")["round"].apply(list).tolist() == [[1.0, 2.0], [1.0, 2.0]]
    assert {"mean_accuracy", "clustering_accuracy", "accuracy/synthetic_topic"} <= set(saved.columns)
    assert best["model.lora.rank"] in (1, 2)
    # every trial kept its engine checkpoints and wrote its own run directory
    trials = sorted((out / "trials").iterdir())
    assert len(trials) == 2 and all((t / "checkpoints").is_dir() for t in trials)
    # the sweep's report: one line per trial, labelled by its searched values, and the sweep figure
    from fltac_ray.reporting.figures import final_metric
    from fltac_ray.reporting.render import render_report
    from fltac_ray.reporting.runs import read_runs

    kind, runs = read_runs(out)
    assert kind == "sweep" and [r.label for r in runs] == ["rank=1", "rank=2"]
    finals = saved.sort_values("round").groupby("model.lora.rank").tail(1).set_index("model.lora.rank")
    assert [final_metric(r, "mean_accuracy") for r in runs] == pytest.approx(finals.loc[[1, 2], "mean_accuracy"].tolist())
    report = render_report(out)
    assert {"sweep", "task_accuracy", "clustering", "adapters_rank_1", "adapters_rank_2"} <= set(report.figures)
    # resuming a finished sweep restores it and reproduces the table
    _, again, _ = run_sweep(None, None, Progress(quiet=True), resume=str(out))
    pd.testing.assert_frame_equal(again.sort_values(["trial", "round"]).reset_index(drop=True),
                                  table.sort_values(["trial", "round"]).reset_index(drop=True))
