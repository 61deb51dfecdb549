"""End-to-end runs of the Ray engine on the tiny model (one shared Ray session)."""

import ipaddress
import json
import os

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml
from safetensors.numpy import load_file

from fltac_ray.engine.simulation import Simulation
from fltac_ray.errors import ConfigError
from fltac_ray.progress import Progress
from fltac_ray.runs.outputs import METRICS_COLUMNS, ROUNDS_COLUMNS

from .conftest import tiny_config

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _run(config, out):
    return Simulation(config, out=str(out), progress=Progress(quiet=True)).run()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return _run(tiny_config(), tmp_path_factory.mktemp("tiny") / "run")


def test_run_writes_config_metrics_rounds_and_adapters(tiny_run):
    run_dir = tiny_run.run_dir
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["algorithm"]["n_clusters"] == 3 and saved["rounds"] == 2

    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics.columns) == METRICS_COLUMNS
    assert len(metrics) == (1 + 2) * 3  # (round 0: the starting adapter, and 2 rounds) x tasks
    assert metrics["round"].tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert metrics["accuracy"].between(0, 1).all() and np.isfinite(metrics["loss"]).all()
    assert (metrics["test_samples"] > 0).all()

    rounds = pd.read_csv(run_dir / "rounds.csv")
    assert list(rounds.columns) == ROUNDS_COLUMNS + ["kmeans_backend"]  # FL-TAC's round_metrics
    assert rounds["round"].tolist() == [1, 2]
    assert rounds["clustering_accuracy"].between(0, 1).all()
    assert (rounds["kmeans_backend"] == "sklearn").all()
    assert (rounds["rejected_uploads"] == 0).all()

    index = json.loads((run_dir / "adapters" / "index.json").read_text())
    assert len(index) == 3
    assert {entry["format"] for entry in index} == {"peft"}
    tensors = load_file(str(run_dir / "adapters" / index[0]["folder"] / "adapter_model.safetensors"))
    head = tensors["base_model.model.task_head.weight"]
    assert head.shape == (4, 32)  # (classes, hidden)
    size = sum(t.size for t in tensors.values())
    # every upload is one full adapter of float32
    assert (rounds["params_up"] == rounds["adapters"] * size).all()
    assert (rounds["bytes_up"] == rounds["params_up"] * 4).all()

    partition = pd.read_csv(run_dir / "partition.csv")
    assert partition.groupby("task")["train_samples"].sum().tolist() == [64, 64, 64]


def test_result_frames_match_the_files(tiny_run):
    pd.testing.assert_frame_equal(tiny_run.metrics, pd.read_csv(tiny_run.run_dir / "metrics.csv"))
    assert tiny_run.wall_seconds > 0


def test_one_actor_per_client_on_fractional_gpus(tmp_path):
    config = tiny_config(engine={"clients_per_actor": 1, "cpus_per_worker": 0.25,
                                 "gpus_per_worker": 0.25, "num_gpus": 1}, rounds=1)
    result = _run(config, tmp_path / "run")
    assert len(result.rounds) == 1
    assert result.rounds.loc[0, "clients"] == len(
        pd.read_csv(result.run_dir / "partition.csv").query("train_samples > 0")["client"].unique())


def test_partial_participation_samples_clients(tmp_path):
    config = tiny_config(data={"num_clients": 6}, federation={"client_fraction": 0.5})
    result = _run(config, tmp_path / "run")
    assert (result.rounds["clients"] <= 3).all()


