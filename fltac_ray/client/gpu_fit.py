"""Do the workers' copies of the base fit their GPUs? Planning functions and the worker's own check.

Host memory lets a node's workers share one copy of the frozen base (models/base_cache.py maps
the same pages); GPU memory does not: every worker is its own process with its own CUDA context
and its own copy of the base on the device. With w workers on one GPU
(engine.gpus_per_worker = 1/w):

    w x (CUDA context + base + working memory for a pass)  <=  the GPU's memory

Ray's fractions only throttle scheduling; they cap nothing, so without this check the second
13.5 GB Llama-7B copy on a 24 GB A10G fails with a CUDA out-of-memory error inside a worker.
The driver checks the layout before any actor starts when it knows the GPUs' memory
(engine.gpu_memory_gib, this machine's GPU, or the nodes' Ray accelerator type); every GPU
worker checks its real device again before loading the base.

`adapters_that_fit` sizes engine.max_batched_adapters: auto from the worker's part of its GPU
(`worker_budget`: Ray's fraction of the total, less its base) and the memory of a pass it
measured (`PassMemory`: a fixed part plus one adapter's batch, parameters and optimiser state);
when not one adapter's step fits, the worker refuses to start (`pass_does_not_fit`) with what to
change, instead of a CUDA out-of-memory error mid-round. `gpu_lock` keeps workers that start
together on one GPU from all passing the check before any of them holds its base.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fltac_ray.errors import ConfigError, ConfigIssue, ResourceUnavailableError

GIB = 2 ** 30
# A CUDA context with PyTorch's kernels loaded lazily (CUDA 12): 300-500 MiB per process on
# A100/H100-class GPUs; the larger figure, so the check errs on the side of refusing.
CUDA_CONTEXT_BYTES = 512 * 2 ** 20
# The least a worker needs beside its base for one batched pass (activations, optimizer rows).
MIN_WORKING_BYTES = 1 * GIB
# Share of the free memory a batched pass may plan to use (the rest: allocator fragmentation).
PLANNED_SHARE = 0.8
AUTO_ADAPTERS_CPU = 32  # engine.max_batched_adapters: auto without a GPU (the former default)
MAX_AUTO_ADAPTERS = 256

# Memory torch reports for one GPU of each Ray accelerator type (GiB, approximate). A100 and V100
# come in two sizes under one name, so they are absent: set engine.gpu_memory_gib for them.
GPU_MEMORY_GIB = {
    "T4": 14.6, "L4": 22.0, "A10G": 22.0, "A10": 22.0, "L40S": 44.4, "A100-40G": 39.4,
    "A100-80G": 79.1, "H100": 79.1, "H200": 139.8, "P100": 15.9, "P4": 7.4, "K80": 11.2,
}

# bytes per weight of a bitsandbytes-quantised Linear layer: int8; NF4 plus one float32 absmax
# per block of 64 (double quantisation shrinks that further; not counted)
QUANTIZED_BYTES = {"8bit": 1.0, "4bit": 0.5 + 4 / 64}


def workers_per_gpu(gpus_per_worker: float) -> int:
    """How many workers one GPU holds: 1/gpus_per_worker for fractions, else 1 (a worker with
    several GPUs uses its first)."""
    if gpus_per_worker <= 0:
        return 0
    return max(1, math.floor(1 / gpus_per_worker + 1e-9)) if gpus_per_worker < 1 else 1


def default_gpus_per_worker(cluster_gpus: float, gpus_are_real: bool) -> float:
    """engine.gpus_per_worker unset: one worker per GPU (each trains all its adapters batched)
    when the cluster has GPUs; 0 when it has none, or only GPUs declared to Ray on machines
    without one (`gpus_are_real`: this machine has CUDA or Ray detected a GPU model on a node)."""
    return 1.0 if cluster_gpus >= 1 and gpus_are_real else 0.0


def estimate_base_bytes(model: Any, dtype_bytes: int, quantization: str = "none") -> int:
    """Bytes of the frozen base on the GPU, from its architecture (a model on the meta device:
    models/builders.build_on_meta): floating-point tensors at `dtype_bytes` each; with
    `quantization`, the Linear layers' weights at QUANTIZED_BYTES (bitsandbytes keeps the output
    layer in the base dtype)."""
    import torch

    quantized: set[int] = set()
    if quantization != "none":
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        quantized = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not output}
    total, seen = 0.0, set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue  # tied weights once
        seen.add(id(tensor))
        if id(tensor) in quantized:
            total += tensor.numel() * QUANTIZED_BYTES[quantization]
        elif tensor.is_floating_point():
            total += tensor.numel() * dtype_bytes
        else:
            total += tensor.numel() * tensor.element_size()
    return int(total)


@dataclass(frozen=True)
class GpuFit:
    """One GPU's memory against the workers it holds (all bytes)."""

    workers: int
    base_bytes: int
    gpu_bytes: int
    context_bytes: int = CUDA_CONTEXT_BYTES
    working_bytes: int = MIN_WORKING_BYTES

    @property
    def per_worker_bytes(self) -> int:
        return self.context_bytes + self.base_bytes + self.working_bytes

    @property
    def need_bytes(self) -> int:
        return self.workers * self.per_worker_bytes

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.gpu_bytes

    @property
    def most_workers(self) -> int:
        return self.gpu_bytes // self.per_worker_bytes

    def explain(self) -> str:
        return (f"{self.workers} worker(s) per GPU x ({self.context_bytes / GIB:.1f} GiB CUDA context + "
                f"{self.base_bytes / GIB:.2f} GiB base copy + {self.working_bytes / GIB:.1f} GiB working memory) = "
                f"{self.need_bytes / GIB:.1f} GiB, the GPU has {self.gpu_bytes / GIB:.1f} GiB")


