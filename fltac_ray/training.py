"""Local training and evaluation of one adapter on one task's examples (Algorithm 2). No Ray."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fltac_ray.data.federated import EncodedSplit
from fltac_ray.models.adapter_model import AdapterModel


def batch_tensors(split: EncodedSplit, index: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    # Fancy indexing copies out of the (read-only, shared) object-store arrays.
    return {key: torch.from_numpy(value[index].astype(np.int64)).to(device)
            for key, value in split.inputs.items()}


@dataclass
class TrainOutcome:
    adapter: np.ndarray  # (adapter_size,) float32
    mean_loss: float


def train_adapter(
    model: AdapterModel,
    start: np.ndarray,
    split: EncodedSplit,
    indices: np.ndarray,
    num_classes: int,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    rng: np.random.Generator,
    device: torch.device,
) -> TrainOutcome:
    """Run `steps` AdamW steps from `start` on batches of `indices` (reshuffled every epoch)."""
    model.set_adapter(start)
    model.train()
    # A fresh optimizer per (client, task, round), as in the reference implementation.
    optimizer = torch.optim.AdamW(model.optimizer_groups(lr), lr=lr, weight_decay=weight_decay)
    order = rng.permutation(indices)
    cursor = 0
    losses = []
    for _ in range(steps):
        if cursor + batch_size > len(order) and cursor > 0:
            order, cursor = rng.permutation(indices), 0
        chosen = order[cursor:cursor + batch_size]
        cursor += batch_size
        inputs = batch_tensors(split, chosen, device)
        labels = torch.from_numpy(split.labels[chosen]).to(device)
        loss = F.cross_entropy(model(**inputs, num_classes=num_classes), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return TrainOutcome(model.get_adapter(), float(np.mean(losses)))


@dataclass
class EvalOutcome:
    correct: int
    loss_sum: float
    count: int


@torch.no_grad()
def evaluate_adapter(
    model: AdapterModel,
    adapter: np.ndarray,
    split: EncodedSplit,
    indices: np.ndarray,
    num_classes: int,
    batch_size: int,
    device: torch.device,
) -> EvalOutcome:
    if len(indices) == 0:
        return EvalOutcome(0, 0.0, 0)
    model.set_adapter(adapter)
    model.eval()
    correct, loss_sum = 0, 0.0
    for lo in range(0, len(indices), batch_size):
        chosen = indices[lo:lo + batch_size]
        logits = model(**batch_tensors(split, chosen, device), num_classes=num_classes)
        labels = torch.from_numpy(split.labels[chosen]).to(device)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(-1) == labels).sum())
    return EvalOutcome(correct, loss_sum, len(indices))
