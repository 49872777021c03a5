"""uniCARL, the authors' pretrained multi-anatomy CARL (uniGradICON project), on our building blocks.

The released network (``icon_registration.unicarl`` 1.1.9, weights ``longleaf_unicarl_8``) is a
coarse-to-fine cascade trained at a 160³ input. Images are ``(B, 1, *S)`` in tensor axis order
(z, y, x), intensities in [0, 1]; every map is in the unit frame (see :mod:`carlreg.maps`) and
fixed → moving (``moving ∘ φ ≈ fixed``)::

    Ξ     coordinate attention on 384-channel features; runs at S/4, its map lives on an S/16 grid
    T1    TwoStep{Blur21(Down{Ξ}), Down{Ψ1}}                          at S/2
    Tk    TwoStep{Blur21(T(k-1)), Down{Ψk}}, k = 2, 3 (Blur11 for 4, 5) at S/2
    uniCARL = TwoStep{Blur8(Down{T5}), Ψ6}                           at S

- Ψk: the refinement U-Net (:class:`~carlreg.network.unet.UNet`, the reference's tallUNet2), its
  displacement extended beyond the unit cube by odd reflection (:class:`ReflectedDisplacementMap`).
- Blurσ: the inner map evaluated on the module's grid, Gaussian-blurred (σ voxels of that grid) with
  the field continued by odd reflection at the border, and extended by odd reflection as Ψ's.

The state_dict has the reference's key layout (343 entries, 142.3 M parameters, including two
cross-attention blocks that the released model carries but never calls); the authors' file
prefixes every key with the training-time augmentation wrapper, ``netPsi.netPsi.``:
:func:`load_unicarl_checkpoint` loads it.

Where we compute differently from the reference (the same function, to float32 rounding, checked
by ``Testing/test_unicarl.py``):

- the attention is :func:`~carlreg.network.attention.coordinate_attention` (fused, never the
  full score matrix), and the fixed image's features are computed only where the cropped queries
  depend on them;
- each 2³ 'same' convolution followed by a 2-voxel average pool is one stride-2 3³ convolution;
- each blur is a product of small matrices per axis, with the odd-reflection continuation folded in;
- a map evaluated on another module's grid is resized (one interpolation pass), a reflected map
  samples its field a second time only at points outside the unit cube, and 3-D grid sampling
  is split across CPU threads;
- under ``torch.autocast`` (the bfloat16 mode) only the convolutions run in bfloat16: feature
  normalisation and attention scores stay float32 (scores of up to 16 rounded to bfloat16 move
  by up to 0.03, which moved random-weight maps by half a voxel), as do all maps.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..maps import Map, identity_map, sample
from .attention import coordinate_attention
from .unet import UNet
from .wrappers import Down, RegistrationModule, TwoStep

__all__ = [
    "CHECKPOINT_PREFIX",
    "UNICARL_INPUT_SHAPE",
    "BlurredRegistration",
    "FeatureAttentionRegistration",
    "ReflectedDisplacementMap",
    "ReflectingFunctionFromVectorField",
    "UniCARLFeatureNet",
    "build_unicarl",
    "load_unicarl_checkpoint",
    "odd_reflection_blur",
]

#: the input shape the released weights were trained at (tensor order)
UNICARL_INPUT_SHAPE = (160, 160, 160)
#: key prefix of the authors' file: the training-time augmentation wrapper ``TwoStep{affine, PostStep{affine, net}}``
CHECKPOINT_PREFIX = "netPsi.netPsi."
#: smallest input per axis: the U-Nets at S/4 halve 4 times to at least 2 voxels (17 → 2)
MIN_INPUT_SIZE = 65
#: Gaussian σ (voxels of the S/2 grid) of the blurs after the attention and the first two U-Nets, then the next two
HALF_RESOLUTION_SIGMAS = (21, 21, 21, 11, 11)
#: σ (voxels of the input grid) of the blur at full resolution
FULL_RESOLUTION_SIGMA = 8
FEATURE_CHANNELS = 384
#: zero padding (input voxels per side) before featurising; 4 voxels per side on the S/4 feature grid
IMAGE_PADDING = 16
FEATURE_DOWNSCALE = 4


def _reflect_into_unit_interval(coords_unit: torch.Tensor) -> torch.Tensor:
    """Coordinates mirrored into [0, 1] once: ``c ↦ −c`` below 0, ``c ↦ 2 − c`` above 1 (exact in float)."""
    return torch.where(coords_unit < 0, -coords_unit, torch.where(coords_unit > 1, 2 - coords_unit, coords_unit))


#: below this many points a sampling is not worth splitting across threads
PARALLEL_SAMPLING_POINTS = 2**16


def _sample_in_parallel(values: torch.Tensor, coords_unit: torch.Tensor) -> torch.Tensor:
    """:func:`carlreg.maps.sample` (linear, border padding), the same values, using every CPU thread.

    PyTorch's CPU kernel for 3-D grid sampling runs one thread per batch entry; for a single pair
    the points are split along their first axis into one batch entry per thread.
    ``values`` ``(1, C, *S)``, ``coords_unit`` ``(1, D, *T)`` → ``(1, C, *T)``.
    """
    chunks = torch.get_num_threads() if values.device.type == "cpu" else 1
    batch, dimension, first = coords_unit.shape[:3]
    points = coords_unit[0, 0].numel()
    if chunks < 2 or batch != 1 or values.shape[0] != 1 or first % chunks or points < PARALLEL_SAMPLING_POINTS:
        return sample(values, coords_unit)
    pieces = coords_unit.reshape(dimension, chunks, first // chunks, *coords_unit.shape[3:]).transpose(0, 1)
    sampled = sample(values.expand(chunks, *values.shape[1:]), pieces)
    return sampled.transpose(0, 1).reshape(1, values.shape[1], *coords_unit.shape[2:])


class ReflectedDisplacementMap(Map):
    """``x ↦ x + 2 u(x) − u(r(x))``: a displacement field continued by odd reflection across the border.

    ``u`` is sampled linearly with border padding (:func:`carlreg.maps.sample`) and ``r`` mirrors
    coordinates into [0, 1]; inside the unit cube the map is ``x + u(x)``, outside it continues
    the field point-symmetrically about the border value (a linear field stays linear).

    Args:
        displacement: ``(B, D, *S)`` displacement, unit frame, fixed → moving, on the identity grid of shape ``S``.
        grid_values: ``(B, D, *S)`` the map itself on that grid, returned as is by :meth:`on_grid`
            (defaults to identity + displacement).
    """

    def __init__(self, displacement: torch.Tensor, grid_values: Optional[torch.Tensor] = None) -> None:
        self.displacement = displacement
        self.grid_values = grid_values

    def __call__(self, coords_unit: torch.Tensor) -> torch.Tensor:
        inside = _sample_in_parallel(self.displacement, coords_unit)
        return coords_unit + 2 * inside - self._sample_reflected(coords_unit, inside)

    def _sample_reflected(self, coords_unit: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        """``u(r(x))``: equal to ``u(x)`` wherever ``x`` is in the unit cube, sampled again elsewhere."""
        low, high = torch.aminmax(coords_unit)
        if bool(low >= 0) and bool(high <= 1):
            return inside
        batch, dimension = coords_unit.shape[:2]
        outside = ((coords_unit < 0) | (coords_unit > 1)).any(dim=1).reshape(batch, -1).any(dim=0)
        points = outside.nonzero().squeeze(1)
        where = _reflect_into_unit_interval(coords_unit.reshape(batch, dimension, -1).index_select(2, points))
        where = where.reshape(batch, dimension, -1, *([1] * (dimension - 1)))
        values = sample(self.displacement, where).reshape(inside.shape[0], inside.shape[1], -1)
        result = inside.reshape(inside.shape[0], inside.shape[1], -1).index_copy(2, points, values)
        return result.reshape(inside.shape)

    def on_grid(self, identity: torch.Tensor) -> torch.Tensor:
        """On another grid, the field resized linearly (``align_corners=True``: on a grid, the same
        values as sampling it at the grid's coordinates, all inside the unit cube, in one pass)."""
        if identity.shape[2:] != self.displacement.shape[2:]:
            mode = "bilinear" if identity.dim() == 4 else "trilinear"
            with torch.autocast(identity.device.type, enabled=False):
                displacement = self.displacement.to(torch.promote_types(self.displacement.dtype, torch.float32))
                resized = F.interpolate(displacement, size=identity.shape[2:], mode=mode, align_corners=True)
            return identity + resized
        if self.grid_values is not None:
            return self.grid_values
        return identity + self.displacement


class ReflectingFunctionFromVectorField(RegistrationModule):
    """Wraps a network predicting a ``(B, D, *S)`` displacement (unit frame, fixed → moving) as a
    :class:`ReflectedDisplacementMap` (reference: ``carl.RotationFunctionFromVectorField``)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def transform(self, moving: torch.Tensor, fixed: torch.Tensor) -> Map:
        return ReflectedDisplacementMap(self.net(moving, fixed))


def _gaussian_taps(sigma: int) -> torch.Tensor:
    """The normalised float32 Gaussian of ``3σ`` taps (rounded up to odd), centred."""
    size = 3 * sigma + 1 - (3 * sigma) % 2
    offsets = torch.arange(size, dtype=torch.float32) - (size - 1) // 2
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


def blur_matrices(size: int, sigma: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two ``(size, size)`` float64 matrices of the 1-D blur along one axis of ``size`` voxels.

    ``y[i] = Σ_t g[t] · x[c(i + t − h)]`` with ``g`` :func:`_gaussian_taps` (``2h + 1`` taps), for
    ``c`` the replicating continuation (clamp to the end voxels) and for ``c`` the mirroring one
    (reflect about the end voxels). See :func:`odd_reflection_blur`.
    """
    taps = _gaussian_taps(sigma).double()
    half = (taps.numel() - 1) // 2
    if half >= size:
        raise ValueError(f"blur_matrices(): a blur of sigma {sigma} needs more than {half} voxels, got {size}")
    source = torch.arange(size)[:, None] + torch.arange(taps.numel())[None, :] - half
    clamped = source.clamp(0, size - 1)
    mirrored = torch.where(source < 0, -source, torch.where(source > size - 1, 2 * (size - 1) - source, source))
    weights = taps.expand(size, -1)
    replicate = torch.zeros(size, size, dtype=torch.float64).scatter_add_(1, clamped, weights)
    mirror = torch.zeros(size, size, dtype=torch.float64).scatter_add_(1, mirrored, weights)
    return replicate, mirror


def _separable(field: torch.Tensor, matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """``field`` ``(B, C, *S)`` multiplied along each spatial axis ``k`` by ``matrices[k]`` ``(S_k, S_k)``."""
    out = field
    shape = field.shape
    for axis, matrix in enumerate(matrices, start=2):
        matrix = matrix.to(field.dtype)
        if axis == field.dim() - 1:
            out = torch.matmul(out.reshape(-1, shape[axis]), matrix.t())
        else:
            out = torch.matmul(matrix, out.reshape(math.prod(shape[:axis]), shape[axis], -1))
        out = out.reshape(shape)
    return out


def odd_reflection_blur(
    field: torch.Tensor, replicate: Sequence[torch.Tensor], mirror: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Gaussian blur of a ``(B, C, *S)`` field continued beyond the grid by odd reflection.

    The field is continued to ``x̃ = 2 x[clamp(j)] − x[mirror(j)]`` (clamp and mirror on all axes
    at once), which keeps linear fields, the identity map among them, unchanged, and blurred
    separably; as the blur is linear, that is ``2 R(x) − M(x)`` with ``R``, ``M`` the separable
    products of the per-axis ``replicate`` and ``mirror`` matrices (:func:`blur_matrices`).
    Computed in float32 at least (autocast off): maps must not be rounded to bfloat16.
    """
    dtype = torch.promote_types(field.dtype, torch.float32)
    with torch.autocast(field.device.type, enabled=False):
        field = field.to(dtype).contiguous()
        return 2 * _separable(field, replicate) - _separable(field, mirror)


class BlurredRegistration(RegistrationModule):
    """Blurσ{net}: ``net``'s map evaluated on this module's grid, Gaussian-blurred, odd-reflected beyond it.

    ``transform(moving, fixed)`` with ``(B, 1, *S)`` images returns a :class:`ReflectedDisplacementMap`
    (fixed → moving, unit frame) whose values on the ``S`` grid are the blurred map. ``sigma`` is
    in voxels of this module's grid (reference: ``fixed_point_carl.Blur(net, sigma)``).
    """

    def __init__(self, net: RegistrationModule, sigma: int) -> None:
        super().__init__()
        self.net = net
        self.sigma = int(sigma)

    def set_input_shape(self, input_shape: Sequence[int], unit_shape: Optional[Sequence[int]] = None) -> None:
        super().set_input_shape(input_shape, unit_shape)
        for axis, size in enumerate(self.input_shape):
            for name, matrix in zip(("replicate", "mirror"), blur_matrices(size, self.sigma)):
                matrix = matrix.to(device=self.identity_map.device, dtype=torch.float32)
                self.register_buffer(f"blur_{name}_{axis}", matrix, persistent=False)

    def transform(self, moving: torch.Tensor, fixed: torch.Tensor) -> Map:
        inner = self.net.transform(moving, fixed).on_grid(self.identity_map)
        axes = range(len(self.input_shape))
        replicate = [getattr(self, f"blur_replicate_{axis}") for axis in axes]
        mirror = [getattr(self, f"blur_mirror_{axis}") for axis in axes]
        blurred = odd_reflection_blur(inner, replicate, mirror)
        return ReflectedDisplacementMap(blurred - self.identity_map, grid_values=blurred)


def _shrink(x: torch.Tensor, by: int) -> torch.Tensor:
    """``(B, C, *S)`` → ``(B, C, *(S − 2·by))``: without its outer ``by`` voxels on every spatial axis (a view)."""
    if by == 0:
        return x
    return x[(slice(None), slice(None)) + tuple(slice(by, n - by) for n in x.shape[2:])]


class UniCARLFeatureNet(nn.Module):
    """uniCARL's feature net (reference ``SomeDownsampleNoDilationNet``): 384 channels at 1/4 resolution.

    ``conv 2³ (1 → 96)``, average pool 2 (ceil), ``conv 2³ (96 → 384)``, pool, ReLU, then 3 residual
    blocks ``x ← BN_i(x); x ← x + conv(relu(conv(relu(conv(x)))))`` of 3³ convolutions (``convs.1–3``
    first, ``convs.4–6`` second, ``convs.7–9`` third of each block). The 2³ convolutions are
    'same' convolutions: zero padding of one voxel at the far end of each axis.

    Input ``(B, 1, *S)``, output ``(B, 384, *ceil(S / 4))``.
    """

    def __init__(self, dimension: int = 3, channels: int = FEATURE_CHANNELS) -> None:
        super().__init__()
        if dimension not in (2, 3):
            raise ValueError(f"UniCARLFeatureNet(): dimension must be 2 or 3, got {dimension}")
        self.dimension = dimension
        Conv = nn.Conv2d if dimension == 2 else nn.Conv3d
        BatchNorm = nn.BatchNorm2d if dimension == 2 else nn.BatchNorm3d
        self.convs = nn.ModuleList([Conv(channels // 4, channels, 2)])
        self.convs.extend(Conv(channels, channels, 3, padding=1) for _ in range(9))
        self.batchnorms = nn.ModuleList([BatchNorm(channels) for _ in range(3)])
        self.convs0 = Conv(1, channels // 4, 2)

    def _conv_then_pool(self, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``avg_pool(conv_same(x), 2, ceil_mode=True)`` for a 2-tap 'same' convolution ``conv``.

        On even sizes, computed as one stride-2 convolution with 3 taps, ``(w[s] + w[s − 1]) / 2`` per
        axis (a 2-tap convolution followed by a 2-voxel mean): a quarter of the operations and
        no full-resolution intermediate. Odd sizes (a partial last pooling window) take both steps.
        """
        padded = F.pad(x, [0, 1] * self.dimension)
        if any(n % 2 for n in x.shape[2:]):
            pool = F.avg_pool2d if self.dimension == 2 else F.avg_pool3d
            return pool(conv(padded), 2, ceil_mode=True)
        weight = conv.weight
        for axis in range(self.dimension):
            after = [0, 0] * self.dimension
            before = [0, 0] * self.dimension
            after[2 * axis + 1] = 1
            before[2 * axis] = 1
            weight = 0.5 * (F.pad(weight, after) + F.pad(weight, before))
        if self.dimension == 3:
            padded = padded.contiguous(memory_format=torch.channels_last_3d)
        convolve = F.conv2d if self.dimension == 2 else F.conv3d
        return convolve(padded, weight, conv.bias, stride=2)

    def _conv_within(self, conv: nn.Module, x: torch.Tensor, margin_in: int, margin_out: int) -> torch.Tensor:
        """A 'same' 3³ convolution of the full grid, computed only ``margin_out`` voxels in from its border.

        ``x`` holds the input from ``margin_in`` voxels in (0: the whole grid, zero padding outside).
        """
        if margin_out == 0:
            return conv(x)
        convolve = F.conv2d if self.dimension == 2 else F.conv3d
        return convolve(_shrink(x, margin_out - 1 - margin_in), conv.weight, conv.bias)

    def forward(self, image: torch.Tensor, crop: int = 0) -> torch.Tensor:
        """Features of ``(B, 1, *S)`` images, ``(B, 384, *ceil(S / 4))``, or only ``crop`` voxels in from the border.

        With ``crop``, every 3³ convolution is computed only where the cropped output depends on it
        (the last block on a shrinking region, the block before on all but its outer ``crop − 3``
        voxels): the same values as cropping the full output.
        """
        x = self._conv_then_pool(self.convs0, image)
        x = torch.relu(self._conv_then_pool(self.convs[0], x))
        if self.dimension == 3:
            # oneDNN's 3³ convolutions run faster on channels-last activations
            x = x.contiguous(memory_format=torch.channels_last_3d)
        margins = [max(crop - 3 * (2 - block), 0) for block in range(3)]
        margin = 0
        for block in range(3):
            x = self.batchnorms[block](x)
            third = margins[block]
            second = max(third - 1, 0)
            first = max(second - 1, 0)
            y = torch.relu(self._conv_within(self.convs[1 + block], x, margin, first))
            y = torch.relu(self._conv_within(self.convs[4 + block], y, first, second))
            y = self._conv_within(self.convs[7 + block], y, second, third)
            x = y + _shrink(x, third - margin)
            margin = third
        return x


class UnusedCrossAttention(nn.Module):
    """Weights of a cross-attention block that the released uniCARL carries but never calls.

    The authors disabled the block in their forward pass after training; it is kept (six 128-wide
    linear layers) only so that their checkpoint loads strictly. Calling it is an error.
    """

    def __init__(self, width: int = 128, inner: int = 64) -> None:
        super().__init__()
        self.key_layer = nn.Linear(width, inner)
        self.value_layer = nn.Linear(width, inner)
        self.query_layer = nn.Linear(width, inner)
        self.output_layer = nn.Linear(inner, width)
        self.mlp1 = nn.Linear(width, width)
        self.mlp2 = nn.Linear(width, width)

    def forward(self, *args, **kwargs):
        raise RuntimeError("UnusedCrossAttention(): uniCARL never calls its cross-attention blocks")


class FeatureAttentionRegistration(RegistrationModule):
    """Ξ: coordinate attention between features of both images on the 1/4 grid.

    ``transform(moving, fixed)`` with ``(B, 1, *m)`` images returns a :class:`ReflectedDisplacementMap`
    (fixed → moving, unit frame) stored on the ``a = ceil(m / 4)`` grid. Both images are zero-padded
    by 16 voxels and featurised to ``(B, 384, *(a + 8))``; features are normalised per voxel to
    ``4 f / (‖f‖ + 0.001)``. Queries are the fixed features cropped to ``a``, keys the moving
    features over the padded grid, values that grid's coordinates in the unpadded unit frame of
    ``a``, ``(j − 4) / (a − 1)``; the expected coordinate minus the identity is the displacement.
    (Reference: ``fixed_point_carl.AttentionFeaturizer`` around ``AttentionRegistration``.)
    """

    attention_identity: torch.Tensor
    padded_coordinates: torch.Tensor

    def __init__(self, net: nn.Module, dimension: int = 3) -> None:
        super().__init__()
        self.net = net
        self.dimension = dimension
        self.cross1 = UnusedCrossAttention()
        self.cross2 = UnusedCrossAttention()
        self.feature_padding = IMAGE_PADDING // FEATURE_DOWNSCALE

    def set_input_shape(self, input_shape: Sequence[int], unit_shape: Optional[Sequence[int]] = None) -> None:
        super().set_input_shape(input_shape, unit_shape)
        device = self.identity_map.device
        shape = [math.ceil(n / FEATURE_DOWNSCALE) for n in self.input_shape]
        if min(shape) < 2:
            raise ValueError(f"FeatureAttentionRegistration(): input too small for a 1/4 grid, got {list(input_shape)}")
        pad = self.feature_padding
        padded = [n + 2 * pad for n in shape]
        scale = torch.tensor([(p - 1) / (n - 1) for p, n in zip(padded, shape)], dtype=torch.float64)
        offset = torch.tensor([pad / (n - 1) for n in shape], dtype=torch.float64)
        view = (1, self.dimension) + (1,) * self.dimension
        coords = identity_map(padded, dtype=torch.float64) * scale.view(view) - offset.view(view)
        self.register_buffer("padded_coordinates", coords.to(device=device, dtype=torch.float32), persistent=False)
        self.register_buffer("attention_identity", identity_map(shape, device=device), persistent=False)

    def featurize(self, image: torch.Tensor, crop: int = 0) -> torch.Tensor:
        """``(B, 1, *m)`` images → ``(B, 384, *(ceil(m / 4) + 8 − 2·crop))`` normalised features of
        the padded images, ``crop`` voxels in from the border of the feature grid."""
        features = self.net(F.pad(image, [IMAGE_PADDING] * (2 * self.dimension)), crop=crop)
        with torch.autocast(image.device.type, enabled=False):
            features = features.float()
            norm = torch.sqrt(torch.sum(features**2, dim=1, keepdim=True))
            return 4 * features / (0.001 + norm)

    def transform(self, moving: torch.Tensor, fixed: torch.Tensor) -> Map:
        batch, channels = moving.shape[0], self.net.convs[1].out_channels
        keys = self.featurize(moving).movedim(1, -1).reshape(batch, -1, channels)
        queries = self.featurize(fixed, crop=self.feature_padding).movedim(1, -1).reshape(batch, -1, channels)
        values = self.padded_coordinates.reshape(1, self.dimension, -1).transpose(1, 2).expand(batch, -1, -1)
        with torch.autocast(moving.device.type, enabled=False):
            coords = coordinate_attention(queries, keys, values)
        coords = coords.reshape(batch, self.dimension, *self.attention_identity.shape[2:])
        return ReflectedDisplacementMap(coords - self.attention_identity)


def _refiner(downsampled: bool) -> RegistrationModule:
    step = ReflectingFunctionFromVectorField(UNet(3))
    return Down(step, 3) if downsampled else step


def build_unicarl(
    input_shape: Sequence[int] = UNICARL_INPUT_SHAPE, device: Optional[torch.device] = None
) -> RegistrationModule:
    """Build uniCARL (see the module docstring), state_dict-compatible with the released weights.

    Calling the result on ``(B, 1, *input_shape)`` moving and fixed images (tensor order z, y, x,
    intensities in [0, 1]) returns the ``(B, 3, *input_shape)`` fixed → moving map, unit frame;
    ``input_shape`` gives the spatial shape. The weights were trained at 160³; other shapes (at
    least 65 voxels per axis) compute the same architecture. Load the authors' file with
    :func:`load_unicarl_checkpoint`.

    Args:
        input_shape: 3 sizes, tensor order.
        device: where to put the network (default: the CPU).
    """
    input_shape = tuple(int(n) for n in input_shape)
    if len(input_shape) != 3 or min(input_shape) < MIN_INPUT_SIZE:
        raise ValueError(
            f"build_unicarl(): input_shape must be 3 sizes of at least {MIN_INPUT_SIZE} voxels, got {list(input_shape)}"
        )
    net: RegistrationModule = Down(FeatureAttentionRegistration(UniCARLFeatureNet(3), 3), 3)
    for sigma in HALF_RESOLUTION_SIGMAS:
        net = TwoStep(BlurredRegistration(net, sigma), _refiner(downsampled=True))
    net = TwoStep(BlurredRegistration(Down(net, 3), FULL_RESOLUTION_SIGMA), _refiner(downsampled=False))
    net.set_input_shape(input_shape)
    net.preprocessing = "unicarl"
    if device is not None:
        net.to(device)
    return net


def _mismatch(expected: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor]) -> List[str]:
    missing = [key for key in expected if key not in received]
    unexpected = [key for key in received if key not in expected]
    shapes = [
        f"{key} expected {tuple(value.shape)} got {tuple(received[key].shape)}"
        for key, value in expected.items()
        if key in received and tuple(received[key].shape) != tuple(value.shape)
    ]
    problems = []
    for name, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            problems.append(f"{name} {len(items)}: {', '.join(items[:3])}{more}")
    return problems


def load_unicarl_checkpoint(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load uniCARL weights into ``model`` (from :func:`build_unicarl`) strictly, in place.

    Accepts the authors' file as saved during training, every key prefixed with ``netPsi.netPsi.``
    (the augmentation wrapper around the network), or our own ``model.state_dict()`` (no prefix).
    Keys and shapes must match exactly; tensors are copied to the model's device and dtype.

    Raises:
        ValueError: a key or shape mismatch (one line: expected vs received).
    """
    prefixed = sum(key.startswith(CHECKPOINT_PREFIX) for key in state_dict)
    weights: Dict[str, torch.Tensor] = {
        (key[len(CHECKPOINT_PREFIX):] if key.startswith(CHECKPOINT_PREFIX) else key): value
        for key, value in state_dict.items()
    }
    expected = model.state_dict()
    problems = _mismatch(expected, weights)
    if 0 < prefixed < len(state_dict):
        problems.insert(0, f"{len(state_dict) - prefixed} keys lack the prefix {CHECKPOINT_PREFIX!r}")
    if problems:
        layout = f"keys prefixed {CHECKPOINT_PREFIX!r}" if prefixed else "keys without prefix"
        raise ValueError(
            f"load_unicarl_checkpoint(): expected the {len(expected)} entries of uniCARL's state_dict, "
            f"got {len(state_dict)} ({layout}): " + "; ".join(problems)
        )
    model.load_state_dict(weights, strict=True)

