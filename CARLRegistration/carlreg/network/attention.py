"""Ξ, CARL's first step: a translation-equivariant feature net and coordinate attention.

For a fixed voxel x the attention returns the expected position, on the moving
grid, of the moving voxels whose features match x's: the values of the
attention are the coordinates of the (padded) moving grid, so the output is
the fixed → moving map itself (paper §4, eqs. 7–10).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..device import cpu_fold, fold_rows, unfold_rows
from ..maps import identity_map

__all__ = ["FeatureNet", "AttentionRegistration", "coordinate_attention"]

#: zero padding (voxels per side) around both images before featurising
PADDING = 9
#: reduced-precision inference: queries per chunk and keys per block (a 2048 × 2048 block of
#: scores keeps the matrix products efficient, and short sums keep the float32 weighted sums accurate)
QUERY_CHUNK = 2048
KEY_BLOCK = 2048


class FeatureNet(nn.Module):
    """Translation-equivariant encoder: 'same' 3×3(×3) convolutions, no downsampling.

    ``conv(1→C) + ReLU``, then 3 residual blocks ``x ← BN_i(x); x ← x + conv_d4(relu(conv_d2(relu(conv_d1(x)))))``
    with dilations 1, 2, 4. Parameter order follows the reference: ``convs.0`` the
    first conv, ``convs.1–3`` the dilation-1 convs, ``convs.4–6`` dilation 2,
    ``convs.7–9`` dilation 4.

    Input ``(B, 1, *S)``, output ``(B, C, *S)``.
    """

    def __init__(self, dimension: int, channels: int = 128) -> None:
        super().__init__()
        Conv = nn.Conv2d if dimension == 2 else nn.Conv3d
        BatchNorm = nn.BatchNorm2d if dimension == 2 else nn.BatchNorm3d
        self.batchnorms = nn.ModuleList([BatchNorm(channels) for _ in range(3)])
        convs = [Conv(1, channels, 3, padding="same")]
        for dilation in (1, 2, 4):
            convs += [
                Conv(channels, channels, 3, padding="same", dilation=dilation) for _ in range(3)
            ]
        self.convs = nn.ModuleList(convs)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.convs[0](image))
        for block in range(3):
            x = self.batchnorms[block](x)
            y = torch.relu(self.convs[1 + block](x))
            y = torch.relu(self.convs[4 + block](y))
            x = x + self.convs[7 + block](y)
        return x


def _attend_in_place(queries_t: torch.Tensor, keys: torch.Tensor, values1_t: torch.Tensor) -> torch.Tensor:
    """Unnormalised attention of one query chunk without gradients, looping over blocks of keys.

    ``queries_t`` ``(B, C, q)``, ``keys`` ``(B, Nk, C)``, ``values1_t`` ``(B, V + 1, Nk)``
    (float32 or wider) whose last row is ones; returns ``(B, V + 1, q)``: ``Σ_k exp(s) v`` and
    ``Σ_k exp(s)``. Scores, ``exp`` and the sums use reused buffers.
    """
    batch, n_keys = keys.shape[0], keys.shape[1]
    n_queries = queries_t.shape[-1]
    total = values1_t.new_zeros((batch, values1_t.shape[1], n_queries))
    scores = keys.new_empty((batch, KEY_BLOCK, n_queries))
    weights = scores if scores.dtype == values1_t.dtype else values1_t.new_empty(scores.shape)
    for start in range(0, n_keys, KEY_BLOCK):
        block = keys[:, start : start + KEY_BLOCK]
        size = block.shape[1]
        if size < KEY_BLOCK:  # the last, shorter block: fresh buffers keep `out=` contiguous
            scores = keys.new_empty((batch, size, n_queries))
            weights = scores if scores.dtype == values1_t.dtype else values1_t.new_empty(scores.shape)
        torch.matmul(block, queries_t, out=scores)
        scores.exp_()
        if weights is not scores:
            weights.copy_(scores)
        torch.baddbmm(total, values1_t[..., start : start + size], weights, out=total)
    return total


def _fused_kernel(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with scale 1 of ``(B, 1, N, C)`` (one head), on every CPU
    thread for a single pair: the queries folded into :func:`carlreg.device.cpu_fold` batch entries
    over the same (expanded, not copied) keys and values. Same values as without."""
    fold = cpu_fold(queries, queries.shape[0])
    if fold == 1:
        return F.scaled_dot_product_attention(queries, keys, values, scale=1)
    folded = fold_rows(queries[0, 0], fold)[:, None]
    out = F.scaled_dot_product_attention(folded, keys.expand(fold, -1, -1, -1), values.expand(fold, -1, -1, -1), scale=1)
    return unfold_rows(out[:, 0], queries.shape[2])[None, None]


def _fused_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """PyTorch's fused attention (flash on CPUs, memory-efficient on GPUs), with its backward pass.

    Its kernels need values as wide as the keys: the coordinates are zero-padded (and
    queries and keys too when they are narrower), which changes no score and no output.
    """
    width = max(queries.shape[-1], values.shape[-1])

    def pad(t: torch.Tensor) -> torch.Tensor:  # fused kernels also need unit stride along channels
        return F.pad(t, [0, width - t.shape[-1]]) if t.shape[-1] < width else t.contiguous()

    values_padded = pad(values.to(queries.dtype))
    out = _fused_kernel(pad(queries)[:, None], pad(keys)[:, None], values_padded[:, None])
    return out[:, 0, :, : values.shape[-1]].transpose(1, 2).to(torch.promote_types(values.dtype, torch.float32))


