"""Mixtures of LoRA adaptors mixed by a private router, for FLoRAL (Almansoori, Horvath, Takac,
arXiv 2410.03497, "Collaborative and Efficient Personalization with Mixtures of Adaptors").

Every adapted layer computes  y = base(x) + scale * sum_c gate_c * adaptor_c(x), where
gate = max(softmax((w + noise) / temperature), min_weight) and w (C,) is the client's private
router, shared by all layers of the model; in training, noise ~ U(0, router_noise) per entry is
drawn once per forward pass (the reference's noisy gating; none in evaluation). The C adaptors of
each layer are stored stacked along a leading C axis, so a flattened upload is laid out
adaptor-major inside every tensor and the server can average adaptor c with its own weights.
As in the reference code (zeligism/FLoRAL): scale 1.0, ranks as a share of each layer's
parameter budget, A ~ U(-sqrt(6 / fan_in), +), a zero-initialised bias per adaptor on layers
that have a bias, no gate floor (floral.* options select the alternatives).

Adaptor shapes (C adaptors, rank r):
  Linear(in, out):      A (C, r, in), B (C, out, r); B zero-initialised; bias (C, out) optional
  Conv2d(in, out, k):   a (1, k_w) conv in -> r then a (k_h, 1) conv r -> out per adaptor,
                        stored as (C, r, in, 1, k_w) and (C, out, r, k_h, 1); the second zero
  Embedding(n, dim):    A (C, n, r), B (C, r, dim); B zero-initialised
  LayerNorm / GroupNorm / BatchNorm: an affine copy (C, features) scale and shift on the
                        normalised input, both zero-initialised
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn


class MixtureSettings(Protocol):
    """What building a mixture model reads (FLoRAL's options satisfy it; the model layer names
    the settings it needs rather than importing the algorithm that supplies them)."""

    temperature: float
    min_weight: float
    router_noise: float
    router_lr: float
    router: Literal["learned", "optimal"]
    rank_fraction: float | None
    alpha: float | None
    bias: bool


class Router(nn.Module):
    """Holds the private router w (C,) and turns it into gates for every adapted layer."""

    def __init__(self, num_adaptors: int, temperature: float, min_weight: float, noise: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_adaptors))  # w: zero-initialised (uniform mix)
        self.temperature = temperature
        self.min_weight = min_weight
        self.noise = noise
        self._drawn: torch.Tensor | None = None  # this forward pass's noise (training only)

    def resample(self) -> None:
        """Draw the noise of one forward pass (training with router noise); call before it."""
        self._drawn = (self.noise * torch.rand_like(self.weight.detach())
                       if self.training and self.noise > 0 else None)

    def mixture(self) -> torch.Tensor:
        """pi = softmax(w / temperature): (C,), without noise (what the server is told)."""
        return torch.softmax(self.weight / self.temperature, dim=0)

    def gates(self) -> torch.Tensor:
        # The optional floor keeps every adaptor trained a little, so none dies for a client.
        weight = self.weight if self._drawn is None or not self.training else self.weight + self._drawn
        return torch.softmax(weight / self.temperature, dim=0).clamp_min(self.min_weight)


def layer_rank(rank: int | None, rank_fraction: float | None, in_size: int, out_size: int) -> int:
    """An integer rank, or a share f of the layer's parameter budget as the reference resolves
    it: int(f x in x out / (in + out)) — rank r adds r (in + out) parameters to in x out — at
    least 1."""
    if rank_fraction is not None:
        return max(1, int(rank_fraction * in_size * out_size / (in_size + out_size)))
    if rank is None:
        raise ValueError("give a rank or a rank_fraction")
    return rank


class _Mixture(nn.Module):
    def __init__(self, base: nn.Module, router: Router) -> None:
        super().__init__()
        self.base = base
        # a list hides the shared router from this module's parameters (it is counted once)
        self._router = [router]

    @property
    def router(self) -> Router:
        return self._router[0]


def _init_a(a: torch.Tensor, fan_in: int) -> None:
    """The reference's "uniform_in": A ~ U(-sqrt(6 / fan_in), sqrt(6 / fan_in)) (B is zero)."""
    bound = math.sqrt(6.0 / fan_in)
    nn.init.uniform_(a, -bound, bound)


