"""Example-level DP-SGD in local training (Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang,
CCS 2016, "Deep Learning with Differential Privacy"). No Ray.

Each local step of an adapter on one task's examples (privacy.mode: example):
  1. Poisson sampling: every one of the client's n examples of the task joins the step's batch
     on its own with probability q = B / n (B: train.batch_size), so the batch size varies and
     may be 0 (`PoissonCursor`);
  2. the gradient g_i of each sampled example's own loss (classification: its cross-entropy;
     instruction tasks: the mean over its response tokens) with respect to the adapter's
     trainable entries; entries the method freezes (FFA-LoRA's A) are out of the norm, as they
     never move;
  3. each g_i clipped to L2 norm C: g_i * min(1, C / ||g_i||);
  4. the clipped sum plus N(0, (sigma C)^2) per coordinate, divided by B: the expected batch
     size, not the drawn one, which would itself depend on who was sampled.
The local-training rule's optimiser then steps on that gradient; what the rule adds that does not
read the data (FedProx's proximal gradient, weight decay) comes after the noise.

Both training paths compute it: one adapter at a time, an example per forward pass
(client/training.py), and the batched pass, where every example routes through its own copy of
its adapter, so one backward gives every example's gradient (client/batched_training.py). The
noise is drawn on the host from a per-(seed, round, client, slot, task) stream, as one
(adapter_size,) float32 vector per step, so both paths add the same noise.

Whatever the client uploads, in every round, is computed from these noised steps alone, so the
guarantee covers one example of a client against anyone who sees the uploads or anything built
from them (the server, other clients). Accounting: privacy/accounting.example_epsilon.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ExamplePrivacy:
    """The settings one DP-SGD step needs."""

    clip_norm: float  # C: the L2 bound of one example's gradient
    noise_multiplier: float  # sigma: noise N(0, (sigma C)^2) per coordinate of the summed gradient
    expected_batch: int  # B: what the noised sum is divided by (train.batch_size)


class PoissonCursor:
    """The examples of each DP-SGD step: each of `indices` independently with probability
    min(1, batch_size / len(indices)), drawn from `rng` (BatchCursor's interface; both training
    paths draw through it, so both see the same batches)."""

    def __init__(self, indices: np.ndarray, batch_size: int, rng: np.random.Generator) -> None:
        self.indices, self.rng = indices, rng
        self.rate = min(1.0, batch_size / len(indices)) if len(indices) else 0.0

    def next(self) -> np.ndarray:
        return self.indices[self.rng.random(len(self.indices)) < self.rate]


def trainable_masks(layout: list[tuple[str, tuple[int, ...]]], frozen: np.ndarray | None,
                    device: torch.device) -> list[torch.Tensor | None]:
    """Per layout tensor, a float mask of its trainable entries (shape), or None when all train."""
    if frozen is None or not frozen.any():
        return [None] * len(layout)
    from fltac_ray.models.adapter_model import split_adapter

    masks = split_adapter(~np.asarray(frozen, dtype=bool), layout)
    return [None if masks[name].all() else torch.from_numpy(masks[name].astype(np.float32)).to(device)
            for name, _ in layout]


def clip_per_example(grads: list[torch.Tensor], masks: list[torch.Tensor | None],
                     clip_norm: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`grads`: per layout tensor, (batch, *shape) each example's gradient -> the same clipped to
    L2 norm `clip_norm` over the trainable entries (frozen ones zeroed), and (batch,) the norms
    before clipping. Norms in float32 over all tensors of an example together."""
    kept = [grad if mask is None else grad * mask for grad, mask in zip(grads, masks, strict=True)]
    squares = sum(grad.float().reshape(grad.shape[0], -1).pow(2).sum(1) for grad in kept)
    norms = squares.sqrt()  # (batch,)
    factors = (clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0)  # a zero gradient stays zero
    return [grad * factors.reshape(-1, *([1] * (grad.dim() - 1))).to(grad.dtype) for grad in kept], norms


def noise_rows(rngs: list[np.random.Generator], size: int) -> np.ndarray:
    """(len(rngs), size) float32 standard normal draws, one row from each job's noise stream."""
    return np.stack([rng.standard_normal(size, dtype=np.float32) for rng in rngs]) if rngs else \
        np.zeros((0, size), np.float32)


def privatize_sums(sums: list[torch.Tensor], noise: list[torch.Tensor], settings: ExamplePrivacy) -> None:
    """In place: each (n, *shape) clipped sum becomes (sum + sigma C xi) / B, `noise` holding the
    standard normal xi in the same (n, *shape) form."""
    scale = settings.noise_multiplier * settings.clip_norm
    with torch.no_grad():
        for total, xi in zip(sums, noise, strict=True):
            total.add_(xi.to(total.dtype), alpha=scale).div_(settings.expected_batch)