def check_layout(fit: GpuFit, gpus_per_worker: float, source: str) -> None:
    """ConfigError naming the numbers when the layout cannot fit (`source`: where the GPU's
    memory figure comes from)."""
    if fit.fits:
        return
    most = fit.most_workers
    advice = (f"use engine.gpus_per_worker = {1 / most:g} ({most} per GPU) or 1 (one worker per GPU "
              "training all its adapters batched: the default)" if most >= 1 else
              "the base does not fit one GPU even alone: use model.dtype: bfloat16, model.quantization: "
              "8bit or 4bit, or larger GPUs")
    raise ConfigError([ConfigIssue(
        "engine.gpus_per_worker", gpus_per_worker,
        f"the workers' base copies do not fit the GPU ({source}): {fit.explain()}; every worker "
        f"holds its own copy (Ray's GPU fractions do not share memory); {advice}")])


def gpu_memory_of(accelerator_types: list[str]) -> float | None:
    """GiB of the smallest GPU among the nodes' Ray accelerator types; None when one is unknown."""
    sizes = [GPU_MEMORY_GIB.get(kind) for kind in accelerator_types]
    if not sizes or any(size is None for size in sizes):
        return None
    return min(sizes)  # type: ignore[type-var]


@dataclass(frozen=True)
class PassMemory:
    """GPU memory of one batched training step, measured (batched_training.measure_pass_memory):
    `fixed_bytes` + `per_adapter_bytes` x adapters. One adapter's part is the activations of its
    train.batch_size examples (on the longest examples: buckets pad to their longest), its stacked
    parameters, gradients and AdamW moments: the slope between a pass of one adapter and one of
    two, both after a warm-up step (cuBLAS's workspace and the autocast caches are paid once, by
    the warm-up, not counted per adapter)."""

    fixed_bytes: int
    per_adapter_bytes: int

    @classmethod
    def from_two_passes(cls, one_adapter: int, two_adapters: int) -> PassMemory:
        slope = max(two_adapters - one_adapter, 1)
        return cls(max(one_adapter - slope, 0), slope)

    def for_adapters(self, count: int) -> int:
        return self.fixed_bytes + count * self.per_adapter_bytes


def gpu_part(total_bytes: int, gpus_per_worker: float | None) -> float:
    """A worker's part of its GPU's memory: Ray's fraction of the total (0.25 is a quarter; unset
    or 1: the whole GPU)."""
    return total_bytes * min(gpus_per_worker or 1.0, 1.0)


def worker_budget(total_bytes: int, free_bytes: int, gpus_per_worker: float | None, resident_bytes: int,
                  share: float = PLANNED_SHARE) -> int:
    """Bytes a worker's passes may plan to use on its GPU: its part of the GPU (Ray's fraction of
    the total: 0.25 is a quarter; Ray never places fractions summing over 1 on one GPU, the
    coordinator's engine.coordinator_gpus included) less what it holds already (`resident_bytes`:
    its CUDA context, base and head), never more than is free now, times `share` (the rest:
    allocator fragmentation)."""
    return max(0, int(min(gpu_part(total_bytes, gpus_per_worker) - resident_bytes, free_bytes) * share))


