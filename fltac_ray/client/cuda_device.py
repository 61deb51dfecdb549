"""Which device a client worker computes on, and a loud refusal when a GPU it holds is unusable.

A worker that Ray gave a GPU, but whose torch cannot use CUDA (a CPU wheel of torch, a driver
older than torch's CUDA build, a broken CUDA install), would otherwise train on the CPU without a
word: with engine.cpus_per_worker 1 that is one CPU thread where a GPU was reserved, a run that
"works" about 100x slower. Every worker decides its device here before it loads the base, so
every node of the cluster is checked before round 1 (and a node that joins later, when its first
worker starts). GPUs only *declared* to Ray on machines without one (`ray.init(num_gpus=1)`,
`Cluster.add_node(num_gpus=1)`: the scheduling tests) have no NVIDIA driver and no detected GPU
model, so they keep training on the CPU as intended. No Ray in this module.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path

from fltac_ray.errors import ResourceUnavailableError

NVIDIA_DRIVER_FILE = Path("/proc/driver/nvidia/version")


def nvidia_driver() -> str | None:
    """The NVIDIA kernel driver's version when one is loaded on this machine, else None."""
    try:
        text = NVIDIA_DRIVER_FILE.read_text()
    except OSError:
        return None
    # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 ..."
    words = text.split("Kernel Module", 1)[-1].split()
    return words[0] if words else "unknown version"


def torch_cuda_facts(assigned_gpus: Sequence[str] | None) -> str:
    """What an error about CUDA should show: torch's version and CUDA build, the driver, the GPUs
    Ray assigned and what this process sees."""
    import torch

    built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build (no CUDA)"
    driver = nvidia_driver()
    grant = ("no GPU assigned by Ray" if not assigned_gpus else
             f"GPU id(s) {', '.join(assigned_gpus)} assigned by Ray") if assigned_gpus is not None else "not a Ray worker"
    return (f"torch {torch.__version__} is {built}; NVIDIA driver: {driver or 'none loaded'}; {grant}; "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}; "
            f"host {platform.node()}")


def choose_device(setting: str, assigned_gpus: Sequence[str] | None, gpu_detected: bool):
    """engine.device -> this worker's torch device, or ResourceUnavailableError.

    `assigned_gpus`: the GPU ids Ray gave this process (None: not a Ray process, the in-process
    backend); `gpu_detected`: this node really has a GPU (an NVIDIA driver is loaded, or Ray
    detected a GPU model: its accelerator_type resource). cpu: the CPU. cuda: CUDA or an error.
    auto: CUDA when torch can use it (a Ray worker sees only its own GPUs); the CPU when this
    process has no real GPU to use; an error when it has one that torch cannot use."""
    import torch

    if setting == "cpu":
        return torch.device("cpu")
    usable = torch.cuda.is_available()
    holds_gpu = bool(assigned_gpus) if assigned_gpus is not None else True
    if usable and holds_gpu:
        return torch.device("cuda")
    if setting == "auto" and not (holds_gpu and gpu_detected):
        return torch.device("cpu")  # no GPU here, or one only declared to Ray's scheduler
    if usable:  # engine.device cuda in a Ray worker that holds no GPU
        raise ResourceUnavailableError(
            "engine.device = 'cuda', but Ray assigned this worker no GPU, so it sees none "
            f"({torch_cuda_facts(assigned_gpus)}); give workers GPUs with engine.gpus_per_worker, or use "
            "engine.device: auto")
    why = ("engine.device = 'cuda'" if setting == "cuda" else
           "this worker holds a GPU" if assigned_gpus else "this machine has an NVIDIA GPU")
    raise ResourceUnavailableError(
        f"{why}, but torch cannot use CUDA here ({torch_cuda_facts(assigned_gpus)}). Training would fall "
        "back to the CPU without a word, ~100x slower. Install a CUDA build of torch that this driver "
        "supports (docs/scale.md, GPU; cluster.yaml), or set engine.device: cpu (and "
        "engine.gpus_per_worker: 0) to train on the CPU on purpose")
