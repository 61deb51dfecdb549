"""The GPU path, tested on the CPU: the fit planner and its preflight, GPU visibility of Ray
actors (declared GPUs), the coordinator's GPU, cuML's call contract (a stand-in module), the
batched-adapter planner, and the errors of what needs CUDA."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch

from fltac_ray.client.gpu_fit import (
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
    # 8 GiB planned, 1 MiB per pass, 80 MiB per adapter (5 MiB per example, batch 16): 102 adapters
    from fltac_ray.client.gpu_fit import PassMemory

    per_pass = PassMemory(2**20, 80 * 2**20)
    assert adapters_that_fit(8 * GIB, per_pass) == 102
    assert adapters_that_fit(80 * 2**20, per_pass) == 0 and adapters_that_fit(10**15, PassMemory(0, 1)) == 256


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
    from fltac_ray.engine.ray.backend import RayBackend
    from fltac_ray.engine.ray.pool import WorkerPool
    from fltac_ray.engine.simulation import Simulation
    from fltac_ray.progress import Progress

    def no_actor(*args, **kwargs):
        raise AssertionError("an actor was started")

    monkeypatch.setattr(RayBackend, "_start_coordinator", no_actor)
    monkeypatch.setattr(WorkerPool, "launch", no_actor)
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
    decided = json.loads((result.run_dir / "decisions.json").read_text())  # resolved, recorded
    assert (decided["gpus_per_worker"], decided["max_batched_adapters"]) == (0.0, 32)


def test_cuml_receives_float32_c_order_vectors_and_the_seeded_parameters(monkeypatch):
    """The call contract of cuML's KMeans, on a stand-in module (no GPU here)."""
    from fltac_ray.server.clustering import kmeans_labels, resolve_backend

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
    from fltac_ray.engine.run_setup import preflight
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


def test_a_gpu_torch_cannot_use_is_an_error_never_a_quiet_cpu_run(monkeypatch):
    """engine.device x (GPUs Ray assigned, a real GPU on the node) x torch sees CUDA."""
    from fltac_ray.client.cuda_device import choose_device
    from fltac_ray.errors import ResourceUnavailableError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = torch.device("cpu")
    assert choose_device("auto", [], True) == cpu  # a Ray worker without a GPU of its own
    assert choose_device("auto", ["0"], False) == cpu  # a GPU only declared to Ray (CPU machine)
    assert choose_device("auto", None, False) == cpu  # in process, no GPU here
    assert choose_device("cpu", ["0"], True) == cpu  # on purpose
    for setting, assigned, detected, says in (
            ("auto", ["0"], True, "this worker holds a GPU, but torch cannot use CUDA"),
            ("auto", None, True, "this machine has an NVIDIA GPU, but torch cannot use CUDA"),
            ("cuda", ["1"], False, "engine.device = 'cuda', but torch cannot use CUDA")):
        with pytest.raises(ResourceUnavailableError) as refused:
            choose_device(setting, assigned, detected)
        message = str(refused.value)
        assert says in message and f"torch {torch.__version__} is a CPU-only build" in message
        assert "NVIDIA driver:" in message and "engine.device: cpu" in message
    assert "GPU id(s) 1 assigned by Ray" in message
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_device("auto", ["0"], True) == torch.device("cuda")
    assert choose_device("auto", None, True) == torch.device("cuda")
    assert choose_device("auto", [], True) == cpu  # Ray hid the node's GPUs from this worker
    with pytest.raises(ResourceUnavailableError, match="Ray assigned this worker no GPU"):
        choose_device("cuda", [], True)


def test_a_worker_that_cannot_use_its_gpu_stops_the_run_before_round_one(ray_cluster, tmp_path):
    """engine.device: cuda on workers holding the declared GPU: every worker refuses at start, and
    the driver gets fltac-ray's own error (not Ray's ActorDiedError text), before any round.
    (engine.ray_address joins the running Ray: the driver's preflight is about this machine.)"""
    from fltac_ray.engine.simulation import Simulation
    from fltac_ray.errors import ResourceUnavailableError
    from fltac_ray.progress import Progress

    config = tiny_config(output_dir=str(tmp_path), engine={
        "device": "cuda", "gpus_per_worker": 0.5, "num_workers": 2, "ray_address": "auto",
        "reserve_timeout_s": 60})
    with pytest.raises(ResourceUnavailableError) as refused:
        Simulation(config, progress=Progress(quiet=True)).run()
    message = str(refused.value)
    assert "engine.device = 'cuda', but torch cannot use CUDA" in message
    assert "GPU id(s) 0 assigned by Ray" in message
    run_dirs = list(tmp_path.glob("tiny-*"))
    assert all(not (d / "rounds.csv").is_file() or len((d / "rounds.csv").read_text().splitlines()) <= 1
               for d in run_dirs)


