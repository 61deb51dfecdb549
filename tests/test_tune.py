"""Ray Tune sweeps: validation before Ray, the pure parts (storage, tie rule, bundles, the trial
checkpoint's layout), and a tiny ASHA sweep end to end on the shared session."""

import json

import pandas as pd
import pytest
import yaml

from fltac_ray.errors import ConfigError
from fltac_ray.progress import Progress
from fltac_ray.tune import (
    SweepSpec,
    bundle_problem,
    load_sweep,
    rank_trials,
    resolve_storage,
    restore_run_dir,
    run_sweep,
    stage_checkpoint,
    trial_bundles,
)

from .conftest import TINY_EXPERIMENT


def _sweep(tmp_path, base=None, **fields):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**TINY_EXPERIMENT, "rounds": 2, **(base or {})}))
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
        ({"search": {"algorithm.n_clusters": {"grid": [2]}}, "set": {"algorithm": "fedit"}}, "not an option of algorithm"),
        ({"metric": "accuracy"}, "metric"),
        ({"search": {}}, "search"),
        ({"keep_checkpoints": 0}, "keep_checkpoints"),
        ({"trial": {"gpus_per_worker": -1}}, "trial.gpus_per_worker"),
    ],
)
def test_bad_sweeps_fail_before_ray(tmp_path, fields, words):
    with pytest.raises(ConfigError) as info:
        load_sweep(_sweep(tmp_path, **fields))
    assert words in str(info.value)


def test_storage_is_the_sweep_folder_on_one_node_and_required_on_several(tmp_path):
    sweep_dir = tmp_path / "sweep"
    assert resolve_storage(None, sweep_dir, nodes=1) == (str(sweep_dir.resolve()), "tune")
    with pytest.raises(ConfigError) as info:
        resolve_storage(None, sweep_dir, nodes=3)
    assert "--storage" in str(info.value) and "3 nodes" in str(info.value) and "s3://" in str(info.value)
    # a relative folder is made absolute (Tune changes each trial's working directory) and created
    shared = tmp_path / "shared"
    assert resolve_storage(str(shared), sweep_dir, nodes=3) == (str(shared.resolve()), "sweep")
    assert shared.is_dir()
    assert resolve_storage(f"file://{shared}", sweep_dir, nodes=3)[0] == str(shared)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a writable folder"):
        resolve_storage(str(tmp_path / "file" / "below"), sweep_dir, nodes=2)
    with pytest.raises(ConfigError, match="not a storage URI"):
        resolve_storage("nosuchscheme://bucket/path", sweep_dir, nodes=2)


def test_one_tie_rule_best_metric_then_more_rounds_then_the_smaller_trial_id():
    table = pd.DataFrame({
        "trial": ["b_00001", "b_00001", "a_00000", "a_00000", "a_00000", "c_00002", "c_00002", "d_00003"],
        "round": [1, 2, 1, 2, 3, 1, 2, 1],
        "mean_accuracy": [0.1, 0.5, 0.2, 0.3, 0.5, 0.4, 0.5, 0.5],
    })
    # b, a, c and d all end at 0.5: a ran 3 rounds; b and c ran 2, b has the smaller id; d ran 1
    assert rank_trials(table, "mean_accuracy", "max")["trial"].tolist() == ["a_00000", "b_00001", "c_00002", "d_00003"]
    table.loc[table["trial"] == "d_00003", "mean_accuracy"] = 0.05
    assert rank_trials(table, "mean_accuracy", "min")["trial"].tolist()[0] == "d_00003"


def test_trial_bundles_hold_driver_coordinator_and_workers_and_must_fit_a_node():
    spec = SweepSpec.model_validate({"experiment": "x.yaml", "search": {"seed": {"grid": [0]}},
                                     "trial": {"workers": 2, "cpus_per_worker": 1, "driver_cpus": 0.1}})
    assert trial_bundles(spec, 0.0, 0.0, 0.0) == [{"CPU": 0.1}, {"CPU": 1}, {"CPU": 1}]
    bundles = trial_bundles(spec, 1.0, 0.5, 0.25)
    assert bundles == [{"CPU": 0.1}, {"CPU": 0.5, "GPU": 0.25}, {"CPU": 1, "GPU": 1.0}, {"CPU": 1, "GPU": 1.0}]
    assert bundle_problem(bundles, [{"CPU": 4.0}, {"CPU": 2.0, "GPU": 1.0}]) is None
    problem = bundle_problem(bundles, [{"CPU": 4.0}])
    assert "0.5 CPU + 0.25 GPU" in problem and "4 CPU, 0 GPU" in problem


