"""Model FLOPs of a training step through a frozen base with LoRA adapters, and the machine's
measured matmul peak: what model-FLOPs utilisation (MFU) is computed from (benchmarks/run.py,
benchmarks/gpu.py). No Ray.

Counted from the model's shapes and the real token counts (padding excluded), as training
systems count MFU: the FLOPs the step must do, not the ones a padded kernel happens to do.

  forward, per token   2 in out for every linear layer of the base (LoRA's base layers included)
                       2 (in r + r out) for every LoRA pair; a causal LM's vocabulary projection
                       only for the response tokens it scores (models/adapter_model.lm_token_scores)
  forward, per example 4 L^2 hidden per attention layer (Q K^T and the weighted sum of V, L the
                       example's length), 2 in out for a pooler, 2 hidden classes for the head
  backward             the base is frozen, so only gradients with respect to activations: its
                       linear layers once more (1x), attention twice (2x: Q and K from the
                       scores, the weights and V from the sum); LoRA and the head are trained,
                       so activations and weights (2x)
  a training step      2 base_linear + 3 attention + 3 lora + 3 head

Embedding lookups, norms, activations, softmax and the optimiser count nothing (they are memory
bound and small beside the matmuls); MFU is therefore a lower bound on the matmul share.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class StepFlops:
    """Forward FLOPs of one step by part; `train` is the whole step (forward and backward)."""

    base_linear: float
    attention: float
    lora: float
    head: float

    @property
    def forward(self) -> float:
        return self.base_linear + self.attention + self.lora + self.head

    @property
    def train(self) -> float:
        return 2 * self.base_linear + 3 * (self.attention + self.lora + self.head)

    def __mul__(self, count: float) -> StepFlops:
        return StepFlops(self.base_linear * count, self.attention * count, self.lora * count, self.head * count)

    __rmul__ = __mul__

    def __add__(self, other: StepFlops) -> StepFlops:
        return StepFlops(self.base_linear + other.base_linear, self.attention + other.attention,
                         self.lora + other.lora, self.head + other.head)


def linear_shapes(encoder: nn.Module) -> tuple[int, int, int, int]:
    """(weights of the base's per-token linear layers, of its LoRA pairs, of its pooler, of a
    causal LM's vocabulary projection): the in x out products summed, from the module tree
    (peft's LoRA layers hold base_layer and lora_A / lora_B linears; a Conv2d LoRA is not
    counted)."""
    base = lora = pooler = output = 0
    for name, module in encoder.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        size = module.in_features * module.out_features
        if ".lora_A." in name or ".lora_B." in name:
            lora += size
        elif "pooler" in name:
            pooler += size
        elif name.endswith("lm_head"):
            output += size
        else:
            base += size
    return base, lora, pooler, output


def step_flops(model, tokens: float, examples: int, squared_lengths: float, head_classes: int,
               scored_tokens: float | None = None) -> StepFlops:
    """The forward FLOPs of `examples` examples of `tokens` tokens in all (their lengths' squares
    summing to `squared_lengths`) through `model` (models/adapter_model.AdapterModel: its encoder
    with peft LoRA, and its head of `head_classes` rows); a causal LM's vocabulary projection for
    `scored_tokens` (default: every token)."""
    base, lora, pooler, output = linear_shapes(model.encoder)
    scored = tokens if scored_tokens is None else scored_tokens
    config = model.encoder.config
    layers, hidden = int(config.num_hidden_layers), int(config.hidden_size)
    head = 2 * hidden * head_classes * examples if getattr(model, "head", None) is not None else 0
    return StepFlops(base_linear=2 * base * tokens + 2 * pooler * examples + 2 * output * scored,
                     attention=4 * hidden * layers * squared_lengths,
                     lora=2 * lora * tokens, head=head)


def jobs_flops(model, jobs, batch_size: int, head_classes: int) -> StepFlops:
    """The model FLOPs of training `jobs` (batched_training.AdapterJob) for their steps: each step
    takes min(batch, examples) of the job's examples, counted at their mean length and mean
    squared length (padding excluded); an instruction example's vocabulary projection for its
    response tokens (length - prompt_length)."""
    total = StepFlops(0.0, 0.0, 0.0, 0.0)
    for job in jobs:
        lengths = np.asarray(job.split.inputs["lengths"])[job.indices].astype(np.float64)
        prompts = job.split.inputs.get("prompt_lengths")
        batch = min(batch_size, len(lengths))
        scored = None if prompts is None else batch * (lengths - np.asarray(prompts)[job.indices]).mean()
        per_step = step_flops(model, batch * lengths.mean(), batch, batch * (lengths**2).mean(), head_classes,
                              scored)
        total = total + per_step * job.steps
    return total


@dataclass(frozen=True)
class _TaskWork:
    """What jobs_flops reads of a job: one adapter's examples and steps on one task."""

    split: object  # data.federated.EncodedSplit
    indices: np.ndarray
    steps: int


def federation_flops(model, data, clients: list[int], local_steps: int, batch_size: int) -> StepFlops:
    """The model FLOPs of one round's local training when `clients` (data.federated.FederatedData
    client ids) take part: every task a client holds is one adapter's `local_steps` steps (the
    shard's own steps where it sets them: the pooled centralized client), counted as jobs_flops
    counts them. The FLOPs a benchmark divides a round's seconds by."""
    work = []
    for client in clients:
        shard = data.clients[client]
        for task, (train, _) in shard.tasks.items():
            if len(train):
                work.append(_TaskWork(data.tasks[task].train, train, shard.steps.get(task, local_steps)))
    return jobs_flops(model, work, batch_size, data.head_classes)


def peak_matmul_flops(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", size: int = 1024,
                      repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` (size x size) @ (size x size) products in `dtype` on
    `device`, with torch's current thread count: the peak MFU is measured against. Each repeat
    times both torch.mm and F.linear (the layers' own call): on a CPU that emulates bfloat16 they
    take different kernels (on an AVX2-only EPYC, 1 against 10 GFLOP/s), and the faster one is
    what the model can reach."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for attempt in range(repeats + 1):
        for product in (torch.mm, torch.nn.functional.linear):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            began = time.perf_counter()
            product(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if attempt:  # the first is a warm-up
                best = min(best, time.perf_counter() - began)
    return 2 * size**3 / best