LLAMA_7B_BF16 = 6.74e9 * 2  # bytes of the base (test_llama_7b_in_bfloat16_fits_an_a10g_once_not_four_times)


def test_passes_are_sized_to_the_workers_part_of_the_gpu_not_its_free_memory():
    """Llama-7B in bfloat16 at engine.gpus_per_worker 0.5 on an H200 (139.8 GiB): the old planner
    gave each of the two workers 80% of the free memory it saw first (both ~100 GiB of passes:
    181 GiB planned on one GPU); now each plans within its half."""
    from fltac_ray.client.gpu_fit import PassMemory, worker_budget

    total = int(gpu_memory_of(["H200"]) * GIB)
    resident = CUDA_CONTEXT_BYTES + int(LLAMA_7B_BF16)
    free_first = total - resident  # the first worker, alone on the GPU so far
    memory = PassMemory(fixed_bytes=1 * GIB, per_adapter_bytes=2 * GIB)
    half = worker_budget(total, free_first, 0.5, resident)
    assert half == int((total * 0.5 - resident) * 0.8)  # its half, less its base, 80% planned
    assert adapters_that_fit(half, memory) == int((half - GIB) // (2 * GIB)) == 22  # (45.5 - 1) / 2 GiB
    whole = worker_budget(total, free_first, 1.0, resident)
    assert whole == int(free_first * 0.8) and adapters_that_fit(whole, memory) == 50
    # two workers' plans together stay inside the GPU: bases, contexts and passes
    assert 2 * (resident + memory.for_adapters(22)) < total
    # never more than is free now (a process outside Ray holds memory on this GPU)
    assert worker_budget(total, 10 * GIB, 1.0, resident) == int(10 * GIB * 0.8)
    assert worker_budget(total, 0, 1.0, resident) == 0
    assert adapters_that_fit(10 * GIB, PassMemory(0, 10**6), most=256) == 256  # capped


def test_one_adapter_that_cannot_fit_is_refused_with_what_to_change():
    """Llama-7B without gradient checkpointing on a 24 GB GPU: ~10 GB for one adapter's batch of
    4 against ~7 GiB the worker may plan with: refused at start, not a CUDA OOM mid-round."""
    from fltac_ray.client.gpu_fit import PassMemory, pass_does_not_fit, worker_budget

    config = tiny_config(data={"tasks": ["wordnet_define"], "max_length": 256},
                         model={"name": "huggyllama/llama-7b"}, train={"batch_size": 4})
    total = int(gpu_memory_of(["A10G"]) * GIB)
    resident = CUDA_CONTEXT_BYTES + int(LLAMA_7B_BF16)
    budget = worker_budget(total, total - resident, 1.0, resident)
    memory = PassMemory(fixed_bytes=int(0.5 * GIB), per_adapter_bytes=int(9.5 * GIB))
    assert adapters_that_fit(budget, memory) == 0
    message = str(pass_does_not_fit(config, memory, budget, "NVIDIA A10G"))
    for part in ("NVIDIA A10G", "needs 10.00 GiB", "0.50 GiB per pass + 9.50 GiB per adapter of 4 examples",
                 f"may use {budget / GIB:.2f} GiB", "model.gradient_checkpointing: true",
                 "train.batch_size (now 4)", "model.quantization: 8bit or 4bit", "data.max_length (now 256)"):
        assert part in message, part


def test_the_pass_is_measured_after_a_warm_up_at_the_batch_size_and_from_two_passes(monkeypatch):
    """measure_pass_memory on a fake CUDA allocator: a warm-up pass (cuBLAS's workspace) that
    counts for nothing, then one adapter (600 bytes over the resting 100) and two (1,000): the
    slope 400 is one adapter's share, 200 the pass's fixed part."""
    import fltac_ray.client.batched_training as batched
    from fltac_ray.client.gpu_fit import PassMemory

    passes, peaks = [], iter([5_000, 700, 1_100, 5_000, 900, 1_500])  # warm-up (ignored), 1 adapter, 2 adapters
    monkeypatch.setattr(batched, "train_batched", lambda model, jobs, batch_size, *rest, privacy=None:
                        passes.append((len(jobs), batch_size, privacy)))
    for name, value in (("synchronize", None), ("reset_peak_memory_stats", None), ("empty_cache", None),
                        ("memory_allocated", 100)):
        monkeypatch.setattr(torch.cuda, name, lambda *a, v=value: v)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: next(peaks))

    class Model:
        def get_adapter(self):
            return np.zeros(3, np.float32)

    memory = batched.measure_pass_memory(Model(), None, np.arange(16), 2, torch.device("cuda"))
    assert passes == [(1, 16, None), (1, 16, None), (2, 16, None)]
    assert memory == PassMemory(fixed_bytes=200, per_adapter_bytes=400) and memory.for_adapters(3) == 1_400
    # DP-SGD (privacy.mode: example): the measured passes are DP-SGD's, per-example copies and all
    from fltac_ray.privacy.dp_sgd import ExamplePrivacy

    privacy = ExamplePrivacy(1.0, 1.0, 16)
    private = batched.measure_pass_memory(Model(), None, np.arange(16), 2, torch.device("cuda"), privacy)
    assert passes[3:] == [(1, 16, privacy)] * 2 + [(2, 16, privacy)]
    assert private == PassMemory(fixed_bytes=200, per_adapter_bytes=600)