def test_a_run_says_how_many_clients_its_split_left_empty(tmp_path):
    import io

    # a share threshold above 1 / clients empties some clients of every task
    config = tiny_config(rounds=1, data={"num_clients": 12, "min_share": 0.12},
                         federation={"client_fraction": 0.5}, engine={"backend": "local"})
    printed = io.StringIO()
    result = Simulation(config, out=str(tmp_path / "run"), progress=Progress(stream=printed, bar=False)).run()
    partition = pd.read_csv(result.run_dir / "partition.csv")
    holding = partition.loc[partition["train_samples"] > 0, "client"].nunique()
    assert 0 < holding < 12
    text = printed.getvalue()
    assert f"{12 - holding} of 12 clients hold no data after the split (data.min_share = 0.12" in text
    assert f"for {holding} clients ({-(-holding // 2)} sampled per round)" in text
    assert (result.rounds["clients"] == -(-holding // 2)).all()


def test_an_unusable_base_cache_dir_fails_before_any_actor_starts(tmp_path):
    (tmp_path / "file").write_text("not a folder")  # (permissions would not stop root)
    config = tiny_config(engine={"base_cache_dir": str(tmp_path / "file" / "bases")})
    with pytest.raises(ConfigError) as info:
        _run(config, tmp_path / "run")
    issue = info.value.issues[0]
    assert (issue.field, issue.value) == ("engine.base_cache_dir", str(tmp_path / "file" / "bases"))
    assert "cannot create or write" in issue.allowed and "writable node-local folder" in issue.allowed
    assert not (tmp_path / "run").exists()


def test_too_many_actors_fail_before_any_actor_starts(tmp_path):
    config = tiny_config(engine={"clients_per_actor": 1, "cpus_per_worker": 1.0})
    with pytest.raises(ConfigError, match="engine.clients_per_actor"):
        _run(config, tmp_path / "run")


def test_gpu_fraction_without_a_gpu_fails_before_ray(tmp_path):
    config = tiny_config(engine={"gpus_per_worker": 0.5})
    with pytest.raises(ConfigError, match="engine.gpus_per_worker"):
        _run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_existing_results_are_never_overwritten(tiny_run):
    from fltac_ray.errors import RunFolderError

    with pytest.raises(RunFolderError, match="--out exists"):
        _run(tiny_config(), tiny_run.run_dir)


def test_ray_listens_on_loopback_only(ray_cluster):
    # Every socket that this test process and the Ray processes it started listen on.
    ours = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
    listening = [c for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert listening, "found no listening Ray socket to check"
    not_loopback = [c for c in listening if not _is_loopback(c.laddr.ip)]
    assert not not_loopback, not_loopback


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def test_round_0_is_the_starting_adapter_whatever_the_training(tmp_path, capsys):
    """Round 0 evaluates v^0 (the pre-trained model with a zero LoRA update): a function of the
    seed and the model only, so runs that train differently agree on it and differ after."""
    import io

    runs = []
    for lr in (1e-2, 5e-2):
        stream = io.StringIO()
        config = tiny_config(rounds=1, train={"local_steps": 2, "batch_size": 4, "lr": lr}, engine={"backend": "local"})
        runs.append(Simulation(config, out=str(tmp_path / f"lr{lr}"), progress=Progress(stream=stream, bar=False)).run())
        said = stream.getvalue()
        assert "round   0/1" in said and "the starting adapter (pre-trained model)" in said
        assert "round 0" in said.split("task")[-1].splitlines()[0]  # the summary's start column
    zero = [run.metrics[run.metrics["round"] == 0].reset_index(drop=True) for run in runs]
    assert len(zero[0]) == 3
    pd.testing.assert_frame_equal(zero[0], zero[1], check_exact=True)
    clients = [pd.read_csv(run.run_dir / "clients.csv") for run in runs]
    pd.testing.assert_frame_equal(clients[0][clients[0]["round"] == 0], clients[1][clients[1]["round"] == 0],
                                  check_exact=True)
    first = [run.metrics[run.metrics["round"] == 1]["loss"].to_numpy() for run in runs]
    assert not np.array_equal(first[0], first[1])
    off = tiny_config(rounds=1, train={"eval_round_0": False}, engine={"backend": "local"})
    result = Simulation(off, out=str(tmp_path / "off"), progress=Progress(quiet=True)).run()
    assert result.metrics["round"].min() == 1