def adapters_that_fit(budget_bytes: int, memory: PassMemory, most: int = MAX_AUTO_ADAPTERS) -> int:
    """engine.max_batched_adapters: auto on a GPU: the adapters whose batched step fits the
    budget, at most `most`; 0 when not even one adapter's step fits."""
    room = budget_bytes - memory.fixed_bytes
    return int(min(most, max(0, room // max(memory.per_adapter_bytes, 1))))


def pass_does_not_fit(config: Any, memory: PassMemory, budget_bytes: int, device_name: str) -> ResourceUnavailableError:
    """The refusal when one adapter's step does not fit, before any training, with what to change."""
    model, train, data = config.model, config.train, config.data
    levers = []
    if not model.gradient_checkpointing:
        levers.append("model.gradient_checkpointing: true (activations recomputed in backward)")
    levers.append(f"a smaller train.batch_size (now {train.batch_size})")
    if model.quantization == "none":
        levers.append("model.quantization: 8bit or 4bit (a smaller base leaves more room)")
    levers.append(f"a smaller data.max_length (now {data.max_length})")
    if (config.engine.gpus_per_worker or 1.0) < 1:
        levers.append(f"engine.gpus_per_worker: 1 (now {config.engine.gpus_per_worker:g}: a part of the GPU)")
    return ResourceUnavailableError(
        f"one adapter's training step does not fit this worker's GPU memory ({device_name}): it needs "
        f"{memory.for_adapters(1) / GIB:.2f} GiB ({memory.fixed_bytes / GIB:.2f} GiB per pass + "
        f"{memory.per_adapter_bytes / GIB:.2f} GiB per adapter of {train.batch_size} examples, measured), the "
        f"worker may use {budget_bytes / GIB:.2f} GiB after its base. Use " + "; or ".join(levers))


def resolve_pass_limits(engine: Any, adapters_fit: list[int | None], batch_size: int) -> None:
    """engine.max_batched_adapters: auto -> the smallest of the workers' figures (so passes are
    cut alike whichever worker runs them; recorded in decisions.json by the run), or
    AUTO_ADAPTERS_CPU without GPU workers. On GPUs, an engine.max_pass_examples left at its
    default grows to match (it bounds a CPU worker's memory; the GPU figure already does)."""
    if engine.max_batched_adapters != "auto":
        return
    fits = [fit for fit in adapters_fit if fit is not None]
    engine.max_batched_adapters = min(fits) if fits else AUTO_ADAPTERS_CPU
    if fits and "max_pass_examples" not in engine.model_fields_set:
        engine.max_pass_examples = max(engine.max_pass_examples, engine.max_batched_adapters * batch_size)


def base_bytes_for(config: Any, dtype: Any = None) -> int:
    """The configured base's size on a GPU with its floats in `dtype` (architecture only).
    None: model.dtype as a GPU worker will resolve it (precision.gpu_itemsize)."""
    from fltac_ray.client.precision import gpu_itemsize
    from fltac_ray.models.builders import build_on_meta

    itemsize = dtype.itemsize if dtype is not None else gpu_itemsize(config.model.dtype)
    meta = build_on_meta(config.model.name, config.data.modality, config.data.feature_dim)
    return estimate_base_bytes(meta, itemsize, config.model.quantization)


def check_worker_gpu(config: Any, device: Any, dtype: Any) -> None:
    """In a GPU worker, before it loads the base in `dtype` (hold gpu_lock): its part of the GPU
    (engine.gpus_per_worker of the total), and the memory free now, hold its CUDA context, its
    copy of the base and the least working memory; else an error naming the numbers (the other
    workers on this GPU took the rest)."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    base = base_bytes_for(config, dtype)
    gpus = config.engine.gpus_per_worker
    part = gpu_part(total, gpus)
    need = CUDA_CONTEXT_BYTES + base + MIN_WORKING_BYTES
    if need <= part and base + MIN_WORKING_BYTES <= free:  # this process's context exists already
        return
    share = gpus or 1.0
    raise ResourceUnavailableError(
        f"GPU {torch.cuda.get_device_name(device)} ({total / GIB:.1f} GiB) has {free / GIB:.1f} GiB free when "
        f"this worker starts and its part is {part / GIB:.1f} GiB (engine.gpus_per_worker = {share:g}); it needs "
        f"{CUDA_CONTEXT_BYTES / GIB:.1f} GiB CUDA context + {base / GIB:.2f} GiB for its copy of the base + "
        f"{MIN_WORKING_BYTES / GIB:.0f} GiB working memory. {workers_per_gpu(share)} worker(s) share this GPU, "
        "each with its own base copy and CUDA context: use engine.gpus_per_worker: 1, model.dtype: bfloat16 "
        "or model.quantization")


@contextlib.contextmanager
def gpu_lock(device: Any) -> Iterator[None]:
    """One worker at a time on a GPU between its memory check, loading its base, moving it to the
    device and measuring its pass: workers that start together on one GPU (a pool scaling from
    zero) would otherwise all pass the check before any of them holds its base, and the later
    ones run out of memory. A file lock in the node's temp folder, named by the GPU's UUID (every
    process on the node sees the same file, whatever CUDA_VISIBLE_DEVICES renumbered)."""
    import torch

    properties = torch.cuda.get_device_properties(device)
    key = str(getattr(properties, "uuid", "") or f"{properties.name}-{getattr(properties, 'pci_bus_id', device)}")
    with file_lock(key):
        yield


@contextlib.contextmanager
def file_lock(key: str) -> Iterator[None]:
    """An exclusive lock shared by every process of this machine, named by `key`."""
    import fcntl
    import re
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.gettempdir()) / "fltac-ray-gpu-locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
