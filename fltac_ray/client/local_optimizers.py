"""Optimisers over stacked adapters: each row of a (n, *shape) tensor is an independent
optimiser, so a pass of n adapters steps as n separate optimisers would (one-by-one training is
n = 1). Both training paths use them through algorithms/local_training.LocalTraining.optimizer."""

from __future__ import annotations

import math

import numpy as np
import torch


class _RowSteps:
    """Per-row step counts and the rows a step touches."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.row_steps = np.zeros(params[0].shape[0] if params else 0, dtype=np.int64)

    def _rows(self, active: int, take: np.ndarray | None) -> np.ndarray:
        rows = np.arange(active) if take is None else np.flatnonzero(take)
        self.row_steps[rows] += 1
        return rows

    def _grads(self, grads: list[torch.Tensor] | None) -> list[torch.Tensor]:
        return [param.grad for param in self.params] if grads is None else grads


class BatchedAdamW(_RowSteps):
    """torch.optim.AdamW (single-tensor form, amsgrad off) on stacked (n, ...) tensors, each row
    an independent optimizer; `active` leading rows take a step, the rest are left untouched.
    Each row counts its own steps (a row whose float16 gradients overflowed skips one, as
    GradScaler skips optimizer.step), so its bias correction is that of its own optimizer."""

    def __init__(self, params: list[torch.Tensor], lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(params)
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, active: int, take: np.ndarray | None = None, grads: list[torch.Tensor] | None = None) -> None:
        """Step rows 0..active-1, or only those where `take` ((active,) bool) is True."""
        rows = self._rows(active, take)
        grads = self._grads(grads)
        counts = self.row_steps[rows]
        if take is None and (counts == counts[0]).all():  # the usual case: one update of the block
            self._update(slice(0, active), int(counts[0]), grads)
            return
        for row in rows.tolist():  # rows out of step with each other: one update each (rare)
            self._update(slice(row, row + 1), int(self.row_steps[row]), grads)

    def _update(self, rows: slice, steps: int, grads: list[torch.Tensor]) -> None:
        beta1, beta2 = self.betas
        bias_correction1 = 1 - beta1 ** steps
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** steps)
        step_size = self.lr / bias_correction1
        for param, grad, exp_avg, exp_avg_sq in zip(self.params, grads, self.exp_avg, self.exp_avg_sq, strict=True):
            p, g = param[rows], grad[rows]  # views: the updates land in the stacked tensors
            m, v = exp_avg[rows], exp_avg_sq[rows]
            p.mul_(1 - self.lr * self.weight_decay)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(self.eps)
            p.addcdiv_(m, denom, value=-step_size)


class BatchedSGD(_RowSteps):
    """torch.optim.SGD without momentum, per row: p <- p - lr (g + weight_decay p)."""

    def __init__(self, params: list[torch.Tensor], lr: float, weight_decay: float) -> None:
        super().__init__(params)
        self.lr, self.weight_decay = lr, weight_decay

    @torch.no_grad()
    def step(self, active: int, take: np.ndarray | None = None, grads: list[torch.Tensor] | None = None) -> None:
        rows = self._rows(active, take)
        index = slice(0, active) if take is None else torch.from_numpy(rows).to(self.params[0].device)
        for param, grad in zip(self.params, self._grads(grads), strict=True):
            g = grad[index]
            if self.weight_decay:
                g = g.add(param[index], alpha=self.weight_decay)
            if take is None:
                param[index].add_(g, alpha=-self.lr)
            else:
                param.index_add_(0, index, g, alpha=-self.lr)