def coordinate_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Single-head attention with scale 1: ``softmax(queries · keysᵀ) · values``.

    With scores in float32 or wider (the inputs' dtype, or the autocast dtype), or with gradients,
    it is PyTorch's fused attention, which never materialises the ``Nq × Nk`` scores (the
    network's maps stay within float32 rounding of a float64 evaluation: bench/precision.py).
    Without gradients and with narrower scores (bfloat16 inference:
    under ``torch.autocast``, or bfloat16 features) the scores are computed in that dtype in
    blocks of 2048 queries × 2048 keys and the weighted sums in float32, as coordinates need: scores must stay within ±16 (features of norm < 4, as
    ``AttentionRegistration`` makes them), so the softmax needs no max subtraction and the
    blocks' sums simply add up, against only the ``V`` value columns.

    Args:
        queries: ``(B, Nq, C)``; keys: ``(B, Nk, C)``; values: ``(B, Nk, V)``.
    Returns:
        ``(B, V, Nq)`` in float32 (or the values' dtype if wider), transposed.
    """
    device_type = queries.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else queries.dtype
    if torch.is_grad_enabled() or torch.promote_types(dtype, torch.float32) == dtype:
        return _fused_attention(queries, keys, values)
    # Centred values halve the rounding of the weighted sums (coordinates span about [-0.2, 1.2]).
    centre = 0.5
    values1_t = torch.cat([values - centre, torch.ones_like(values[..., :1])], dim=-1).transpose(1, 2)
    values1_t = values1_t.to(torch.promote_types(values.dtype, torch.float32)).contiguous()
    with torch.autocast(device_type, enabled=False):
        queries_t = queries.to(dtype).transpose(1, 2)
        keys = keys.to(dtype).contiguous()
        outputs = []
        for chunk in queries_t.split(QUERY_CHUNK, dim=2):
            total = _attend_in_place(chunk.contiguous(), keys, values1_t)
            outputs.append(total[:, :-1] / total[:, -1:])
        return torch.cat(outputs, dim=2) + centre


class AttentionRegistration(nn.Module):
    """Coordinate attention: predicts the displacement of Ξ on its grid.

    ``forward(moving, fixed)`` with ``(B, 1, *m)`` images returns the
    ``(B, D, *m)`` displacement, unit frame, fixed → moving. Both images are
    zero-padded by 9 voxels and featurised; features are normalised per voxel
    to ``4 f / (‖f‖ + 0.001)``; queries are the fixed features cropped back to
    ``m``, keys the moving features over the padded grid, values the padded
    grid's coordinates in the unpadded unit frame, ``(j − 9) / (m − 1)``.

    Under ``torch.autocast`` (the bfloat16 inference mode) the feature net and
    the scores run in bfloat16; the weighted sums of coordinates stay float32.
    """

    def __init__(self, net: nn.Module, dimension: int) -> None:
        super().__init__()
        if dimension not in (2, 3):
            raise ValueError(f"AttentionRegistration(): dimension must be 2 or 3, got {dimension}")
        self.net = net
        self.dimension = dimension
        self.padding = PADDING

    def featurize(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 1, *S)`` image → ``(B, C, *(S + 2·9))`` normalised features of the zero-padded image."""
        padded = F.pad(image, [self.padding] * (2 * self.dimension))
        if self.dimension == 3:
            # oneDNN's 3-D convolutions run about 10% faster on channels-last activations
            padded = padded.contiguous(memory_format=torch.channels_last_3d)
        features = self.net(padded)
        norm = torch.sqrt(torch.sum(features**2, dim=1, keepdim=True))
        return 4 * features / (0.001 + norm)

    def padded_grid_coordinates(self, shape, device) -> torch.Tensor:
        """``(1, D, *(m + 18))`` coordinates of the padded grid in the unpadded unit frame."""
        padded_shape = [n + 2 * self.padding for n in shape]
        scale = torch.tensor(
            [(p - 1) / (n - 1) for p, n in zip(padded_shape, shape)], dtype=torch.float64
        )
        offset = torch.tensor([self.padding / (n - 1) for n in shape], dtype=torch.float64)
        view = (1, self.dimension) + (1,) * self.dimension
        coords = identity_map(padded_shape, dtype=torch.float64) * scale.view(view) - offset.view(view)
        return coords.to(device=device, dtype=torch.float32)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        shape = list(fixed.shape[2:])
        crop = (slice(None), slice(None)) + (slice(self.padding, -self.padding),) * self.dimension
        features_moving = self.featurize(moving)
        features_fixed = self.featurize(fixed)[crop]
        batch, channels = features_moving.shape[:2]
        # (B, C, *S) → (B, N, C): a view for channels-last features
        keys = features_moving.movedim(1, -1).reshape(batch, -1, channels)
        queries = features_fixed.movedim(1, -1).reshape(batch, -1, channels)
        values = self.padded_grid_coordinates(shape, moving.device).reshape(1, self.dimension, -1)
        values = values.transpose(1, 2).expand(batch, -1, -1)
        coords = coordinate_attention(queries, keys, values).reshape(batch, self.dimension, *shape)
        return coords - identity_map(shape, device=moving.device, dtype=coords.dtype)
