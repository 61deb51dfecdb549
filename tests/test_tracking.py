"""Experiment tracking offline, read back with each library's own reader: TensorBoard event
files, MLflow's local file store, W&B's offline run file. One tiny run logs to all three."""

from __future__ import annotations

import json

import pytest

from fltac_ray.engine.simulation import Simulation
from fltac_ray.errors import ConfigError
from fltac_ray.progress import Progress
from fltac_ray.tracking import check_trackers, flat_params

from .conftest import tiny_config
from .wandb_records import read_records


def test_config_is_flattened_to_dotted_parameters():
    assert flat_params({"model": {"lora": {"rank": 2, "targets": ["a", "b"]}}, "seed": 3, "x": None}) == {
        "model.lora.rank": 2, "model.lora.targets": "['a', 'b']", "seed": 3, "x": "None"}


def test_a_list_is_short_for_the_backends_and_each_is_named_once():
    assert tiny_config(tracking=["tensorboard", "wandb"]).tracking.backends == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match="tracking.backends"):
        tiny_config(tracking=["mlflow", "mlflow"])
    with pytest.raises(ConfigError, match="tracking.backends"):
        tiny_config(tracking=["neptune"])


def test_a_tracker_that_is_not_installed_is_refused_with_the_install_hint(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError) as info:
        check_trackers(tiny_config(tracking=["tensorboard", "wandb"]))
    assert "['wandb']" in str(info.value) and "fltac-ray[tracking]" in str(info.value)


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    config = tiny_config(rounds=2, output_dir=str(root), engine={"backend": "local"},
                         tracking={"backends": ["tensorboard", "mlflow", "wandb"], "project": "tracked",
                                   "mlflow_uri": str(root / "mlruns"), "wandb_mode": "offline"})
    result = Simulation(config, out=str(root / "run"), progress=Progress(quiet=True)).run()
    return root, result


def test_tensorboard_event_files_hold_every_round_and_the_config(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, result = tracked_run
    events = EventAccumulator(str(root / "run" / "tensorboard"))
    events.Reload()
    logged = events.Scalars("mean_accuracy")
    assert [e.step for e in logged] == result.rounds["round"].tolist()
    assert [e.value for e in logged] == pytest.approx(result.rounds["mean_accuracy"].tolist())  # float32
    topic = result.metrics[(result.metrics["task"] == "synthetic_topic") & (result.metrics["round"] > 0)]
    assert [e.value for e in events.Scalars("accuracy/synthetic_topic")] == pytest.approx(topic["accuracy"].tolist())
    assert {"config", "adapters"} <= {tag.split("/")[0] for tag in events.Tags()["tensors"]}


def test_mlflow_file_store_holds_params_metrics_and_the_adapters(tracked_run):
    from mlflow import MlflowClient

    root, result = tracked_run
    client = MlflowClient((root / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("tracked")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.params["model.lora.rank"] == "1" and run.data.params["algorithm"] == "fltac"
    history = client.get_metric_history(run.info.run_id, "mean_accuracy")
    assert [m.step for m in history] == result.rounds["round"].tolist()
    assert [m.value for m in history] == pytest.approx(result.rounds["mean_accuracy"].tolist())
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapters/cluster_0")}
    assert {"adapters/cluster_0/adapter_model.safetensors", "adapters/cluster_0/adapter_config.json"} <= artifacts


def _key(item) -> str:  # W&B keeps "a/b" keys as nested_key ["a", "b"]
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_run_holds_config_history_and_the_adapters_artifact(tracked_run):
    root, result = tracked_run
    (run_file,) = (root / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_records(run_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    (run_record,) = [r.run for r, k in zip(records, kinds, strict=True) if k == "run"]
    config = {_key(item): json.loads(item.value_json) for item in run_record.config.update}
    assert config["model.lora.rank"] == 1 and run_record.project == "tracked"
    history = [{_key(item): json.loads(item.value_json) for item in r.history.item}
               for r, k in zip(records, kinds, strict=True) if k == "history"]
    assert [h["mean_accuracy"] for h in history] == pytest.approx(result.rounds["mean_accuracy"].tolist())
    (artifact,) = [r.artifact for r, k in zip(records, kinds, strict=True) if k == "artifact"]
    assert artifact.type == "model"
    assert "cluster_0/adapter_model.safetensors" in {entry.path for entry in artifact.manifest.contents}
    assert kinds[-1] == "exit" and records[-1].exit.exit_code == 0


def test_an_unwritable_mlflow_store_is_refused_before_anything_starts(tmp_path, capsys):
    import yaml

    from fltac_ray.cli import main

    from .conftest import TINY_EXPERIMENT

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    experiment = tmp_path / "tracked.yaml"
    experiment.write_text(yaml.safe_dump({**TINY_EXPERIMENT, "output_dir": str(tmp_path / "runs"),
                                          "tracking": {"backends": ["mlflow"], "mlflow_uri": str(blocker / "mlruns")}}))
    assert main(["run", str(experiment)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fltac-ray: error: resources: tracking: the MLflow store {(blocker / 'mlruns').as_uri()}: "
                          f"{blocker / 'mlruns'} {blocker} is a file, not a folder; set tracking.mlflow_uri"), err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run folder left


def test_an_mlflow_store_that_does_not_answer_is_a_resources_error_and_closes_nothing(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from fltac_ray.errors import ResourceUnavailableError
    from fltac_ray.tracking import MlflowTracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    config = tiny_config(tracking={"backends": ["mlflow"], "mlflow_uri": "http://127.0.0.1:9"})
    run = SimpleNamespace(config=config, run_dir=tmp_path, say=print)
    tracker = MlflowTracker()
    with pytest.raises(ResourceUnavailableError, match=r"^tracking: the MLflow store http://127.0.0.1:9 cannot be used \("):
        tracker.on_start(run)
    tracker.on_stop(run, failed=True)  # no "has no attribute client": it never opened
    assert not tracker.opened and not tracker.closed
