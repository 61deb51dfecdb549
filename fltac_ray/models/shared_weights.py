"""The frozen base model's weights as plain numpy arrays, attached to a model without a copy.

`export_weights(model)` turns a loaded base into arrays (models/base_cache.py writes them once per
node as .npy files and every worker of the node memory-maps them); every worker builds the
architecture on the meta device (no memory) and `attach_weights` points its parameters and
buffers at those arrays without copying, so the workers of a node share one physical copy of the
base, and no torch object is pickled.

The arrays are read-only maps: the base must stay frozen (it is: LoRA trains beside it,
EfficientNet's BatchNorm stays in eval mode). On CUDA the worker's `.to(device)` makes its own copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

# numpy has no bfloat16: such tensors travel as their raw 16-bit patterns.
_RAW_VIEWS = {torch.bfloat16: np.uint16}


@dataclass
class BaseWeights:
    arrays: dict[str, np.ndarray]  # one entry per distinct tensor
    dtypes: dict[str, str]  # torch dtype of each array ("bfloat16" travels as uint16)
    buffers: set[str] = field(default_factory=set)  # names that are buffers, not parameters
    aliases: dict[str, str] = field(default_factory=dict)  # tied name -> name in `arrays`

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def _named_tensors(model: nn.Module):
    for name, param in model.named_parameters(remove_duplicate=False):
        yield name, param, False
    for name, buffer in model.named_buffers(remove_duplicate=False):
        if buffer is not None:
            yield name, buffer, True


def export_weights(model: nn.Module) -> BaseWeights:
    """Every parameter and buffer (non-persistent ones too: position ids, rotary tables) as numpy;
    tied tensors (a causal LM's embedding and output layer) once, with aliases."""
    weights = BaseWeights({}, {})
    first_name: dict[int, str] = {}
    for name, tensor, is_buffer in _named_tensors(model):
        key = id(tensor)
        if key in first_name:
            weights.aliases[name] = first_name[key]
            continue
        first_name[key] = name
        data = tensor.detach().to("cpu").contiguous()
        raw = _RAW_VIEWS.get(data.dtype)
        array = data.view(torch.int16).numpy().view(raw) if raw is not None else data.numpy()
        weights.arrays[name] = array
        weights.dtypes[name] = str(data.dtype).removeprefix("torch.")
        if is_buffer:
            weights.buffers.add(name)
    return weights


def _as_tensor(array: np.ndarray, dtype: str) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():
        # memory-mapped arrays are read-only; the base is never written (see module doc)
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(array)
    if dtype == "bfloat16":
        return tensor.view(torch.bfloat16)
    return tensor


def attach_weights(model: nn.Module, weights: BaseWeights) -> nn.Module:
    """Point a meta-device model's parameters and buffers at `weights` (zero-copy, frozen)."""
    expected = {name for name, _, _ in _named_tensors(model)}
    provided = set(weights.arrays) | set(weights.aliases)
    if expected != provided:
        missing, extra = sorted(expected - provided), sorted(provided - expected)
        raise ValueError(f"base weights do not fit the architecture: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    made: dict[str, torch.Tensor] = {}
    for name in list(weights.arrays) + list(weights.aliases):
        canonical = weights.aliases.get(name, name)
        if canonical not in made:
            tensor = _as_tensor(weights.arrays[canonical], weights.dtypes[canonical])
            made[canonical] = tensor if canonical in weights.buffers else nn.Parameter(tensor, requires_grad=False)
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if canonical in weights.buffers:
            owner._buffers[leaf] = made[canonical]
        else:
            owner._parameters[leaf] = made[canonical]
    return model
