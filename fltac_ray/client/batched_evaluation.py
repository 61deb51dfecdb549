"""Batched evaluation of many adapters: one forward pass over the frozen base for the test
examples of many (adapter, task) items, each example routed through its own adapter
(models/multi_adapter.py). No Ray.

It computes what `training.evaluate_adapter` computes item by item for classification tasks
(summed cross-entropy and right predictions over the item's test examples), from the same
logits up to floating-point order: the base runs on larger batches, cut by length (text) so they
pad less. Instruction tasks (token scores, greedy generation) stay one adapter at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fltac_ray.client.batched_training import (
    bucket_positions,
    combine_inputs,
    input_signature,
    task_logits,
)
from fltac_ray.client.training import EvalOutcome, rows_to_device, to_device
from fltac_ray.data.federated import EncodedSplit
from fltac_ray.models.adapter_model import AdapterModel
from fltac_ray.models.multi_adapter import StackedAdapters, routed


@dataclass
class EvalItem:
    """One adapter on one classification task's test examples."""

    adapter: np.ndarray  # (adapter_size,) float32
    split: EncodedSplit
    indices: np.ndarray  # the client's test examples of the task
    num_classes: int

    def signature(self) -> tuple:
        """Items whose inputs concatenate into one batch (same per-example shapes and dtypes)."""
        return input_signature(self.split)


@torch.no_grad()
def evaluate_batched(model: AdapterModel, items: list[EvalItem], batch_examples: int,
                     device: torch.device) -> list[EvalOutcome]:
    """Every item's outcome, in the order of `items`. All items must share one signature()."""
    if not items:
        return []
    if len({item.signature() for item in items}) > 1:
        raise ValueError("evaluate_batched needs items whose inputs share shapes and dtypes; group them by signature()")
    sizes = [len(item.indices) for item in items]
    route_all = np.repeat(np.arange(len(items)), sizes)  # (examples,) item of each example
    combined = combine_inputs([(item.split, item.indices) for item in items])
    labels_all = np.concatenate([item.split.labels[item.indices] for item in items])
    classes_all = np.repeat([item.num_classes for item in items], sizes)
    stacked = StackedAdapters(model, np.stack([item.adapter for item in items]), device)
    loss_sum = np.zeros(len(items))  # float64 sums, like evaluate_adapter's Python floats
    correct = np.zeros(len(items), dtype=np.int64)
    model.eval()
    # length buckets (each padded to its own longest), cut where larger than batch_examples
    batches = [bucket[lo:lo + batch_examples] for bucket in bucket_positions(combined, len(route_all), device)
               for lo in range(0, len(bucket), batch_examples)]
    for rows in batches:
        inputs = rows_to_device(combined, rows, device)
        route = to_device(route_all[rows], device)
        with routed(model, stacked, route), model.autocast():
            logits = task_logits(model, stacked, inputs, route, to_device(classes_all[rows], device))
        labels = to_device(labels_all[rows], device)
        losses = F.cross_entropy(logits.float(), labels, reduction="none").double().cpu().numpy()
        hits = (logits.argmax(-1) == labels).cpu().numpy()
        np.add.at(loss_sum, route_all[rows], losses)
        np.add.at(correct, route_all[rows], hits)
    return [EvalOutcome(int(correct[i]), float(loss_sum[i]), sizes[i]) for i in range(len(items))]
