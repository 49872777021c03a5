"""Ψ, CARL's refinement steps: a 5-level U-Net predicting a displacement field."""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet", "unet_channels"]

#: the reference tallUNet2's channel counts: encoder outputs and decoder outputs
DOWN_CHANNELS = (16, 32, 64, 256, 512)
UP_CHANNELS = (16, 32, 64, 128, 256)


def unet_channels(width: float = 1.0):
    """Encoder and decoder channel counts scaled by ``width`` (at least 1 each)."""
    down = [max(1, round(c * width)) for c in DOWN_CHANNELS]
    up = [max(1, round(c * width)) for c in UP_CHANNELS]
    return down, up


def _take_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """The first ``channels`` channels of ``x``, zero-filled in front when ``x`` has fewer."""
    y = x[:, :channels]
    missing = channels - y.shape[1]
    if missing > 0:
        pad = [0, 0] * (x.dim() - 2) + [missing, 0]
        y = F.pad(y, pad)
    return y


class UNet(nn.Module):
    """The refinement U-Net (reference ``tallUNet2``), state_dict-compatible at width 1.

    ``forward(moving, fixed)`` with ``(B, 1, *S)`` images returns the
    ``(B, D, *S)`` displacement, unit frame, fixed → moving.

    Encoder: stride-2 3×3(×3) convs on ``leaky_relu(x)`` plus a shortcut (the
    input average-pooled, channels zero-filled in front). Decoder: transposed
    4×4(×4) stride-2 convs on ``leaky_relu(x)`` plus the first channels of
    ``x`` upsampled ×2 (linear, ``align_corners=False``), BatchNorm, crop to the
    skip's size, concatenation with the skip. Output: a zero-initialised 3×3(×3)
    conv divided by 10, so an untrained U-Net predicts the identity map.
    """

    def __init__(self, dimension: int, width: float = 1.0, input_channels: int = 2) -> None:
        super().__init__()
        if dimension not in (2, 3):
            raise ValueError(f"UNet(): dimension must be 2 or 3, got {dimension}")
        self.dimension = dimension
        Conv = nn.Conv2d if dimension == 2 else nn.Conv3d
        ConvTranspose = nn.ConvTranspose2d if dimension == 2 else nn.ConvTranspose3d
        BatchNorm = nn.BatchNorm2d if dimension == 2 else nn.BatchNorm3d
        down, up = unet_channels(width)
        down = [input_channels] + down
        up_in = [down[d + 1] + (up[d + 1] if d + 1 < len(up) else 0) for d in range(len(up))]
        self.num_layers = len(up)
        self.downConvs = nn.ModuleList(
            [Conv(down[d], down[d + 1], kernel_size=3, padding=1, stride=2) for d in range(self.num_layers)]
        )
        self.upConvs = nn.ModuleList(
            [ConvTranspose(up_in[d], up[d], kernel_size=4, padding=1, stride=2) for d in range(self.num_layers)]
        )
        self.batchNorms = nn.ModuleList([BatchNorm(up[d]) for d in range(self.num_layers)])
        self.lastConv = Conv(down[0] + up[0], dimension, kernel_size=3, padding=1)
        nn.init.zeros_(self.lastConv.weight)
        nn.init.zeros_(self.lastConv.bias)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        pool = F.avg_pool2d if self.dimension == 2 else F.avg_pool3d
        return pool(x, 2, ceil_mode=True)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        mode = "bilinear" if self.dimension == 2 else "trilinear"
        x = torch.cat([moving, fixed], 1)
        if self.dimension == 3:
            # oneDNN's 3-D (transposed) convolutions with few channels run 2-3× faster channels-last
            x = x.contiguous(memory_format=torch.channels_last_3d)
        skips: List[torch.Tensor] = []
        for depth in range(self.num_layers):
            skips.append(x)
            y = self.downConvs[depth](F.leaky_relu(x))
            x = y + _take_channels(self._pool(x), y.shape[1])
        for depth in reversed(range(self.num_layers)):
            y = self.upConvs[depth](F.leaky_relu(x))
            upsampled = F.interpolate(
                _take_channels(x, y.shape[1]), scale_factor=2, mode=mode, align_corners=False
            )
            x = self.batchNorms[depth](y + upsampled)
            skip = skips[depth]
            x = x[(slice(None), slice(None)) + tuple(slice(0, n) for n in skip.shape[2:])]
            x = torch.cat([x, skip], 1)
        return (self.lastConv(x) / 10).contiguous()
