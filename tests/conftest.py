"""Shared fixtures: one Ray session for the whole test run, bound to 127.0.0.1."""

from __future__ import annotations

import os

# Must be set before ray is imported anywhere (Ray reads it at import time).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from fltac_ray.config import build_config

TINY_EXPERIMENT = {
    "name": "tiny",
    "rounds": 2,
    "data": {
        "tasks": ["synthetic_sentiment", "synthetic_topic", "synthetic_tense"],
        "num_clients": 4,
        "min_share": 0.01,  # fixed, not 0.1 / num_clients: expectations are computed on this split
        "train_per_task": 64,
        "test_per_task": 32,
        "max_length": 16,
    },
    "model": {"name": "tiny-random-bert"},
    "train": {"local_steps": 2, "batch_size": 4, "lr": 1e-2},
}


def tiny_config(**sections):
    """The tiny experiment with some sections or fields replaced (nested dicts merge)."""
    raw = {key: dict(value) if isinstance(value, dict) else value for key, value in TINY_EXPERIMENT.items()}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)
        else:
            raw[key] = value
    return build_config(raw)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for every engine test: 2 CPUs and 1 *declared* GPU, so fractional-GPU actors
    are scheduled (and tested) on machines without a GPU; training still runs on the CPU."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