def test_a_trial_checkpoint_rebuilds_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "round_00002").mkdir(parents=True)
    (run_dir / "checkpoints" / "round_00002" / "state.json").write_text("{}")
    (run_dir / "adapters").mkdir()
    for name in ("config.yaml", "rounds.csv", "metrics.csv", "placement.json"):
        (run_dir / name).write_text(name)
    folder = stage_checkpoint(run_dir, run_dir / "checkpoints" / "round_00002", tmp_path / "staged")
    restored = tmp_path / "elsewhere" / "run"
    restore_run_dir(folder, restored)
    assert sorted(p.relative_to(restored).as_posix() for p in restored.rglob("*") if p.is_file()) == [
        "checkpoints/round_00002/state.json", "config.yaml", "metrics.csv", "placement.json", "rounds.csv"]


@pytest.mark.usefixtures("ray_cluster")
def test_tiny_asha_sweep_exports_every_trial_names_one_best_and_resumes(tmp_path):
    import fltac_ray
    from fltac_ray.reporting.figures import final_metric
    from fltac_ray.reporting.render import render_report
    from fltac_ray.reporting.runs import read_runs

    out = tmp_path / "sweep"
    path = _sweep(tmp_path, base={"rounds": 3, "tracking": ["tensorboard"]},
                  search={"model.lora.rank": {"grid": [1, 2]}, "algorithm.n_clusters": {"grid": [1, 3]}},
                  scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2})
    sweep_dir, table, best = run_sweep(path, str(out), Progress(quiet=True))
    assert sweep_dir == out.resolve()
    saved = pd.read_csv(out / "sweep.csv")
    assert saved["round"].dtype.kind == "i" and table["round"].dtype.kind == "i"
    assert sorted(saved["model.lora.rank"].unique()) == [1, 2]
    rounds = saved.groupby("trial")["round"].max()
    assert len(rounds) == 4 and rounds.max() == 3 and rounds.min() < 3  # ASHA stopped some trials
    assert {"mean_accuracy", "clustering_accuracy", "accuracy/synthetic_topic"} <= set(saved.columns)
    # one trial name everywhere: sweep.csv, trials/, Tune's folders in the storage, the run names
    trials = sorted(p.name for p in (out / "trials").iterdir())
    assert trials == sorted(rounds.index) == sorted(p.name for p in (out / "tune").iterdir() if p.is_dir())
    for trial in trials:  # every trial, stopped or finished, exported the adapters of its last round
        folder = out / "trials" / trial
        index = json.loads((folder / "adapters" / "index.json").read_text())
        clusters = int(saved.loc[saved["trial"] == trial, "algorithm.n_clusters"].iloc[0])
        assert len(index) == clusters
        assert pd.read_csv(folder / "rounds.csv")["round"].max() == rounds[trial]
        assert yaml.safe_load((folder / "config.yaml").read_text())["name"] == f"tiny_{trial}"
        assert any((folder / "tensorboard").glob("events.out.tfevents.*"))  # tracking in a sweep
        assert not (folder / "checkpoints").exists()  # they stay in the storage
    # Tune kept at most keep_checkpoints (2) per trial
    assert max(len(list((out / "tune" / t).glob("checkpoint_*"))) for t in trials) == 2
    ranked = rank_trials(saved, "mean_accuracy", "max")
    assert best["trial"] == ranked["trial"].iloc[0]
    summary = json.loads((out / "best.json").read_text())
    assert summary["trial"] == best["trial"] and summary["adapters"] == f"trials/{best['trial']}/adapters"
    result = fltac_ray.load_result(out)
    assert result.best_trial == best["trial"] and result.best.run_dir.name == best["trial"]
    assert set(result.runs) == set(trials)
    model = result.load_adapter(0)  # the best trial's adapter, in plain peft
    assert type(model).__name__ == "PeftModel"
    # the sweep's report: one line per trial, and the sweep figure at the round every trial reached
    kind, runs = read_runs(out)
    assert kind == "sweep" and len(runs) == 4
    assert [final_metric(r, "mean_accuracy") for r in runs] == pytest.approx(
        [ranked.set_index("trial").loc[r.run_dir.name, "mean_accuracy"] for r in runs])
    report = render_report(out)
    assert {"sweep", "task_accuracy", "clustering"} <= set(report.figures)
    assert "at round 2" in (out / "report.html").read_text() or "at round 1" in (out / "report.html").read_text()
    # resuming a finished sweep restores it and reproduces the table
    _, again, again_best = run_sweep(None, None, Progress(quiet=True), resume=str(out))
    pd.testing.assert_frame_equal(again.sort_values(["trial", "round"]).reset_index(drop=True),
                                  table.sort_values(["trial", "round"]).reset_index(drop=True))
    assert again_best["trial"] == best["trial"]


