"""Numeric precision of the frozen base: dtype choice, autocast, and fp16 loss scaling. No Ray.

The frozen base is stored in `model.dtype` (half the memory in bfloat16/float16) and runs under
torch.autocast in that dtype; what is trained stays in float32: the LoRA A/B tensors (peft keeps
adapters of a half-precision base in float32), the classifier head, and the optimizer's moments.
Losses are computed on float32 logits. float16 has 5 exponent bits, so its small activation
gradients underflow: float16 training scales the loss up before backward and the gradients down
before the step, skipping steps whose gradients overflowed (`LossScale`, torch's GradScaler rule).
bfloat16 has float32's exponent range and needs no scaling.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def native_bfloat16(device: torch.device) -> bool:
    """The GPU computes bfloat16 natively (compute capability 8.0+: Ampere, Ada, Hopper).
    torch.cuda.is_bf16_supported() also says yes on T4 (7.5) and V100 (7.0), where bfloat16 is
    emulated (no bfloat16 tensor cores): slower there than float16 with loss scaling."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def cpu_bfloat16_native() -> bool:
    """This CPU computes bfloat16 natively (AVX-512 BF16 or AMX). torch's CPU capability says
    only AVX2 / AVX512; without either extension torch emulates bfloat16 through float32, which
    is slower than float32 itself (measured ~3x per round on an AVX2-only EPYC)."""
    cpu = getattr(torch._C, "_cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(check is not None for check in checks):
        return any(check() for check in checks if check is not None)
    try:  # this torch cannot say: the kernel's CPU flags (Linux)
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return True  # unknown: no warning
    return "avx512_bf16" in flags or "amx_bf16" in flags


def emulated_bfloat16_note(requested: str, runs_on_cpu: bool) -> str | None:
    """A warning when model.dtype bfloat16 will run on a CPU that emulates it (`runs_on_cpu`: the
    workers train on this kind of CPU), else None."""
    if requested != "bfloat16" or not runs_on_cpu or cpu_bfloat16_native():
        return None
    return (f"model.dtype = bfloat16 on a CPU without native bfloat16 ({torch.backends.cpu.get_cpu_capability()}, "
            "no AVX-512 BF16 or AMX): torch emulates it, slower than float32; use model.dtype: auto (float32 here)")


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """model.dtype -> the base's torch dtype on `device`. auto: float32 on the CPU (bfloat16 is
    faster there only on CPUs with AVX-512 BF16 / AMX, so it is asked for explicitly);
    bfloat16 on GPUs that compute it natively (compute capability 8.0+), else float16 with
    loss scaling (T4, V100)."""
    if requested != "auto":
        return DTYPES[requested]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if native_bfloat16(device) else torch.float16


def gpu_itemsize(requested: str) -> int:
    """Bytes per float of the base on a GPU, as resolve_dtype will choose there, for planning
    before any GPU is seen: auto is bfloat16 or float16 by the GPU's compute capability, 2 bytes
    either way."""
    return 2 if requested == "auto" else DTYPES[requested].itemsize


def configure_cuda_math(device: torch.device, tf32: bool, deterministic: bool) -> None:
    """This process's matmul settings (engine.tf32, engine.deterministic), before its first
    CUDA kernel. tf32: float32 matmuls and convolutions on CUDA in TensorFloat-32 (10-bit
    mantissa, float32 range; Ampere+ run them ~8x faster than full float32). deterministic:
    torch's deterministic algorithms (a warning names an op that has none) and cuBLAS's fixed
    workspace, so a pass gives the same bits every time on the same GPU model and software: on
    CUDA, atomic index_add_, the attention backward and split-K matmuls otherwise vary in their
    last bits from run to run. Costs speed (measured by benchmarks/gpu.py)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cast_frozen_base(module: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """The base's floating-point parameters and buffers in `dtype` (integer buffers such as
    position ids stay as they are; None: unchanged). Call before the adapters are attached."""
    if dtype is not None:
        module.to(dtype=dtype)  # nn.Module.to(dtype) only touches floating-point tensors
    return module


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Run the block's matmuls in `dtype` (float32 parameters are cast per op, gradients flow
    back to them in float32); a no-op for float32."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


class LossScale:
    """Dynamic loss scaling for float16 (the rule of torch.amp.GradScaler): multiply the loss by
    `scale` before backward; before the optimizer step, divide the gradients by it and skip the
    step when any is inf/NaN, halving the scale; after `growth_interval` clean steps in a row,
    double it. A client worker keeps one for its whole life, across passes and rounds, as
    GradScaler lives across a training run (a fresh one per pass would restart at 2^16 and skip
    its first steps every time). The batched path checks each stacked adapter's row on its own
    (`finite_rows`): one adapter's overflow skips that adapter's step only. `skipped` counts the
    adapter steps skipped so far. `enabled` False (float32, bfloat16): scale 1, nothing skipped."""

    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 16, growth_interval: int = 2000) -> None:
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self.clean_steps = 0
        self.skipped = 0

    @classmethod
    def for_dtype(cls, dtype: torch.dtype) -> LossScale:
        return cls(dtype == torch.float16)

    @torch.no_grad()
    def unscale(self, params: list[torch.Tensor]) -> bool:
        """Divide every gradient by the scale; True when all are finite (take the step)."""
        if not self.enabled:
            return True
        finite = True
        for param in params:
            if param.grad is None:
                continue
            param.grad.div_(self.scale)
            finite = finite and bool(torch.isfinite(param.grad).all())
        return finite

    @torch.no_grad()
    def finite_rows(self, stacked: list[torch.Tensor], active: int) -> np.ndarray | None:
        """Stacked (n, ...) parameters: divide the first `active` rows' gradients by the scale;
        (active,) bool, True where a row's gradients are all finite. None when scaling is off
        (every row steps; no host sync)."""
        if not self.enabled:
            return None
        finite = torch.ones(active, dtype=torch.bool, device=stacked[0].device)
        for param in stacked:
            if param.grad is None:
                continue
            grad = param.grad[:active]
            grad.div_(self.scale)
            finite &= torch.isfinite(grad.reshape(active, -1)).all(dim=1)
        return finite.cpu().numpy()

    def update(self, stepped: bool, skipped: int = 1) -> None:
        """After a step: `stepped` False when any gradient overflowed (`skipped` adapter steps
        were not taken; the one-adapter path skips 1)."""
        if not self.enabled:
            return
        if not stepped:
            self.scale, self.clean_steps = self.scale / 2.0, 0
            self.skipped += skipped
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale, self.clean_steps = self.scale * 2.0, 0
