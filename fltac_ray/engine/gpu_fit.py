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

`adapters_that_fit` sizes engine.max_batched_adapters: auto from the free memory a worker has
after loading the base and the activation bytes per example it measured.
"""

from __future__ import annotations

import math
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


def adapters_that_fit(free_bytes: int, bytes_per_example: float, batch_size: int,
                      share: float = PLANNED_SHARE, most: int = MAX_AUTO_ADAPTERS) -> int:
    """engine.max_batched_adapters: auto on a GPU: adapters whose batch (batch_size examples
    each, at bytes_per_example of activations) fit `share` of the free memory; 1..most."""
    per_adapter = max(bytes_per_example, 1.0) * batch_size
    return int(min(most, max(1, math.floor(free_bytes * share / per_adapter))))


def resolve_pass_limits(engine: Any, adapters_fit: list[int | None], batch_size: int) -> None:
    """engine.max_batched_adapters: auto -> the smallest of the workers' figures (so passes are
    cut alike whichever worker runs them; written to config.yaml by the run), or
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
    None: model.dtype as a GPU worker resolves it (auto: bfloat16 or float16, 2 bytes either)."""
    import torch

    from fltac_ray.models.builders import build_on_meta
    from fltac_ray.precision import DTYPES

    dtype = dtype or DTYPES.get(config.model.dtype, torch.bfloat16)
    meta = build_on_meta(config.model.name, config.data.modality, config.data.feature_dim)
    return estimate_base_bytes(meta, dtype.itemsize, config.model.quantization)


def check_worker_gpu(config: Any, device: Any, dtype: Any) -> None:
    """In a GPU worker, before it loads the base in `dtype`: enough free memory on its device for
    its copy and a pass, or an error naming the numbers (the other workers on this GPU took the
    rest)."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    base = base_bytes_for(config, dtype)
    if free >= base + MIN_WORKING_BYTES:
        return
    share = config.engine.gpus_per_worker or 1.0
    raise ResourceUnavailableError(
        f"GPU {torch.cuda.get_device_name(device)} ({total / GIB:.1f} GiB) has {free / GIB:.1f} GiB free when "
        f"this worker starts; its copy of the base needs {base / GIB:.2f} GiB + {MIN_WORKING_BYTES / GIB:.0f} GiB "
        f"working memory. {workers_per_gpu(share)} worker(s) share this GPU (engine.gpus_per_worker = "
        f"{share:g}), each with its own base copy and CUDA context: use engine.gpus_per_worker: 1, "
        "model.dtype: bfloat16 or model.quantization")
