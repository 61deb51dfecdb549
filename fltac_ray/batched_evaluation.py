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

from fltac_ray.batched_training import BUCKET_OVERHEAD_TOKENS, length_buckets
from fltac_ray.data.federated import EncodedSplit
from fltac_ray.models.adapter_model import AdapterModel
from fltac_ray.models.multi_adapter import StackedAdapters, routed, routed_head
from fltac_ray.training import _NOT_TENSORS, EvalOutcome


@dataclass
class EvalItem:
    """One adapter on one classification task's test examples."""

    adapter: np.ndarray  # (adapter_size,) float32
    split: EncodedSplit
    indices: np.ndarray  # the client's test examples of the task
    num_classes: int

    def signature(self) -> tuple:
        """Items whose inputs concatenate into one batch (same per-example shapes and dtypes)."""
        return tuple(sorted((key, value.shape[1:], value.dtype.str) for key, value in self.split.inputs.items()
                            if key not in _NOT_TENSORS))


def _batches(lengths: np.ndarray | None, count: int, batch_examples: int, device: torch.device) -> list[np.ndarray]:
    """Positions of the combined examples in forward batches of at most batch_examples: length
    buckets for text (each padded to its own longest), cut further where too large."""
    if lengths is None:
        groups = [np.arange(count)]
    else:
        groups = length_buckets(lengths, BUCKET_OVERHEAD_TOKENS.get(device.type, BUCKET_OVERHEAD_TOKENS["cpu"]))
    return [group[lo:lo + batch_examples] for group in groups for lo in range(0, len(group), batch_examples)]


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
    keys = [key for key in items[0].split.inputs if key not in _NOT_TENSORS]
    combined = {key: np.concatenate([item.split.inputs[key][item.indices] for item in items]) for key in keys}
    labels_all = np.concatenate([item.split.labels[item.indices] for item in items])
    classes_all = np.repeat([item.num_classes for item in items], sizes)
    stacked = StackedAdapters(model, np.stack([item.adapter for item in items]), device)
    loss_sum = np.zeros(len(items))  # float64 sums, like evaluate_adapter's Python floats
    correct = np.zeros(len(items), dtype=np.int64)
    model.eval()
    for rows in _batches(combined.get("lengths"), len(route_all), batch_examples, device):
        inputs = {key: torch.from_numpy(value[rows]).to(device) for key, value in combined.items()}
        route = torch.from_numpy(route_all[rows]).to(device)
        with routed(model, stacked, route):
            logits = routed_head(model.features(**inputs), stacked, route)  # (batch, head_classes)
        # a task reads its first num_classes head rows: the others take no part in the softmax
        columns = torch.arange(logits.shape[1], device=device)[None, :]
        logits = logits.masked_fill(columns >= torch.from_numpy(classes_all[rows]).to(device)[:, None], float("-inf"))
        labels = torch.from_numpy(labels_all[rows]).to(device)
        losses = F.cross_entropy(logits.float(), labels, reduction="none").double().cpu().numpy()
        hits = (logits.argmax(-1) == labels).cpu().numpy()
        np.add.at(loss_sum, route_all[rows], losses)
        np.add.at(correct, route_all[rows], hits)
    return [EvalOutcome(int(correct[i]), float(loss_sum[i]), sizes[i]) for i in range(len(items))]
