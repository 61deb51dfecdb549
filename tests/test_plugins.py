"""Algorithms, tasks and models from outside the package (tests/plugin_example.py), on both
backends, and the errors a bad plug-in gets."""

import numpy as np
import pandas as pd
import pytest

from fltac_ray.config import build_config
from fltac_ray.engine.simulation import Simulation
from fltac_ray.errors import ConfigError
from fltac_ray.progress import Progress

from .conftest import tiny_config

PLUGIN = "tests.plugin_example"


def _run(tmp_path, name, **sections):
    config = tiny_config(plugins=[PLUGIN], **sections)
    return Simulation(config, out=str(tmp_path / name), progress=Progress(quiet=True)).run()


@pytest.mark.usefixtures("ray_cluster")
def test_a_csv_task_and_an_algorithm_by_module_path_run_on_both_backends(tmp_path):
    sections = {"algorithm": f"{PLUGIN}:MeanOfHalves", "data": {"tasks": ["fixture_reviews", "synthetic_topic"],
                                                               "train_per_task": 160, "test_per_task": 64}}
    local = _run(tmp_path, "local", engine={"backend": "local", "min_passes": 2}, **sections)
    on_ray = _run(tmp_path, "ray", engine={"num_workers": 2}, **sections)
    columns = ["round", "task", "accuracy", "loss", "test_samples"]
    pd.testing.assert_frame_equal(local.metrics[columns], on_ray.metrics[columns], check_exact=True)
    partition = pd.read_csv(on_ray.run_dir / "partition.csv")
    assert partition.query("task == 'fixture_reviews'")["train_samples"].sum() == 160
    # one answer per upload: as many answer rows as uploads
    assert (on_ray.rounds["clusters"] == on_ray.rounds["adapters"]).all()


@pytest.mark.usefixtures("ray_cluster")
def test_a_registered_model_family_trains_vector_tasks(tmp_path):
    result = _run(tmp_path, "mlp", model={"name": "plugin-mlp"},
                  data={"tasks": ["synthetic_linear"], "concept_shift": {"kind": "rank1", "clusters": 2}})
    rounds = result.rounds
    # LoRA rank 1 on `hidden` (16 -> 24): A (1, 16) + B (24, 1); head (4, 24) + (4,)
    assert (rounds["params_up"] == rounds["adapters"] * (16 + 24 + 4 * 24 + 4)).all()
    assert result.metrics["accuracy"].between(0, 1).all()


def test_plugin_errors_name_the_field():
    with pytest.raises(ConfigError) as info:
        build_config({"plugins": ["no_such_module_anywhere"]})
    assert info.value.issues[0].field == "plugins" and "no_such_module_anywhere" in info.value.issues[0].allowed
    with pytest.raises(ConfigError) as info:
        build_config({"algorithm": f"{PLUGIN}:NoSuchClass"})
    assert info.value.issues[0].field == "algorithm" and "NoSuchClass" in info.value.issues[0].allowed
    with pytest.raises(ConfigError) as info:
        build_config({"algorithm": "numpy:ndarray"})
    assert "not a subclass" in info.value.issues[0].allowed


def test_plugin_loaders_are_checked_against_what_they_registered():
    from fltac_ray.data.federated import _checked_plugin
    from fltac_ray.data.registry import TaskSpec
    from fltac_ray.data.types import LabelledTexts

    spec = TaskSpec("x", 2, "plugin", "", "text", loader=lambda config, rng: None)
    good = LabelledTexts(["a", "b"], np.array([0, 1]), ["no", "yes"])
    assert _checked_plugin(spec, good) is good
    with pytest.raises(ValueError, match="3 classes"):
        _checked_plugin(spec, LabelledTexts(["a"], np.array([0]), ["a", "b", "c"]))
    with pytest.raises(ValueError, match="labels must be in 0..1"):
        _checked_plugin(spec, LabelledTexts(["a"], np.array([2]), ["no", "yes"]))
    with pytest.raises(ValueError, match="returned list"):
        _checked_plugin(spec, [good])