@pytest.mark.usefixtures("ray_cluster")
def test_a_sweep_whose_trials_crashed_mid_run_resumes_to_the_uninterrupted_results(tmp_path):
    compared = ["model.lora.rank", "round", "mean_accuracy", "clustering_accuracy", "train_loss"]

    def sweep(name: str, algorithm: str):
        folder = tmp_path / name
        folder.mkdir()
        return _sweep(folder, base={"algorithm": algorithm, "output_dir": str(folder)})

    _, reference, _ = run_sweep(sweep("reference", "fltac"), str(tmp_path / "reference" / "out"), Progress(quiet=True))
    path = sweep("crashed", "tests.flaky_algorithm:FailsOnceAtRound2")
    out = tmp_path / "crashed" / "out"
    _, first, _ = run_sweep(path, str(out), Progress(quiet=True))
    assert first["round"].max() == 1  # every trial crashed in round 2, after reporting round 1
    _, resumed, _ = run_sweep(None, None, Progress(quiet=True), resume=str(out))
    assert sorted(resumed["round"].unique()) == [1, 2]
    pd.testing.assert_frame_equal(
        resumed[compared].sort_values(compared[:2]).reset_index(drop=True),
        reference[compared].sort_values(compared[:2]).reset_index(drop=True), check_exact=True)
    for trial in resumed["trial"].unique():  # the run directories continued where they stopped
        rounds = pd.read_csv(out / "trials" / trial / "rounds.csv")
        assert rounds["round"].tolist() == [1, 2]


@pytest.mark.usefixtures("ray_cluster")
def test_a_sweep_over_methods_for_heterogeneous_ranks_runs_and_reports(tmp_path, capsys):
    """experiments/sweep_rank_profiles.yaml's shape: a grid over algorithms, one given with its
    options as a mapping, under a rank profile; the terminal shows fltac-ray's lines per trial,
    not Ray Tune's boxed header or its TensorBoard hint."""
    from fltac_ray.reporting.render import render_report

    base = {"model": {"name": "tiny-random-bert", "lora": {"rank": 2, "rank_profile": {"ranks": [1, 2]}}},
            "rounds": 1}
    path = _sweep(tmp_path, base=base, search={
        "algorithm": {"grid": ["fedit", "flora", {"name": "fltac", "n_clusters": 2}]},
        "model.lora.rank_profile.distribution": {"grid": ["heavy_tail"]}})
    out = tmp_path / "sweep"
    capsys.readouterr()
    _, table, best = run_sweep(path, str(out), Progress())
    printed = capsys.readouterr().out
    assert printed.count(" started") == 3 and printed.count(" finished") == 3, printed
    for tune_own in ("View detailed results", "tensorboard --logdir", "Configuration for experiment", "╭"):
        assert tune_own not in printed, tune_own
    assert table["trial"].nunique() == 3 and best["trial"] in set(table["trial"])
    algorithms = {yaml.safe_load((out / "trials" / t / "config.yaml").read_text())["algorithm"]["name"]
                  for t in table["trial"].unique()}
    assert algorithms == {"fedit", "flora", "fltac"}
    assert "sweep" in render_report(out).figures
