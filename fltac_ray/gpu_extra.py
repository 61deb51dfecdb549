"""`python -m fltac_ray.gpu_extra`: the pip extra of fltac-ray that matches the installed torch.

    pip install -e ".[$(python -m fltac_ray.gpu_extra)]"     # gpu-cu13 with PyPI's torch 2.13.0

cuML and cupy come in one build per CUDA major version (cuml-cu12, cuml-cu13); the one that
matches torch's CUDA shares its runtime, the other would install a second CUDA runtime beside
torch's (and cupy-cuda12x would overwrite cupy-cuda13x). Exits 1, saying why, for a torch
without CUDA or of a CUDA major fltac-ray has no extra for.
"""

from __future__ import annotations

import sys

EXTRAS = {"12": "gpu-cu12", "13": "gpu-cu13"}


def extra_for(cuda_version: str | None) -> str:
    """torch.version.cuda ("13.0", "12.8", None) -> the extra's name; ValueError without one."""
    if not cuda_version:
        raise ValueError("this torch is a CPU-only build: the GPU extras need a CUDA build of torch")
    major = cuda_version.split(".")[0]
    if major not in EXTRAS:
        raise ValueError(f"torch is built for CUDA {cuda_version}; fltac-ray has extras for CUDA "
                         f"{', '.join(sorted(EXTRAS))} ({', '.join(EXTRAS.values())})")
    return EXTRAS[major]


def main() -> int:
    import torch

    try:
        print(extra_for(torch.version.cuda))
    except ValueError as exc:
        print(f"fltac_ray.gpu_extra: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