def test_the_longest_rows_fill_the_batch():
    from fltac_ray.client.worker import longest_rows
    from fltac_ray.data.federated import EncodedSplit

    split = EncodedSplit({"lengths": np.array([3, 9, 1, 9, 5])}, np.zeros(5, np.int64))
    assert longest_rows(split, 3).tolist() == [1, 3, 4]
    assert longest_rows(split, 7).tolist() == [0, 1, 1, 2, 3, 3, 4]  # fewer rows than the batch: repeated
    images = EncodedSplit({"pixels": np.zeros((4, 1))}, np.zeros(4, np.int64))
    assert longest_rows(images, 2).tolist() == [0, 1]


def test_workers_starting_together_on_one_gpu_take_turns(tmp_path):
    """gpu_lock's file lock: a second process cannot take it while the first holds it."""
    import multiprocessing

    from fltac_ray.client.gpu_fit import file_lock

    context = multiprocessing.get_context("spawn")
    held, release = context.Event(), context.Event()
    child = context.Process(target=_hold_lock, args=("GPU-test-uuid", held, release))
    child.start()
    try:
        assert held.wait(60)
        import fcntl
        import tempfile
        from pathlib import Path

        path = Path(tempfile.gettempdir()) / "fltac-ray-gpu-locks" / "GPU-test-uuid.lock"
        with open(path, "a") as handle, pytest.raises(BlockingIOError):
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken by the child
        release.set()
        child.join(60)
        with file_lock("GPU-test-uuid"):  # free again
            pass
    finally:
        release.set()
        child.join(60)


def _hold_lock(key, held, release) -> None:
    from fltac_ray.client.gpu_fit import file_lock

    with file_lock(key):
        held.set()
        release.wait(60)


def test_a_coordinator_on_part_of_a_gpu_is_counted_against_whole_gpu_workers():
    """engine.coordinator_gpus 0.5 with 8 workers of 1 GPU: the coordinator's GPU cannot take a
    ninth worker's whole GPU, said before the wait (and in the timeout's error), with the fix."""
    from fltac_ray.engine.placement import plan_worker_count
    from fltac_ray.engine.ray.pool import coordinator_gpu_note

    engine = tiny_config(engine={"coordinator_gpus": 0.5, "gpus_per_worker": 1, "num_workers": 8}).engine
    note = coordinator_gpu_note(engine, 8)
    for part in ("holds 0.5 GPU", "the 8 workers need 8 other GPUs", "engine.num_workers = 7",
                 "engine.gpus_per_worker = 0.5"):
        assert part in note, part
    shared = tiny_config(engine={"coordinator_gpus": 0.5, "gpus_per_worker": 0.5}).engine
    assert coordinator_gpu_note(shared, 8) == ""  # a half-GPU worker fits beside it
    assert coordinator_gpu_note(tiny_config(engine={"gpus_per_worker": 1}).engine, 8) == ""
    # on a cluster of known size (not joined with engine.ray_address) the plan counts it already
    engine.num_workers = None
    assert plan_worker_count(100, engine, cpus=64, gpus=8) == 7


