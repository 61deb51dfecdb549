"""Ray processes see only the GPUs Ray assigned them.

Ray 2.60 sets CUDA_VISIBLE_DEVICES for an actor or task that holds GPUs, but leaves it untouched
for one that holds none (ray-project/ray#54868): a 0-GPU worker, the coordinator or a Ray Tune
trial's driver on a GPU node would see every GPU and use GPU 0 outside Ray's accounting (torch
and cuML pick device 0 whenever one is visible). `hide_unassigned_gpus` runs first in each of
fltac-ray's Ray processes, before anything initialises CUDA.
"""

from __future__ import annotations

import os
import sys

VISIBLE = "CUDA_VISIBLE_DEVICES"


def hide_unassigned_gpus() -> list[str]:
    """The GPU ids Ray assigned this process; with none, CUDA is made to see none. Call in a
    Ray actor's or task's process before torch or cupy touches CUDA."""
    import ray

    assigned = [str(gpu) for gpu in ray.get_gpu_ids()]
    if not assigned:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            raise RuntimeError("CUDA was initialised in this process before its GPUs could be hidden")
        os.environ[VISIBLE] = ""
    return assigned
