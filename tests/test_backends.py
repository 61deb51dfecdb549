"""One round loop, two backends: the same results on `local` and on Ray with any number of
workers, after a lost worker, and for an algorithm defined right here in the test file."""

import numpy as np
import pandas as pd
import pytest

from fltac_ray.algorithms import Aggregate, FederatedAlgorithm, Uploads, register_algorithm
from fltac_ray.engine.simulation import Simulation
from fltac_ray.progress import Progress
from fltac_ray.runs.checkpoint import read_checkpoint

from .conftest import tiny_config

pytestmark = pytest.mark.usefixtures("ray_cluster")
COMPARED = ["round", "task", "accuracy", "loss", "clients", "test_samples"]


@register_algorithm
class SharedHeadMedian(FederatedAlgorithm):
    """A made-up method: share only the classifier head, aggregated by its coordinate-wise
    median; the LoRA matrices stay personal."""

    name = "shared_head_median"
    summary = "classifier heads shared by their median; LoRA stays on the clients"

    def shared_entries(self) -> np.ndarray:
        return self.spec.entries(lambda name: name.startswith("head."))

    def aggregate(self, uploads: Uploads, round_index: int) -> Aggregate:
        median = np.median(uploads.vectors, axis=0).astype(np.float32)
        return Aggregate(np.zeros(len(uploads.vectors), np.int64), median[None], np.ones(1))


def _run(tmp_path, name, **sections):
    config = tiny_config(**sections)
    return Simulation(config, out=str(tmp_path / name), progress=Progress(quiet=True)).run()


def _same(a, b):
    pd.testing.assert_frame_equal(a.metrics[COMPARED], b.metrics[COMPARED], check_exact=True)
    np.testing.assert_array_equal(a.rounds["train_loss"], b.rounds["train_loss"])
    np.testing.assert_array_equal(a.rounds["params_up"], b.rounds["params_up"])


def test_an_algorithm_defined_in_this_file_runs_on_both_backends(tmp_path):
    # the same passes on both (the default min_passes is each run's worker count)
    local = _run(tmp_path, "local", algorithm="shared_head_median", engine={"backend": "local", "min_passes": 2})
    on_ray = _run(tmp_path, "ray", algorithm="shared_head_median", engine={"num_workers": 2})
    _same(local, on_ray)
    rounds = on_ray.rounds
    head = 4 * 32 + 4  # head.weight (classes, hidden) + head.bias of the tiny BERT
    assert (rounds["params_up"] == rounds["adapters"] * head).all()
    assert (rounds["params_down"] == rounds["adapters"] * head).all()
    assert not (on_ray.run_dir / "adapters").exists()  # no whole global adapter to export


def test_results_depend_on_neither_backend_nor_workers_nor_a_lost_worker(tmp_path):
    # Batched training, dropout on: the passes are cut from the jobs alone (engine.min_passes),
    # every pass is seeded per (round, client, slot, task) and starts from the committed state.
    runs = {
        "local": _run(tmp_path, "local", rounds=4, engine={"backend": "local", "min_passes": 2}),
        "one": _run(tmp_path, "one", rounds=4, engine={"num_workers": 1, "min_passes": 2}),
        "two": _run(tmp_path, "two", rounds=4, engine={"num_workers": 2, "min_passes": 2}),
        # a worker killed in round 3 while the newest checkpoint is round 2's: its passes are
        # retried from round 3's committed state, not from the stale checkpoint
        "killed": _run(tmp_path, "killed", rounds=4, engine={"num_workers": 2, "min_passes": 2,
                                                             "checkpoint_every": 2, "kill_worker_at": [0, 3]}),
    }
    for name in ("one", "two", "killed"):
        _same(runs["local"], runs[name])
    assert (runs["killed"].rounds["status"] == "ok").all()
    assert runs["killed"].rounds["failed_clients"].isna().all()


def test_checkpoints_hold_each_distinct_adapter_once(tmp_path):
    result = _run(tmp_path, "run", rounds=1, engine={"backend": "local"})
    groups = read_checkpoint(result.run_dir / "checkpoints" / "round_00001").groups
    rows, index = groups["clients"]["rows"], groups["clients"]["index"]
    # FL-TAC: every (client, slot) holds its cluster's aggregate: K rows and an index
    assert len(index) == result.rounds.loc[0, "adapters"] == 11
    assert len(rows) == result.rounds.loc[0, "clusters"] == 3
    assert sorted(set(index[:, 2].tolist())) == [0, 1, 2]


def test_the_driver_never_loads_the_base_the_workers_map_it_from_the_node_cache(tmp_path, monkeypatch):
    import fltac_ray.models.builders as builders
    from fltac_ray.models.base_cache import BaseDescription, cache_key

    def refuse(*args, **kwargs):
        raise AssertionError("the driver loaded the base model")

    monkeypatch.setattr(builders, "load_backbone", refuse)  # this process only: workers are others
    cache = tmp_path / "bases"
    result = _run(tmp_path, "run", engine={"num_workers": 2, "base_cache_dir": str(cache)})
    assert len(result.metrics) > 0
    key = cache_key(BaseDescription("tiny-random-bert", "text", 0, 16))
    assert (cache / key / "manifest.json").is_file()
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [key]


class _EvaluateEverything(Simulation):
    """Forgets every earlier evaluation: each evaluating round evaluates every adapter."""

    def _evaluate(self, *args, **kwargs):
        self.state.evaluated.entries.clear()
        return super()._evaluate(*args, **kwargs)


@pytest.mark.parametrize("batched", [False, True])
def test_unchanged_adapters_are_not_reevaluated_and_their_records_are_reused(tmp_path, batched):
    # half the clients train each round; under local training the others' adapters stay as they were
    config = tiny_config(rounds=3, algorithm="local", data={"num_clients": 6},
                         federation={"client_fraction": 0.5},
                         engine={"backend": "local", "batched_training": batched})
    reused = Simulation(config, out=str(tmp_path / "reused"), progress=Progress(quiet=True)).run()
    full = _EvaluateEverything(config, out=str(tmp_path / "full"), progress=Progress(quiet=True)).run()
    clients = ["round", "client", "task", "accuracy", "loss", "test_samples"]
    reused_clients, full_clients = (pd.read_csv(run.run_dir / "clients.csv")[clients] for run in (reused, full))
    if batched:
        # batched evaluation: a result's last bits depend on which adapters share its forward
        # pass, and re-evaluating everything forms other passes than re-evaluating what changed
        pd.testing.assert_frame_equal(reused.metrics[COMPARED], full.metrics[COMPARED], rtol=1e-6)
        pd.testing.assert_frame_equal(reused_clients, full_clients, rtol=1e-6)
    else:  # one adapter at a time: the very same floats
        pd.testing.assert_frame_equal(reused.metrics[COMPARED], full.metrics[COMPARED], check_exact=True)
        pd.testing.assert_frame_equal(reused_clients, full_clients, check_exact=True)
    every = int(full.rounds["evaluated_adapters"].iloc[0])
    assert full.rounds["evaluated_adapters"].tolist() == [every] * 3
    # round 0 evaluated everyone's v^0; from round 1 on only what trained is evaluated again
    assert (reused.metrics["round"] == 0).any()
    assert (reused.rounds["evaluated_adapters"] == reused.rounds["adapters"]).all()
    assert (reused.rounds["adapters"] < every).all()
