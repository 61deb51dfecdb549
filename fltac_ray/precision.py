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
from collections.abc import Iterator

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """model.dtype -> the base's torch dtype on `device`. auto: float32 on the CPU (bfloat16 is
    faster there only on CPUs with AVX-512 BF16 / AMX, so it is asked for explicitly);
    bfloat16 on CUDA devices that support it (compute capability 8.0+), else float16."""
    if requested != "auto":
        return DTYPES[requested]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


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
    double it. Works on any list of tensors, so the batched path's stacked adapters (and their
    own optimizer, batched_training.BatchedAdamW) use it as the one-adapter path does.
    `enabled` False (float32, bfloat16): scale 1, nothing is ever skipped."""

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

    def update(self, stepped: bool) -> None:
        if not self.enabled:
            return
        if not stepped:
            self.scale, self.clean_steps = self.scale / 2.0, 0
            self.skipped += 1
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale, self.clean_steps = self.scale * 2.0, 0
