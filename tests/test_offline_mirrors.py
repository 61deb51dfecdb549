"""The offline mirrors of the paper scenarios, end to end on the packaged models (shortened: fewer
rounds and examples than the files, which `fltac-ray run experiments/<file>.yaml` runs in full)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fltac_ray.config import apply_overrides, build_config, read_yaml
from fltac_ray.engine.simulation import Simulation
from fltac_ray.progress import Progress

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]
EXPERIMENTS = Path(__file__).parents[1] / "experiments"


def _run(name: str, overrides: list[str], tmp_path: Path):
    raw = apply_overrides(read_yaml(EXPERIMENTS / f"{name}.yaml"), overrides)
    config = build_config(raw)
    return config, Simulation(config, out=str(tmp_path / name), progress=Progress(quiet=True)).run()


def test_vision_mirror_learns_on_efficientnet(tmp_path):
    config, result = _run("mirror_vision", ["rounds=2", "data.train_per_task=300", "data.test_per_task=100"], tmp_path)
    last = result.metrics[result.metrics["round"] == 2]
    assert sorted(last["task"]) == sorted(config.data.tasks)
    assert (last["accuracy"] > last["majority_accuracy"] + 0.1).all()
    assert (result.rounds["clustering_accuracy"] == 1.0).all()


def test_instruction_mirror_trains_smollm2_and_scores_answers(tmp_path):
    config, result = _run("mirror_instruction", [
        "rounds=1", "data.train_per_task=40", "data.test_per_task=16", "train.local_steps=2",
        "train.max_new_tokens=8"], tmp_path)
    metrics = result.metrics[result.metrics["round"] == 1]
    assert sorted(metrics["task"]) == sorted(config.data.tasks)
    assert (result.metrics["round"] == 0).sum() == len(config.data.tasks)  # the pre-trained SmolLM2
    assert metrics["rouge_l"].between(0, 1).all() and np.isfinite(metrics["perplexity"]).all()
    assert (metrics["perplexity"] > 1).all()


def test_floral_concept_shift_scenarios_run(tmp_path):
    config, result = _run("floral_synthetic_linear", ["rounds=2"], tmp_path)
    assert sorted(result.metrics["task"].unique()) == sorted(config.data.task_names)
    last = result.metrics[result.metrics["round"] == 2]
    assert (last["accuracy"] > last["majority_accuracy"]).all()
    config, result = _run("floral_rotation", ["rounds=1", "data.train_per_task=120", "data.test_per_task=48"], tmp_path)
    trained = result.metrics[result.metrics["round"] == 1]
    assert sorted(trained["task"]) == ["fashion_mnist@rot0", "fashion_mnist@rot180",
                                       "fashion_mnist@rot270", "fashion_mnist@rot90"]
