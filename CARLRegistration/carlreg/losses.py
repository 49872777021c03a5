"""Similarity, regularity and the training objective of each phase.

Images are ``(B, 1, *S)`` tensors in tensor axis order; maps are fixed → moving
in the unit frame (see :mod:`carlreg.maps`). A = moving, B = fixed.

- LNCC(σ): local normalised cross-correlation with a separable Gaussian window
  (``4σ + 1`` taps, zero 'same' padding); the loss is ``1 − mean(LNCC)``, the mean taken, when
  the images come with validity masks, over the voxels that are valid in both (the content of a
  training image cut to a field of view is lost, not background).
- GradICON: the squared Frobenius norm of the Jacobian of the inverse-consistency
  error ``e(x) = x − φ_AB(φ_BA(x))`` at jittered grid points, by finite differences.
- Diffusion: ``N0² Σ_axes mean(forward differences of (id − φ_AB))²``.
- Label overlap (optional supervision, as SynthMorph trains): ``1 − mean soft Dice`` of the
  images' one-hot label maps, the warped one sampled linearly, over the labels of the target.

Phase 1 (warm-up) minimises ``2·LNCC(A∘φ_AB, B) + λ·diffusion`` in one
direction; phase 2 minimises ``LNCC(A∘φ_AB, B) + LNCC(B∘φ_BA, A) + λ·GradICON``. With label
maps and a label weight ``w``, each adds ``w`` times the label overlap of the same warps.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .maps import Map, sample
from .network.wrappers import RegistrationModule

__all__ = [
    "LossTerms",
    "gaussian_blur",
    "lncc",
    "lncc_loss",
    "symmetric_similarity",
    "label_overlap_loss",
    "symmetric_label_overlap",
    "gradicon",
    "gradicon_sparse",
    "diffusion",
    "GradICONObjective",
    "DiffusionObjective",
    "make_objective",
]

#: finite-difference step of GradICON, unit frame
GRADICON_DELTA = 1e-3


class LossTerms(NamedTuple):
    """One evaluation of a training objective: ``total = similarity + λ·regularity`` (``+ w·supervision``
    when trained on label maps; ``supervision`` is None without them)."""

    total: torch.Tensor
    similarity: torch.Tensor
    regularity: torch.Tensor
    supervision: Optional[torch.Tensor] = None


def _gaussian_kernel1d(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    size = int(4 * sigma + 1)
    half = (size - 1) * 0.5
    x = torch.linspace(-half, half, steps=size)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return (pdf / pdf.sum()).to(device=device, dtype=dtype)


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable normalised Gaussian blur of a ``(B, C, *S)`` tensor, zero 'same' padding."""
    dimension = image.dim() - 2
    kernel = _gaussian_kernel1d(sigma, image.dtype, image.device)
    conv = F.conv2d if dimension == 2 else F.conv3d
    channels = image.shape[1]
    out = image
    for axis in range(dimension):
        shape = [channels, 1] + [1] * dimension
        shape[2 + axis] = kernel.numel()
        out = conv(out, kernel.reshape(1, 1, -1).expand(channels, 1, -1).reshape(shape), padding="same", groups=channels)
    return out


