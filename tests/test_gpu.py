"""The GPU path, tested on the CPU: the fit planner and its preflight, GPU visibility of Ray
actors (declared GPUs), the coordinator's GPU, cuML's call contract (a stand-in module), the
batched-adapter planner, and the errors of what needs CUDA."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from fltac_ray.engine.gpu_fit import (
    CUDA_CONTEXT_BYTES,
    GIB,
    MIN_WORKING_BYTES,
    GpuFit,
    adapters_that_fit,
    base_bytes_for,
    check_layout,
    default_gpus_per_worker,
    gpu_memory_of,
    resolve_pass_limits,
    workers_per_gpu,
)
from fltac_ray.errors import ConfigError
from tests.conftest import tiny_config


def test_llama_7b_in_bfloat16_fits_an_a10g_once_not_four_times():
    config = tiny_config(data={"tasks": ["wordnet_define"]}, model={"name": "huggyllama/llama-7b"})
    base = base_bytes_for(config, torch.bfloat16)
    assert base == pytest.approx(6.74e9 * 2, rel=0.01)  # 6.74 B parameters in 2 bytes
    a10g = int(gpu_memory_of(["A10G"]) * GIB)
    assert GpuFit(1, base, a10g).fits
    four = GpuFit(workers_per_gpu(0.25), base, a10g)
    assert four.need_bytes == 4 * (CUDA_CONTEXT_BYTES + base + MIN_WORKING_BYTES)
    with pytest.raises(ConfigError) as refused:
        check_layout(four, 0.25, "accelerator type A10G")
    message = str(refused.value)
    for part in ("engine.gpus_per_worker", "4 worker(s) per GPU", "12.55 GiB base copy", "the GPU has 22.0 GiB",
                 "use engine.gpus_per_worker = 1 (1 per GPU)"):
        assert part in message, part
    # 4-bit NF4 linear weights: four copies fit
    quantized = tiny_config(data={"tasks": ["wordnet_define"]},
                            model={"name": "huggyllama/llama-7b", "quantization": "4bit"})
    assert GpuFit(4, base_bytes_for(quantized, torch.bfloat16), a10g).fits


def test_pool_defaults_and_planner_arithmetic():
    assert [workers_per_gpu(g) for g in (0, 0.25, 0.3, 0.5, 1, 2)] == [0, 4, 3, 2, 1, 1]
    assert default_gpus_per_worker(4, gpus_are_real=True) == 1.0
    assert default_gpus_per_worker(1, gpus_are_real=False) == 0.0  # GPUs declared on a CPU machine
    assert default_gpus_per_worker(0, gpus_are_real=True) == 0.0
    assert gpu_memory_of(["A10G", "H100"]) == 22.0 and gpu_memory_of(["A100"]) is None
    # 10 GiB free, 0.8 of it planned, 5 MiB per example, batch 16: 8 GiB / 80 MiB = 102 adapters
    assert adapters_that_fit(10 * GIB, 5 * 2**20, 16) == 102
    assert adapters_that_fit(10, 5 * 2**20, 16) == 1 and adapters_that_fit(10**15, 1.0, 1) == 256


def test_auto_batched_adapters_take_the_smallest_gpus_figure_or_the_cpu_default():
    engine = tiny_config().engine
    resolve_pass_limits(engine, [None, None], batch_size=4)
    assert (engine.max_batched_adapters, engine.max_pass_examples) == (32, 128)
    engine = tiny_config().engine
    resolve_pass_limits(engine, [90, 60, None], batch_size=4)
    assert (engine.max_batched_adapters, engine.max_pass_examples) == (60, 240)
    engine = tiny_config(engine={"max_batched_adapters": 8, "max_pass_examples": 16}).engine
    resolve_pass_limits(engine, [60], batch_size=4)
    assert (engine.max_batched_adapters, engine.max_pass_examples) == (8, 16)  # explicit values stay


def test_the_engine_refuses_a_layout_that_does_not_fit_before_any_actor_starts(ray_cluster, tmp_path,
                                                                               monkeypatch):
    from fltac_ray.engine.ray_backend import RayBackend
    from fltac_ray.engine.simulation import Simulation
    from fltac_ray.progress import Progress

    def no_actor(*args, **kwargs):
        raise AssertionError("an actor was started")

    monkeypatch.setattr(RayBackend, "_start_coordinator", no_actor)
    monkeypatch.setattr(RayBackend, "_launch", no_actor)
    config = tiny_config(output_dir=str(tmp_path), engine={"gpus_per_worker": 0.5, "num_gpus": 1, "gpu_memory_gib": 2.0})
    with pytest.raises(ConfigError) as refused:
        Simulation(config, progress=Progress(quiet=True)).run()
    assert "2 worker(s) per GPU" in str(refused.value) and "engine.gpu_memory_gib = 2" in str(refused.value)


def test_actors_see_only_the_gpus_ray_gave_them(ray_cluster, tmp_path):
    """Workers without a GPU see none (device auto: CPU) and the coordinator sees the one it
    reserved; Ray itself would leave CUDA_VISIBLE_DEVICES as the driver had it."""
    import ray

    from fltac_ray.engine.callbacks import Callback
    from fltac_ray.engine.simulation import Simulation
    from fltac_ray.progress import Progress

    seen = {}

    class Look(Callback):
        def on_start(self, run) -> None:
            backend = run.backend
            seen["workers"] = [ray.get(s.actor.describe.remote())["visible_gpus"] for s in backend.slots]
            seen["coordinator"] = ray.get(backend.coordinator.visible_gpus.remote())

    config = tiny_config(output_dir=str(tmp_path), rounds=1, engine={"coordinator_gpus": 0.5})
    result = Simulation(config, progress=Progress(quiet=True), callbacks=[Look()]).run()
    assert seen == {"workers": ["", ""], "coordinator": "0"}
    saved = (result.run_dir / "config.yaml").read_text()
    assert "gpus_per_worker: 0.0" in saved and "max_batched_adapters: 32" in saved  # resolved, recorded


def test_cuml_receives_float32_c_order_vectors_and_the_seeded_parameters(monkeypatch):
    """The call contract of cuML's KMeans, on a stand-in module (no GPU here)."""
    from fltac_ray.clustering import kmeans_labels, resolve_backend

    calls = []

    class KMeans:
        def __init__(self, **params) -> None:
            calls.append(params)

        def fit_predict(self, vectors):
            calls.append({"dtype": vectors.dtype, "c_contiguous": vectors.flags.c_contiguous,
                          "shape": vectors.shape})
            return np.arange(len(vectors)) % 3

    cuml = types.ModuleType("cuml")
    cuml.cluster = types.SimpleNamespace(KMeans=KMeans)
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))
    monkeypatch.setitem(sys.modules, "cuml", cuml)
    monkeypatch.setitem(sys.modules, "cuml.cluster", cuml.cluster)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    assert resolve_backend("auto") == "cuml"
    vectors = np.asfortranarray(np.random.default_rng(0).normal(size=(12, 5)))  # float64, Fortran order
    labels = kmeans_labels(vectors, 3, seed=7, n_init=4, backend="cuml")
    assert labels.dtype == np.int64 and labels.tolist() == [i % 3 for i in range(12)]
    assert calls == [{"n_clusters": 3, "random_state": 7, "n_init": 4, "output_type": "numpy"},
                     {"dtype": np.float32, "c_contiguous": True, "shape": (12, 5)}]


def test_what_needs_cuda_says_so_on_the_cpu(tmp_path):
    from fltac_ray.engine.simulation import preflight
    from fltac_ray.models.builders import quantization_options

    with pytest.raises(ConfigError, match="model.quantization.*CUDA only"):
        tiny_config(model={"quantization": "4bit"}, engine={"device": "cpu"})
    with pytest.raises(ConfigError, match="model.quantization.*needs a CUDA GPU"):
        preflight(tiny_config(model={"quantization": "8bit"}))
    from fltac_ray.errors import ResourceUnavailableError

    with pytest.raises(ResourceUnavailableError, match="needs a CUDA device"):
        quantization_options("8bit", torch.bfloat16, torch.device("cpu"))
    assert quantization_options("none", torch.bfloat16, torch.device("cpu")) == {}
    with pytest.raises(ConfigError, match="model.gradient_checkpointing.*random-mlp"):
        preflight(tiny_config(data={"tasks": ["synthetic_linear"]}, model={"name": "random-mlp",
                                                                            "gradient_checkpointing": True}))
