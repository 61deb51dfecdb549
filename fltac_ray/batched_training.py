"""Batched multi-adapter local training: many (client, task) adapters, one forward/backward. No Ray.

`train_batched` runs the local steps of several adapter jobs together over the shared frozen
base (models/multi_adapter.py routes each sample through its own adapter). It reproduces
`training.train_adapter` run job by job:
  - every job draws its batches through the same seeded BatchCursor;
  - the loss is the sum of every job's own mean loss, so adapter j's gradient is exactly the
    gradient of its own batch;
  - each job has its own AdamW state (BatchedAdamW below: torch's AdamW update, per stacked row),
    fresh for every job as in the one-by-one path;
  - jobs with fewer steps drop out of the batch once they are done (jobs are ordered by steps).
What differs is floating-point order (one large matmul instead of several small ones, padding
to the longest text of the combined batch) and the random streams of dropout layers: with
dropout off, results agree with the one-by-one path to float32 rounding (tests/test_batched.py
states the tolerance); with dropout on they agree in distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fltac_ray.data.federated import EncodedSplit
from fltac_ray.models.adapter_model import AdapterModel
from fltac_ray.models.multi_adapter import StackedAdapters, routed, routed_head
from fltac_ray.training import _NOT_TENSORS, BatchCursor, TrainOutcome


@dataclass
class AdapterJob:
    """The local training of one adapter on one task: what train_adapter takes, minus the model."""

    start: np.ndarray  # (adapter_size,) float32
    split: EncodedSplit
    indices: np.ndarray
    num_classes: int  # 0: instruction task (causal-LM loss on response tokens)
    steps: int
    rng: np.random.Generator

    def signature(self) -> tuple:
        """Jobs whose inputs concatenate into one batch (same per-example shapes and dtypes)."""
        return (self.num_classes == 0,) + tuple(sorted(
            (key, value.shape[1:], value.dtype.str) for key, value in self.split.inputs.items()
            if key not in _NOT_TENSORS))


class BatchedAdamW:
    """torch.optim.AdamW (single-tensor form, amsgrad off) on stacked (n, ...) tensors, each row
    an independent optimizer; `active` leading rows take a step, the rest are left untouched."""

    def __init__(self, params: list[torch.Tensor], lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params, self.lr, self.weight_decay, self.betas, self.eps = params, lr, weight_decay, betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = 0

    @torch.no_grad()
    def step(self, active: int) -> None:
        self.steps += 1  # every active row has taken exactly this many steps (jobs start together)
        beta1, beta2 = self.betas
        bias_correction1 = 1 - beta1 ** self.steps
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** self.steps)
        step_size = self.lr / bias_correction1
        for param, exp_avg, exp_avg_sq in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            p, g = param[:active], param.grad[:active]
            m, v = exp_avg[:active], exp_avg_sq[:active]
            p.mul_(1 - self.lr * self.weight_decay)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(self.eps)
            p.addcdiv_(m, denom, value=-step_size)


def _job_losses(model: AdapterModel, stacked: StackedAdapters, jobs: list[AdapterJob],
                chosen: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """(len(jobs),) each job's mean loss on its own samples of one combined batch."""
    sizes = [len(c) for c in chosen]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    segments = [(int(bounds[i]), int(bounds[i + 1])) for i in range(len(jobs))]
    route = torch.repeat_interleave(torch.arange(len(jobs), device=device), torch.tensor(sizes, device=device))
    inputs = {
        key: torch.from_numpy(np.concatenate([job.split.inputs[key][c] for job, c in zip(jobs, chosen, strict=True)])).to(device)
        for key in jobs[0].split.inputs if key not in _NOT_TENSORS
    }
    losses = []
    with routed(model, stacked, segments):
        if jobs[0].num_classes == 0:  # causal LM: mean CE over each job's response tokens
            token_losses, _, scored = model.lm_token_scores(**inputs)
            for lo, hi in segments:
                losses.append((token_losses[lo:hi] * scored[lo:hi]).sum() / max(int(scored[lo:hi].sum()), 1))
        else:
            logits = routed_head(model.features(**inputs), stacked, route)  # (batch, head_classes)
            for job, c, (lo, hi) in zip(jobs, chosen, segments, strict=True):
                labels = torch.from_numpy(job.split.labels[c]).to(device)
                losses.append(F.cross_entropy(logits[lo:hi, :job.num_classes], labels))
    return torch.stack(losses)


def train_batched(model: AdapterModel, jobs: list[AdapterJob], batch_size: int, lr: float,
                  weight_decay: float, device: torch.device) -> list[TrainOutcome]:
    """Train every job's adapter from its start; outcomes in the order of `jobs`. All jobs must
    share one signature() (the caller groups them)."""
    if not jobs:
        return []
    if len({job.signature() for job in jobs}) > 1:
        raise ValueError("train_batched needs jobs whose inputs share shapes and dtypes; group them by signature()")
    order = sorted(range(len(jobs)), key=lambda j: -jobs[j].steps)  # finished jobs drop off the end
    ordered = [jobs[j] for j in order]
    stacked = StackedAdapters(model, np.stack([job.start for job in ordered]), device)
    optimizer = BatchedAdamW(stacked.parameters(), lr, weight_decay)
    cursors = [BatchCursor(job.indices, batch_size, job.rng) for job in ordered]
    history: list[list[float]] = [[] for _ in ordered]
    model.train()
    for step in range(ordered[0].steps):
        active = sum(1 for job in ordered if job.steps > step)
        chosen = [cursor.next() for cursor in cursors[:active]]
        losses = _job_losses(model, stacked, ordered[:active], chosen, device)
        for param in stacked.parameters():
            param.grad = None
        # Sum of means: d(sum)/d(adapter j) = d(loss_j)/d(adapter j), as if trained alone.
        losses.sum().backward()
        optimizer.step(active)
        for j, value in enumerate(losses.detach().cpu().tolist()):
            history[j].append(value)
    vectors = stacked.to_numpy()
    outcomes: list[TrainOutcome | None] = [None] * len(jobs)
    for position, j in enumerate(order):
        outcomes[j] = TrainOutcome(vectors[position], float(np.mean(history[position])))
    return outcomes  # type: ignore[return-value]