def lncc(image_i: torch.Tensor, image_j: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """Local normalised cross-correlation map of two ``(B, C, *S)`` images, same shape."""
    if image_i.shape != image_j.shape:
        raise ValueError(
            f"lncc(): images must have the same shape, got {tuple(image_i.shape)} and {tuple(image_j.shape)}"
        )
    # the five local means in one blur: one grouped convolution per axis instead of five
    stacked = torch.cat([image_i, image_j, image_i * image_j, image_i * image_i, image_j * image_j], dim=1)
    mean_i, mean_j, mean_ij, mean_ii, mean_jj = gaussian_blur(stacked, sigma).chunk(5, dim=1)
    covariance = mean_ij - mean_i * mean_j
    variance_i = torch.relu(mean_ii - mean_i**2) + 1e-5
    variance_j = torch.relu(mean_jj - mean_j**2) + 1e-5
    return covariance / torch.sqrt(variance_i * variance_j)


def lncc_loss(
    image_i: torch.Tensor, image_j: torch.Tensor, sigma: float = 4.0, weight: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``1 − mean(LNCC)``: 0 for locally identical images. ``weight`` (``(B, 1, *S)``, ≥ 0): the
    mean weighted by it, so that voxels of weight 0 neither help nor hurt."""
    if weight is None:
        return 1 - torch.mean(lncc(image_i, image_j, sigma))
    return 1 - torch.sum(lncc(image_i, image_j, sigma) * weight) / weight.sum().clamp_min(1.0)


def _overlap(valid: Optional[torch.Tensor], other_valid: Optional[torch.Tensor], to_other: torch.Tensor):
    """Where a voxel and the point ``to_other`` maps it to are both valid (``(B, 1, *S)``; None:
    every voxel valid). Held constant (no gradient), so that a map gains nothing by moving points
    out of the other image's field of view."""
    if valid is None and other_valid is None:
        return None
    with torch.no_grad():
        # beyond the box nothing is known (sample() pads with the border's values)
        mapped = ((to_other >= 0) & (to_other <= 1)).all(dim=1, keepdim=True).to(to_other.dtype)
        if other_valid is not None:
            mapped = mapped * sample(other_valid, to_other)
        return mapped if valid is None else mapped * valid


def label_overlap_loss(warped: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``1 − mean soft Dice`` of ``(B, C, *S)`` one-hot label maps (channel ``c``: label ``c``),
    ``warped`` already sampled through the map. The mean is over the (batch, label) pairs present
    in ``target``; ``weight`` (``(B, 1, *S)``, ≥ 0) weighs each voxel's part in both sums."""
    if weight is not None:
        warped, target = warped * weight, target * weight
    axes = tuple(range(2, target.dim()))
    target_volume = target.sum(axes)
    dice = 2 * (warped * target).sum(axes) / (warped.sum(axes) + target_volume).clamp_min(1e-6)
    present = target_volume > 0
    if not bool(present.any()):
        return target.new_zeros(())
    return 1 - dice[present].mean()


def _both_ways(loss: Callable, moving, fixed, fixed_to_moving, moving_to_fixed, moving_valid, fixed_valid) -> torch.Tensor:
    """``loss(A∘φ_AB, B, weight) + loss(B∘φ_BA, A, weight)``, each weighted by where both images are valid."""
    forward = loss(sample(moving, fixed_to_moving), fixed, _overlap(fixed_valid, moving_valid, fixed_to_moving))
    backward = loss(sample(fixed, moving_to_fixed), moving, _overlap(moving_valid, fixed_valid, moving_to_fixed))
    return forward + backward


def symmetric_similarity(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    fixed_to_moving: torch.Tensor,
    moving_to_fixed: torch.Tensor,
    sigma: float = 4.0,
    moving_valid: Optional[torch.Tensor] = None,
    fixed_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``LNCC(A∘φ_AB, B) + LNCC(B∘φ_BA, A)`` for maps given on the images' grid; with validity
    masks (:class:`carlreg.data.LabelPair`), each over the voxels valid in both images: where one
    image's content is cut off, no map can match it, and an unmasked loss rewards pulling the
    other image's edge onto the cut."""
    def loss(warped, target, weight):
        return lncc_loss(warped, target, sigma, weight)

    return _both_ways(loss, moving, fixed, fixed_to_moving, moving_to_fixed, moving_valid, fixed_valid)


def symmetric_label_overlap(
    moving_labels: torch.Tensor,
    fixed_labels: torch.Tensor,
    fixed_to_moving: torch.Tensor,
    moving_to_fixed: torch.Tensor,
    moving_valid: Optional[torch.Tensor] = None,
    fixed_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`label_overlap_loss` both ways, for ``(B, C, *S)`` one-hot label maps on the images'
    grid, masked as :func:`symmetric_similarity`."""
    return _both_ways(label_overlap_loss, moving_labels, fixed_labels, fixed_to_moving, moving_to_fixed, moving_valid,
                      fixed_valid)


def _grid_noise(identity: torch.Tensor, scale: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    # Drawn on the CPU so that a seed gives the same points on every device.
    noise = torch.randn(identity.shape, generator=generator, dtype=torch.float32)
    return noise.to(device=identity.device, dtype=identity.dtype) * scale / identity.shape[-1]


def _inverse_consistency_jacobian(phi_ab: Map, phi_ba: Map, points: torch.Tensor) -> torch.Tensor:
    """``Σ_d mean(((e(x) − e(x + δ e_d)) / δ)²)`` with ``e(x) = x − φ_AB(φ_BA(x))``."""
    error = points - phi_ab(phi_ba(points))
    dimension = points.shape[1]
    total = points.new_zeros(())
    for axis in range(dimension):
        step = points.new_zeros((1, dimension) + (1,) * dimension)
        step[:, axis] = GRADICON_DELTA
        shifted = points + step
        error_shifted = shifted - phi_ab(phi_ba(shifted))
        total = total + torch.mean(((error - error_shifted) / GRADICON_DELTA) ** 2)
    return total


def gradicon(
    phi_ab: Map, phi_ba: Map, identity: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """GradICON at every grid point jittered by ``N(0, 1) / N_last``."""
    points = identity + _grid_noise(identity, 1.0, generator)
    return _inverse_consistency_jacobian(phi_ab, phi_ba, points)


def gradicon_sparse(
    phi_ab: Map, phi_ba: Map, identity: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """GradICON at every second grid point per axis, jittered by ``2 N(0, 1) / N_last``."""
    points = identity + _grid_noise(identity, 2.0, generator)
    points = points[(slice(None), slice(None)) + (slice(None, None, 2),) * (identity.dim() - 2)]
    return _inverse_consistency_jacobian(phi_ab, phi_ba, points)


def diffusion(fixed_to_moving: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """``N0² Σ_axes mean(Δu²)``, ``u = id − φ`` on the grid, forward differences."""
    displacement = identity - fixed_to_moving
    total = displacement.new_zeros(())
    for axis in range(2, displacement.dim()):
        n = displacement.shape[axis]
        total = total + torch.mean((displacement.narrow(axis, 1, n - 1) - displacement.narrow(axis, 0, n - 1)) ** 2)
    return total * identity.shape[2] ** 2


def _supervised(terms: LossTerms, label_weight: float, supervision: Optional[torch.Tensor]) -> LossTerms:
    """``terms`` with the label overlap ``supervision`` (None: no label maps) added at ``label_weight``."""
    if supervision is None:
        return terms
    return LossTerms(terms.total + label_weight * supervision, terms.similarity, terms.regularity, supervision)


class GradICONObjective(nn.Module):
    """Phase 2: ``LNCC(A∘φ_AB, B) + LNCC(B∘φ_BA, A) + λ·GradICON`` (``sparse``: GradICONSparse),
    plus ``label_weight`` times :func:`symmetric_label_overlap` when given label maps.

    ``forward(moving, fixed)`` takes ``(B, 1, *input_shape)`` images (optionally their validity
    masks and ``(B, C, *input_shape)`` one-hot label maps) and returns :class:`LossTerms`. It
    wraps the network so that data-parallel training can wrap the whole objective.
    """

    def __init__(
        self,
        network: RegistrationModule,
        lmbda: float = 1.5,
        sigma: float = 4.0,
        sparse: bool = False,
        generator: Optional[torch.Generator] = None,
        label_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.network = network
        self.lmbda = lmbda
        self.sigma = sigma
        self.sparse = sparse
        self.generator = generator
        self.label_weight = label_weight

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, moving_valid: Optional[torch.Tensor] = None,
                fixed_valid: Optional[torch.Tensor] = None, moving_labels: Optional[torch.Tensor] = None,
                fixed_labels: Optional[torch.Tensor] = None) -> LossTerms:
        identity = self.network.identity_map
        self.network._check_inputs(moving, fixed)
        phi_ab = self.network.transform(moving, fixed)
        phi_ba = self.network.transform(fixed, moving)
        fixed_to_moving, moving_to_fixed = phi_ab.on_grid(identity), phi_ba.on_grid(identity)
        similarity = symmetric_similarity(moving, fixed, fixed_to_moving, moving_to_fixed, self.sigma, moving_valid,
                                          fixed_valid)
        regularizer = gradicon_sparse if self.sparse else gradicon
        regularity = regularizer(phi_ab, phi_ba, identity, self.generator)
        supervision = None if moving_labels is None else symmetric_label_overlap(
            moving_labels, fixed_labels, fixed_to_moving, moving_to_fixed, moving_valid, fixed_valid)
        return _supervised(LossTerms(similarity + self.lmbda * regularity, similarity, regularity), self.label_weight,
                           supervision)


class DiffusionObjective(nn.Module):
    """Phase 1 (warm-up): ``2·LNCC(A∘φ_AB, B) + λ·diffusion(φ_AB)``, one direction, plus
    ``label_weight`` times twice the label overlap of the same warp when given label maps."""

    def __init__(self, network: RegistrationModule, lmbda: float = 1.5, sigma: float = 4.0, label_weight: float = 0.0) -> None:
        super().__init__()
        self.network = network
        self.lmbda = lmbda
        self.sigma = sigma
        self.label_weight = label_weight

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, moving_valid: Optional[torch.Tensor] = None,
                fixed_valid: Optional[torch.Tensor] = None, moving_labels: Optional[torch.Tensor] = None,
                fixed_labels: Optional[torch.Tensor] = None) -> LossTerms:
        identity = self.network.identity_map
        fixed_to_moving = self.network(moving, fixed)
        weight = _overlap(fixed_valid, moving_valid, fixed_to_moving)
        similarity = 2 * lncc_loss(sample(moving, fixed_to_moving), fixed, self.sigma, weight)
        regularity = diffusion(fixed_to_moving, identity)
        supervision = None if moving_labels is None else 2 * label_overlap_loss(
            sample(moving_labels, fixed_to_moving), fixed_labels, weight)
        return _supervised(LossTerms(similarity + self.lmbda * regularity, similarity, regularity), self.label_weight,
                           supervision)


OBJECTIVES = {
    "gradicon": lambda net, lmbda, sigma, weight: GradICONObjective(net, lmbda, sigma, label_weight=weight),
    "gradicon_sparse": lambda net, lmbda, sigma, weight: GradICONObjective(net, lmbda, sigma, sparse=True,
                                                                           label_weight=weight),
    "diffusion": lambda net, lmbda, sigma, weight: DiffusionObjective(net, lmbda, sigma, weight),
}


def make_objective(
    name: str, network: RegistrationModule, lmbda: float = 1.5, sigma: float = 4.0, label_weight: float = 0.0
) -> nn.Module:
    """The objective called ``name`` (``gradicon``, ``gradicon_sparse`` or ``diffusion``) around
    ``network``; ``label_weight`` weighs the label overlap when its forward is given label maps."""
    try:
        factory: Callable = OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"make_objective(): objective must be one of {sorted(OBJECTIVES)}, got {name!r}") from None
    return factory(network, lmbda, sigma, label_weight)
