"""Many adapters over one frozen base in a single forward/backward (batched multi-adapter training).

The samples of n adapters are concatenated into one batch; `route` (batch,) says which adapter
each sample belongs to. Every LoRA layer of the AdapterModel computes its base output once for the
whole batch and adds each sample's own low-rank update:

    y_b = base(x_b) + scale * B[route_b] @ A[route_b] @ dropout(x_b)

with the adapters held *stacked*: a tensor of shape (n, *shape) per entry of the flat adapter
layout (e.g. lora_A (n, r, d_in), lora_B (n, d_out, r), head.weight (n, classes, hidden)). The
gradient of adapter i only sees its own samples, so summing every adapter's mean loss and
stepping a per-adapter optimizer reproduces training the adapters one by one (client/training.py).

peft's own LoRA path is switched off for the duration (its layers then return base(x)) and a
forward hook on each LoRA layer adds the routed update. Only peft LoRA on Linear and Conv2d layers
is supported; FLoRAL's mixture layers train one adapter at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as lora_layers

from fltac_ray.models.adapter_model import AdapterModel, split_adapter


class UnsupportedBatching(ValueError):
    """The model has trainable tensors the batched path cannot route (FLoRAL mixtures, ...)."""


class StackedAdapters:
    """n flat adapters (n, adapter_size) as stacked leaf tensors, one per adapter-layout entry."""

    def __init__(self, model: AdapterModel, vectors: np.ndarray, device: torch.device) -> None:
        layout = model.adapter_layout()
        if vectors.ndim != 2 or vectors.shape[1] != model.adapter_size:
            raise ValueError(f"adapters have shape {vectors.shape}, expected (n, {model.adapter_size})")
        self.count = vectors.shape[0]
        self.names = [name for name, _ in layout]
        self.tensors: dict[str, torch.Tensor] = {}
        blocks = split_adapter(np.asarray(vectors, dtype=np.float32), layout)  # name -> (n, *shape)
        for name, block in blocks.items():
            source = torch.from_numpy(np.ascontiguousarray(block))
            self.tensors[name] = source.to(device).clone().requires_grad_(True)

    def parameters(self) -> list[torch.Tensor]:
        return [self.tensors[name] for name in self.names]

    def per_example(self, route: torch.Tensor) -> StackedAdapters:
        """A copy of adapter route[i] for every sample i, as new leaves (len(route), *shape): routed
        with route arange(len(route)), a backward leaves each sample's own gradient on its copy
        (DP-SGD's per-example gradients, privacy/dp_sgd.py)."""
        copies = object.__new__(StackedAdapters)
        copies.count, copies.names = len(route), list(self.names)
        copies.tensors = {name: tensor.detach()[route].requires_grad_(True) for name, tensor in self.tensors.items()}
        return copies

    def to_numpy(self) -> np.ndarray:
        """(n, adapter_size) float32, in the flat layout of AdapterModel.get_adapter()."""
        with torch.no_grad():
            flat = torch.cat([self.tensors[name].reshape(self.count, -1) for name in self.names], dim=1)
        return flat.to("cpu", torch.float32).numpy().copy()


def _lora_layers(model: AdapterModel) -> list[tuple[str, torch.nn.Module]]:
    return model.lora_layers()


def _routable_layers() -> tuple[type, ...]:
    """peft LoRA layer classes whose update the routed hook can add: Linear, Conv2d, and the
    bitsandbytes-quantised Linear layers (the hook only reads the layer's input and output)."""
    types: list[type] = [lora_layers.Linear, lora_layers.Conv2d]
    try:
        from peft.tuners.lora import bnb
    except ImportError:
        return tuple(types)
    types += [getattr(bnb, name) for name in ("Linear8bitLt", "Linear4bit") if hasattr(bnb, name)]
    return tuple(types)


def check_batchable(model: AdapterModel) -> None:
    """Raise UnsupportedBatching unless every adapter entry is a LoRA A/B of a Linear or Conv2d
    layer or the classifier head."""
    if model.router is not None:
        raise UnsupportedBatching("FLoRAL's router-mixed adaptors train one adapter at a time")
    covered = {"head.weight", "head.bias"} if model.head is not None and not model.head_frozen else set()
    for name, module in _lora_layers(model):
        if not isinstance(module, _routable_layers()):
            raise UnsupportedBatching(f"LoRA on {type(module).__name__} ({name}) is not batched")
        covered |= {f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight"}
    extra = [name for name, _ in model.adapter_layout() if name not in covered]
    if extra:
        raise UnsupportedBatching(f"adapter entries the batched path cannot route: {extra[:3]}")


def _routed_linear(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
    # x: (batch, ..., d_in); a: (n, r, d_in); b: (n, d_out, r) -> (batch, ..., d_out)
    flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (batch, tokens, d_in)
    hidden = torch.bmm(flat, a[route].transpose(1, 2))  # (batch, tokens, r)
    out = torch.bmm(hidden, b[route].transpose(1, 2))  # (batch, tokens, d_out)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _routed_conv(module: torch.nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 route: torch.Tensor) -> torch.Tensor:
    # x: (batch, c_in, h, w); a: (n, r, c_in, kh, kw) like the base conv; b: (n, c_out, r, 1, 1)
    conv_a = module.lora_A["default"]
    if conv_a.kernel_size == (1, 1) and conv_a.stride == (1, 1) and conv_a.padding in ((0, 0), "valid"):
        # a 1x1 convolution is a per-pixel linear map: route it like a Linear
        hidden = torch.einsum("bihw,bri->brhw", x, a[route][..., 0, 0])
        return torch.einsum("brhw,bor->bohw", hidden, b[route][..., 0, 0])
    out = None  # general kernels: one conv pair per adapter present in the batch
    for index in torch.unique(route).tolist():
        rows = (route == index).nonzero().squeeze(1)
        hidden = F.conv2d(x[rows], a[index], None, conv_a.stride, conv_a.padding, conv_a.dilation, conv_a.groups)
        part = F.conv2d(hidden, b[index])
        out = part.new_zeros((x.shape[0], *part.shape[1:])) if out is None else out
        out = out.index_put((rows,), part)
    return out


def update_in_pass_dtype(device: torch.device) -> bool:
    """Whether the routed LoRA update runs in the pass's autocast dtype (CUDA) or in float32 (the
    CPU). On CUDA, like the base: in float32 a copy of every targeted layer's input would be kept
    for backward (Llama: ~+20-25% activation memory), and bmm runs on the tensor cores; the
    adapters and their gradients stay float32. On the CPU its matmuls are matrix-vector shaped at
    rank 1-8, which run slower in bfloat16 than in float32 (MiniLM: the pass's bmm time 1.4x)."""
    return device.type == "cuda"


@contextmanager
def routed(model: AdapterModel, stacked: StackedAdapters, route: torch.Tensor) -> Iterator[None]:
    """Within the block, the model's LoRA layers apply adapter route[i] to sample i of the batch."""
    hooks, switched = [], []

    def make_hook(name: str, module: torch.nn.Module):
        a = stacked.tensors[f"{name}.lora_A.default.weight"]
        b = stacked.tensors[f"{name}.lora_B.default.weight"]
        scale = module.scaling["default"]
        dropout = module.lora_dropout["default"]
        conv = isinstance(module, lora_layers.Conv2d)

        def hook(_module, args, output):
            x = args[0]
            if update_in_pass_dtype(x.device):
                if not torch.is_autocast_enabled(x.device.type):
                    x = x.to(a.dtype)  # no autocast around this pass: the adapters' dtype
                delta = _routed_conv(module, dropout(x), a, b, route) if conv else \
                    _routed_linear(dropout(x), a, b, route)
                return output + (delta * scale).to(output.dtype)
            with torch.autocast(x.device.type, enabled=False):
                x = dropout(x.to(a.dtype))
                delta = _routed_conv(module, x, a, b, route) if conv else _routed_linear(x, a, b, route)
            return output + (delta * scale).to(output.dtype)

        return hook

    try:
        for name, module in _lora_layers(model):
            switched.append((module, module._disable_adapters))
            module._disable_adapters = True  # peft's layer now returns base(x) only
            hooks.append(module.register_forward_hook(make_hook(name, module)))
        yield
    finally:
        for handle in hooks:
            handle.remove()
        for module, before in switched:
            module._disable_adapters = before


def routed_head(model: AdapterModel, features: torch.Tensor, stacked: StackedAdapters,
                route: torch.Tensor) -> torch.Tensor:
    """(batch, hidden) features -> (batch, head_classes) float32 logits, each sample through its
    adapter's head (in float32 in a half-precision pass too: a matrix-vector product per sample),
    or through the model's one frozen head (model.head: frozen)."""
    if "head.weight" not in stacked.tensors:
        with torch.autocast(features.device.type, enabled=False):
            return model.head(features.float())
    weight = stacked.tensors["head.weight"][route]  # (batch, classes, hidden)
    bias = stacked.tensors["head.bias"][route]  # (batch, classes)
    with torch.autocast(features.device.type, enabled=False):
        return torch.bmm(weight, features.to(weight.dtype).unsqueeze(-1)).squeeze(-1) + bias