class MixtureLinear(_Mixture):
    def __init__(self, base: nn.Linear, router: Router, rank: int, scale: float, dropout: float,
                 bias: bool = False) -> None:
        super().__init__(base, router)
        c = router.weight.numel()
        self.lora_A = nn.Parameter(torch.empty(c, rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(c, base.out_features, rank))
        _init_a(self.lora_A, base.in_features)
        # a bias per adaptor, on layers that have one (the reference's bias=True)
        self.lora_bias = (nn.Parameter(torch.zeros(c, base.out_features))
                          if bias and base.bias is not None else None)
        self.scale = scale
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.router.gates()  # (C,)
        low = torch.einsum("...i,cri->...cr", self.dropout(x), self.lora_A)  # (..., C, r)
        delta = torch.einsum("...cr,cor->...o", low * gates[:, None], self.lora_B)  # (..., out)
        if self.lora_bias is not None:
            delta = delta + gates @ self.lora_bias  # (out,)
        return self.base(x) + self.scale * delta


class MixtureConv2d(_Mixture):
    def __init__(self, base: nn.Conv2d, router: Router, rank: int, scale: float) -> None:
        super().__init__(base, router)
        if base.groups != 1:
            raise ValueError("FLoRAL conv adaptors support groups=1 convolutions only")
        c = router.weight.numel()
        k_h, k_w = base.kernel_size
        self.lora_A = nn.Parameter(torch.empty(c, rank, base.in_channels, 1, k_w))
        self.lora_B = nn.Parameter(torch.zeros(c, base.out_channels, rank, k_h, 1))
        _init_a(self.lora_A, base.in_channels * k_w)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.base
        c, rank = self.lora_A.shape[:2]
        # all C (1, k_w) convs at once: (batch, C * r, H, W')
        low = F.conv2d(x, self.lora_A.flatten(0, 1), stride=(1, conv.stride[1]),
                       padding=(0, conv.padding[1]), dilation=(1, conv.dilation[1]))
        gates = self.router.gates().repeat_interleave(rank)[None, :, None, None]
        # grouped (k_h, 1) convs, one group per adaptor, summed over adaptors afterwards
        weight_b = self.lora_B.flatten(0, 1)  # (C * out, r, k_h, 1)
        out = F.conv2d(low * gates, weight_b, stride=(conv.stride[0], 1),
                       padding=(conv.padding[0], 0), dilation=(conv.dilation[0], 1), groups=c)
        out = out.unflatten(1, (c, conv.out_channels)).sum(1)
        return conv(x) + self.scale * out


class MixtureEmbedding(_Mixture):
    def __init__(self, base: nn.Embedding, router: Router, rank: int, scale: float) -> None:
        super().__init__(base, router)
        c = router.weight.numel()
        self.lora_A = nn.Parameter(torch.randn(c, base.num_embeddings, rank) / rank)
        self.lora_B = nn.Parameter(torch.zeros(c, rank, base.embedding_dim))
        self.scale = scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        low = self.lora_A[:, ids]  # (C, *ids.shape, r)
        low = low * self.router.gates().view(-1, *([1] * (low.dim() - 1)))
        delta = torch.einsum("c...r,crd->...d", low, self.lora_B)
        return self.base(ids) + self.scale * delta


class MixtureNorm(_Mixture):
    """A zero-initialised affine copy per adaptor, applied to the normalised input."""

    def __init__(self, base: nn.Module, router: Router) -> None:
        super().__init__(base, router)
        c = router.weight.numel()
        features = base.normalized_shape[-1] if isinstance(base, nn.LayerNorm) else base.num_features
        if isinstance(base, nn.GroupNorm):
            features = base.num_channels
        self.lora_scale = nn.Parameter(torch.zeros(c, features))
        self.lora_shift = nn.Parameter(torch.zeros(c, features))

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        if isinstance(base, nn.LayerNorm):
            return F.layer_norm(x, base.normalized_shape, eps=base.eps)
        if isinstance(base, nn.GroupNorm):
            return F.group_norm(x, base.num_groups, eps=base.eps)
        # BatchNorm: frozen statistics, as in eval mode
        return F.batch_norm(x, base.running_mean, base.running_var, training=False, eps=base.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.router.gates()
        scale = gates @ self.lora_scale  # (features,)
        shift = gates @ self.lora_shift
        if not isinstance(self.base, nn.LayerNorm):  # channels first: (batch, C, ...)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            scale, shift = scale.view(shape), shift.view(shape)
        return self.base(x) + self._normalised(x) * scale + shift


NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def inject_mixtures(
    model: nn.Module,
    target_modules: list[str],
    router: Router,
    rank: int | None,
    rank_fraction: float | None,
    alpha: float,
    dropout: float,
    scale: float | None = None,
    bias: bool = False,
) -> list[str]:
    """Replace every module whose last name part is in `target_modules` by its mixture version.
    Each scales its adaptors by `scale` (None: alpha / its rank); `bias`: a bias per adaptor on
    Linear layers with a bias. Returns the replaced module names; raises when a target matches
    nothing adaptable."""
    def scale_of(r: int) -> float:
        return alpha / r if scale is None else scale

    replaced, unmatched = [], set(target_modules)
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in target_modules:
            continue
        if isinstance(module, nn.Linear):
            r = layer_rank(rank, rank_fraction, module.in_features, module.out_features)
            new = MixtureLinear(module, router, r, scale_of(r), dropout, bias)
        elif isinstance(module, nn.Conv2d):
            r = layer_rank(rank, rank_fraction, module.in_channels, module.out_channels)
            new = MixtureConv2d(module, router, r, scale_of(r))
        elif isinstance(module, nn.Embedding):
            r = layer_rank(rank, rank_fraction, module.num_embeddings, module.embedding_dim)
            new = MixtureEmbedding(module, router, r, scale_of(r))
        elif isinstance(module, NORM_TYPES):
            new = MixtureNorm(module, router)
        else:
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, leaf, new)
        replaced.append(name)
        unmatched.discard(leaf)
    if unmatched:
        raise ValueError(f"{sorted(unmatched)} match no Linear, Conv2d, Embedding or norm module")
    return replaced