def test_tf32_is_set_for_cuda_workers_as_configured():
    from fltac_ray.client.precision import configure_cuda_math

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        configure_cuda_math(torch.device("cuda"), tf32=False, deterministic=False)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        configure_cuda_math(torch.device("cuda"), tf32=True, deterministic=False)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        torch.backends.cuda.matmul.allow_tf32 = False
        configure_cuda_math(torch.device("cpu"), tf32=True, deterministic=False)
        assert torch.backends.cuda.matmul.allow_tf32 is False  # a CPU worker leaves CUDA alone
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_a_cuda_worker_streams_a_checkpoint_onto_its_device(monkeypatch):
    """No whole host copy of the base on the way to the GPU: from_pretrained gets a device_map
    naming the worker's device (a CPU worker, none)."""
    from transformers import AutoModel

    from fltac_ray.models.builders import load_backbone

    seen = []

    def from_pretrained(source, **options):
        seen.append(options)
        return torch.nn.Linear(2, 2)

    monkeypatch.setattr(AutoModel, "from_pretrained", from_pretrained)
    load_backbone("someone/some-bert", "text", dtype=torch.bfloat16, device=torch.device("cuda"))
    load_backbone("someone/some-bert", "text", dtype=torch.bfloat16, device=torch.device("cuda", 1))
    load_backbone("someone/some-bert", "text", dtype=torch.bfloat16, device=torch.device("cpu"))
    assert [options.get("device_map") for options in seen] == [{"": 0}, {"": 1}, None]
    assert all(options["dtype"] is torch.bfloat16 for options in seen)


def test_a_batch_is_cut_to_its_longest_example_on_the_host():
    """The device never reads the width back: token columns arrive cut to the rows' longest."""
    from fltac_ray.client.training import rows_to_device

    inputs = {"input_ids": np.arange(20, dtype=np.int32).reshape(2, 10), "lengths": np.array([3, 6], np.int32),
              "token_type_ids": np.zeros((2, 10), np.int32), "references": np.array(["a", "b"])}
    out = rows_to_device(inputs, np.array([0]), torch.device("cpu"))
    assert set(out) == {"input_ids", "lengths", "token_type_ids"}  # references are not tensors
    assert out["input_ids"].tolist() == [[0, 1, 2]] and out["token_type_ids"].shape == (1, 3)
    both = rows_to_device(inputs, np.array([1, 0]), torch.device("cpu"))
    assert both["input_ids"].shape == (2, 6) and both["lengths"].tolist() == [6, 3]


def test_a_worker_checks_its_part_of_the_gpu_and_what_is_free_before_loading(monkeypatch):
    """check_worker_gpu on fake CUDA memory reports: Llama-7B bfloat16 (12.55 GiB) at 0.5 GPU on
    an A10G has an 11 GiB part (refused even on an empty GPU); on an H200 its 70 GiB part fits,
    unless the others on that GPU left too little free."""
    from fltac_ray.client.gpu_fit import check_worker_gpu
    from fltac_ray.errors import ResourceUnavailableError

    def gpu(total_gib, free_gib, name):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * GIB), int(total_gib * GIB)))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    half = tiny_config(data={"tasks": ["wordnet_define"]}, model={"name": "huggyllama/llama-7b"},
                       engine={"gpus_per_worker": 0.5})
    gpu(22.0, 21.5, "NVIDIA A10G")
    with pytest.raises(ResourceUnavailableError) as refused:
        check_worker_gpu(half, torch.device("cuda"), torch.bfloat16)
    for part in ("NVIDIA A10G (22.0 GiB) has 21.5 GiB free", "its part is 11.0 GiB (engine.gpus_per_worker = 0.5)",
                 "12.55 GiB for its copy of the base", "2 worker(s) share this GPU"):
        assert part in str(refused.value), part
    gpu(139.8, 139.0, "NVIDIA H200")
    check_worker_gpu(half, torch.device("cuda"), torch.bfloat16)  # fits its half
    gpu(139.8, 10.0, "NVIDIA H200")  # another process holds most of the GPU
    with pytest.raises(ResourceUnavailableError, match="has 10.0 GiB free"):
        check_worker_gpu(half, torch.device("cuda"), torch.bfloat16)
