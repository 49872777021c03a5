"""Between images in physical space and the network's unit frame.

Each image keeps its own geometry. The network grid of an image is centred on the image's
centre along its own axes, with ``r`` image voxels per network voxel: network voxel ``j`` of an
axis sits at continuous image index ``i = (j − (n − 1)/2) · r + (N − 1)/2`` (``N`` image voxels,
``n`` network voxels) and at unit coordinate ``j / (n − 1)``.

- Whole-array resize (the reference's way, for models without a physical input spacing):
  ``r = N / n``, i.e. ``i = (j + 0.5) · N / n − 0.5``, linear with ``align_corners=False``.
- Fixed spacing (models trained at a physical spacing ``s``): ``r = s / image spacing``; the
  image is sampled there (linear, zero beyond its field of view), so scans with different
  fields of view differ by a translation, to which CARL is equivariant, not by a scale.

A map ``fixed_to_moving`` (unit frame, on the fixed image's network grid) becomes a dense
displacement field on the fixed image's own grid (or a coarser grid over the same extent):
fixed physical point → fixed continuous index → fixed unit coordinate → map → moving unit
coordinate → moving continuous index → moving physical point; the field is the difference,
in LPS millimetres, and the transform maps fixed points to moving points (ITK's resampling
transform, Slicer's "from parent").

Frames are named in the variables: ``_ijk`` continuous voxel index in SimpleITK (x, y, z)
order, ``_unit`` the network frame in tensor (z, y, x) order, ``_lps`` physical millimetres.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .maps import grid_sample, identity_map, sample

__all__ = [
    "CANONICAL_ORIENTATION",
    "canonical_orientation",
    "network_ratios",
    "covering_box",
    "to_network",
    "index_to_unit",
    "unit_to_index",
    "output_grid",
    "covering_grid",
    "map_to_displacement_field",
    "jacobian_determinant",
]

#: voxels of the output grid processed at once (bounds the temporary memory)
SLAB_VOXELS = 4_000_000


#: orientation of the arrays the networks see (training reorients its data the same way)
CANONICAL_ORIENTATION = "RAS"


def canonical_orientation(image: sitk.Image) -> sitk.Image:
    """The same image with its voxel axes permuted and flipped to the closest RAS orientation.

    Exact (no interpolation) and physically identical; 2-D images are returned unchanged.
    Without this, two scans stored with different axis orders or flips would look rotated or
    mirrored to the network, which is equivariant to translations only.
    """
    if image.GetDimension() != 3:
        return image
    return sitk.DICOMOrient(image, CANONICAL_ORIENTATION)


def network_ratios(image: sitk.Image, shape: Sequence[int], spacing_mm: Optional[float] = None) -> Tuple[float, ...]:
    """Image voxels per network voxel along each image axis (SimpleITK x, y, z order):
    ``N / n`` (whole-array resize) or ``spacing_mm / image spacing`` (fixed spacing)."""
    sizes, network_xyz = image.GetSize(), list(shape)[::-1]
    if spacing_mm is None:
        return tuple(n_image / n for n_image, n in zip(sizes, network_xyz))
    return tuple(spacing_mm / s for s in image.GetSpacing())


#: a box grown to cover the images is a multiple of this many voxels per axis (the U-Nets halve it 3 times)
BOX_MULTIPLE = 8


def covering_box(images: Sequence[sitk.Image], spacing_mm: float, minimum: Sequence[int], maximum: Sequence[int]) -> Tuple[int, ...]:
    """The network box (tensor order) at ``spacing_mm`` that holds each image's whole field of view.

    Each image's grid is centred on the image (:func:`to_network`), so an axis of ``n`` voxels
    covers an image of extent ``e`` when ``(n − 1) · spacing ≥ e``; ``n`` is then rounded up to a
    multiple of :data:`BOX_MULTIPLE` and kept within ``[minimum, maximum]`` (beyond ``maximum``
    the image's outer parts are cut, as with a fixed box). Images are in the network's
    orientation (:func:`canonical_orientation`): their axes are the box's.
    """
    extents = np.max([[(n - 1) * s for n, s in zip(image.GetSize(), image.GetSpacing())] for image in images], axis=0)
    needed = [int(math.ceil(e / spacing_mm - 1e-6)) + 1 for e in extents[::-1]]
    rounded = [BOX_MULTIPLE * int(math.ceil(n / BOX_MULTIPLE)) for n in needed]
    return tuple(int(min(max(n, lo), hi)) for n, lo, hi in zip(rounded, minimum, maximum))


def to_network(image: torch.Tensor, shape: Sequence[int], ratios: Optional[Sequence[float]] = None) -> torch.Tensor:
    """``(1, 1, *S)`` image array (tensor order) on the ``(1, 1, *shape)`` network grid.

    ``ratios``: image voxels per network voxel (x, y, z order, :func:`network_ratios`); None is
    the whole-array resize (``F.interpolate``, linear, ``align_corners=False``). Otherwise the
    image is sampled linearly at the grid's points, zero beyond its field of view.
    """
    sizes = list(image.shape[2:])
    if ratios is None or all(abs(r - n_image / n) < 1e-12 for r, n_image, n in zip(ratios[::-1], sizes, shape)):
        mode = "bilinear" if len(shape) == 2 else "trilinear"
        return F.interpolate(image, size=list(shape), mode=mode, align_corners=False)
    axes = []
    for n_image, n, r in zip(sizes, shape, list(ratios)[::-1]):
        index = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * r + (n_image - 1) / 2
        axes.append(index / max(n_image - 1, 1) * 2 - 1)
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], dim=-1)  # grid_sample wants x, y, z last
    return grid_sample(image, grid[None].to(image.dtype), padding_mode="zeros")


def index_to_unit(index: np.ndarray, image_size: int, network_size: int, ratio: Optional[float] = None) -> np.ndarray:
    """Continuous image index along one axis → unit coordinate on the network grid
    (``ratio``: image voxels per network voxel; default ``image_size / network_size``)."""
    ratio = image_size / network_size if ratio is None else ratio
    return ((index - (image_size - 1) / 2) / ratio + (network_size - 1) / 2) / (network_size - 1)


def unit_to_index(unit: np.ndarray, image_size: int, network_size: int, ratio: Optional[float] = None) -> np.ndarray:
    """Unit coordinate on the network grid → continuous image index along one axis."""
    ratio = image_size / network_size if ratio is None else ratio
    return (unit * (network_size - 1) - (network_size - 1) / 2) * ratio + (image_size - 1) / 2


def _index_to_lps_matrix(image: sitk.Image) -> np.ndarray:
    dimension = image.GetDimension()
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(dimension, dimension)
    return direction @ np.diag(image.GetSpacing())


def output_grid(fixed: sitk.Image, spacing_mm: Optional[float] = None) -> sitk.Image:
    """The grid of the displacement field: the fixed image's own, or a coarser one over its extent.

    ``spacing_mm`` (isotropic) must not be finer than the fixed image's spacing.
    """
    reference = sitk.Image(fixed.GetSize(), sitk.sitkUInt8)
    reference.CopyInformation(fixed)
    if spacing_mm is None:
        return reference
    if spacing_mm < min(fixed.GetSpacing()) - 1e-9:
        raise ValueError(
            f"output_grid(): field spacing must be ≥ the fixed image's spacing {fixed.GetSpacing()}, got {spacing_mm}"
        )
    extent = [(n - 1) * s for n, s in zip(fixed.GetSize(), fixed.GetSpacing())]
    size = [max(2, int(math.floor(e / spacing_mm)) + 1) for e in extent]
    coarse = sitk.Image(size, sitk.sitkUInt8)
    coarse.SetOrigin(fixed.GetOrigin())
    coarse.SetDirection(fixed.GetDirection())
    coarse.SetSpacing([spacing_mm] * fixed.GetDimension())
    return coarse


def foreground_mask(image: sitk.Image, grid: sitk.Image) -> sitk.Image:
    """``image``'s foreground (Otsu threshold: 1 inside, 0 outside) on ``grid``'s voxels
    (nearest neighbour; 0 beyond ``image``), a UInt8 image with ``grid``'s geometry."""
    return sitk.Resample(sitk.OtsuThreshold(image, 0, 1), grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                         sitk.sitkUInt8)


def covering_grid(grid: sitk.Image, other: sitk.Image) -> Tuple[sitk.Image, Tuple[slice, ...]]:
    """``grid`` grown, on its own lattice (same spacing and direction, whole steps), until it also
    covers ``other``'s extent (its voxel centres' bounding box, in physical space).

    Returns:
        the grown grid, and the slices (tensor order) of the grown grid's array where ``grid``'s
        own voxels are.
    """
    dimension = grid.GetDimension()
    corners_ijk = np.array(np.meshgrid(*[[0, n - 1] for n in other.GetSize()], indexing="ij")).reshape(dimension, -1)
    corners_lps = _index_to_lps_matrix(other) @ corners_ijk + np.array(other.GetOrigin())[:, None]
    in_grid = np.linalg.inv(_index_to_lps_matrix(grid)) @ (corners_lps - np.array(grid.GetOrigin())[:, None])
    low = np.minimum(0, np.floor(in_grid.min(axis=1) + 1e-6)).astype(int)
    high = np.maximum(np.array(grid.GetSize()) - 1, np.ceil(in_grid.max(axis=1) - 1e-6)).astype(int)
    grown = sitk.Image([int(n) for n in high - low + 1], sitk.sitkUInt8)
    grown.SetSpacing(grid.GetSpacing())
    grown.SetDirection(grid.GetDirection())
    grown.SetOrigin((np.array(grid.GetOrigin()) + _index_to_lps_matrix(grid) @ low).tolist())
    own = tuple(slice(-lo, -lo + n) for lo, n in zip(low, grid.GetSize()))[::-1]
    return grown, own


def _affine(function: Callable[[np.float64], np.float64]) -> Tuple[float, float]:
    """``(scale, offset)`` of an affine function of one coordinate, from its values at 0 and 1."""
    at_zero = float(function(np.float64(0.0)))
    return float(function(np.float64(1.0))) - at_zero, at_zero


def _unit_frames(
    fixed: sitk.Image, moving: sitk.Image, grid: sitk.Image, network_shape: Sequence[int], spacing_mm: Optional[float]
) -> Tuple[Tuple[np.ndarray, np.ndarray], ...]:
    """The field's affine parts, in SimpleITK (x, y, z) order: grid index → fixed unit coordinate
    ``(U, u0)``, moving unit coordinate → moving LPS ``(M, m0)``, grid index → fixed LPS ``(G, g0)``."""
    dimension = fixed.GetDimension()
    network_xyz = list(network_shape)[::-1]
    fixed_ratios = network_ratios(fixed, network_shape, spacing_mm)
    moving_ratios = network_ratios(moving, network_shape, spacing_mm)
    to_unit = [_affine(lambda i, a=a: index_to_unit(i, fixed.GetSize()[a], network_xyz[a], fixed_ratios[a]))
               for a in range(dimension)]
    to_index = [_affine(lambda u, a=a: unit_to_index(u, moving.GetSize()[a], network_xyz[a], moving_ratios[a]))
                for a in range(dimension)]
    grid_to_lps, grid_origin = _index_to_lps_matrix(grid), np.array(grid.GetOrigin())
    lps_to_fixed_ijk = np.linalg.inv(_index_to_lps_matrix(fixed))
    unit_scale = np.diag([scale for scale, _ in to_unit])
    U = unit_scale @ lps_to_fixed_ijk @ grid_to_lps
    u0 = unit_scale @ lps_to_fixed_ijk @ (grid_origin - np.array(fixed.GetOrigin())) + [offset for _, offset in to_unit]
    moving_ijk_to_lps = _index_to_lps_matrix(moving)
    M = moving_ijk_to_lps @ np.diag([scale for scale, _ in to_index])
    m0 = moving_ijk_to_lps @ [offset for _, offset in to_index] + np.array(moving.GetOrigin())
    return (U, u0), (M, m0), (grid_to_lps, grid_origin)


def _affine_on_slab(matrix: np.ndarray, offset: np.ndarray, axes: Sequence[torch.Tensor]) -> torch.Tensor:
    """``matrix · ijk + offset`` over the slab whose index ``axes`` (x, y, z order, 1-D float64
    tensors) are given: a ``(*slab shape in tensor order, D)`` tensor, built by broadcasting."""
    dimension = len(axes)
    matrix, offset = torch.tensor(np.array(matrix)), torch.tensor(np.array(offset))
    result = offset.view((1,) * dimension + (dimension,))
    for a, values in enumerate(axes):
        shape = [1] * dimension + [1]
        shape[dimension - 1 - a] = -1  # SimpleITK axis a is tensor axis D − 1 − a
        result = result + values.view(shape) * matrix[:, a]
    return result


def map_to_displacement_field(
    fixed_to_moving_unit: torch.Tensor,
    fixed: sitk.Image,
    moving: sitk.Image,
    grid: Optional[sitk.Image] = None,
    spacing_mm: Optional[float] = None,
) -> sitk.Image:
    """The physical displacement field of a network map, on ``grid`` (default: the fixed image's grid).

    Args:
        fixed_to_moving_unit: ``(1, D, *n)`` map on the fixed image's network grid, unit frame.
        fixed, moving: the images the network inputs were made from (their geometry is used).
        grid: output grid (see :func:`output_grid`), in the fixed image's physical space.
        spacing_mm: the network's physical input spacing, or None for whole-array resizing
            (:func:`network_ratios`).
    Returns:
        vector float64 image on ``grid``: ``moving point − fixed point``, LPS mm.

    Every step but the map is affine: with ``x`` a grid index, the fixed unit coordinate is
    ``U x + u0``, and the field is ``M (U x + u0 + d(U x + u0)) + m0 − (G x + g0)`` for the
    map's displacement ``d`` (:func:`_unit_frames`): ``M d`` plus an affine function of ``x``.
    """
    grid = output_grid(fixed) if grid is None else grid
    dimension = fixed.GetDimension()
    network_shape = list(fixed_to_moving_unit.shape[2:])
    (U, u0), (M, m0), (G, g0) = _unit_frames(fixed, moving, grid, network_shape, spacing_mm)
    map64 = fixed_to_moving_unit.detach().to(device="cpu", dtype=torch.float64)
    # Sample the displacement, not the map: beyond the grid's outer voxel centres (half a network
    # voxel at each border) the map continues as x + u(border), not as a constant.
    displacement_unit = map64 - identity_map(network_shape, dtype=torch.float64)
    # the map's displacement sampled in tensor order goes to LPS through M with its columns reversed
    sampled_to_lps = torch.as_tensor(np.ascontiguousarray(M[:, ::-1].T), dtype=torch.float64)

    shape = grid.GetSize()[::-1]  # tensor order
    slab = max(1, SLAB_VOXELS // int(np.prod(shape[1:])))
    displacement = np.empty(tuple(shape) + (dimension,), dtype=np.float64)
    whole_axes = [torch.arange(n, dtype=torch.float64) for n in grid.GetSize()[: dimension - 1]]
    for start in range(0, shape[0], slab):
        stop = min(shape[0], start + slab)
        axes = whole_axes + [torch.arange(start, stop, dtype=torch.float64)]
        coords_unit = _affine_on_slab(U[::-1], u0[::-1], axes).movedim(-1, 0)[None]  # (1, D, *slab), tensor order
        sampled = sample(displacement_unit, coords_unit)[0].movedim(0, -1)
        field = sampled @ sampled_to_lps + _affine_on_slab(M @ U - G, M @ u0 + m0 - g0, axes)
        displacement[start:stop] = field.numpy()
    field = sitk.GetImageFromArray(displacement, isVector=True)
    field.CopyInformation(grid)
    return field


def _determinant(matrices: torch.Tensor) -> torch.Tensor:
    """Determinants of ``(..., D, D)`` matrices: written out for D = 2 and 3 (twice as fast as
    ``torch.linalg.det`` on millions of small matrices)."""
    m = matrices
    if m.shape[-1] == 2:
        return m[..., 0, 0] * m[..., 1, 1] - m[..., 0, 1] * m[..., 1, 0]
    if m.shape[-1] == 3:
        return (m[..., 0, 0] * (m[..., 1, 1] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 1])
                - m[..., 0, 1] * (m[..., 1, 0] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 0])
                + m[..., 0, 2] * (m[..., 1, 0] * m[..., 2, 1] - m[..., 1, 1] * m[..., 2, 0]))
    return torch.linalg.det(m)


def jacobian_determinant(field: sitk.Image) -> sitk.Image:
    """det(∂φ/∂x) of ``x ↦ x + u(x)`` in physical space, on the field's grid (float32 image).

    Central differences along the index axes (one-sided at the border), mapped to physical
    axes through the grid's spacing and direction, in float32. Values ≤ 0 mark folding.
    """
    dimension = field.GetDimension()
    if min(field.GetSize()) < 2:
        raise ValueError(f"jacobian_determinant(): the field needs ≥ 2 voxels per axis, got {field.GetSize()}")
    vectors = sitk.GetArrayViewFromImage(field)  # (z, y, x, D): tensor order, LPS vector components
    index_to_lps = _index_to_lps_matrix(field)
    lps_per_index = torch.from_numpy(np.linalg.inv(index_to_lps).astype(np.float32))  # d(index)/d(lps)
    identity = torch.eye(dimension, dtype=torch.float32)
    determinant = np.empty(vectors.shape[:-1], dtype=np.float32)
    slab = max(1, SLAB_VOXELS // int(np.prod(vectors.shape[1:-1])))
    n0 = vectors.shape[0]
    for start in range(0, n0, slab):
        stop = min(n0, start + slab)
        lo, hi = max(0, start - 1), min(n0, stop + 1)
        block = torch.from_numpy(np.asarray(vectors[lo:hi], dtype=np.float32))
        # derivatives along tensor axes (z, y, x), reversed to SimpleITK index axes (x, y, z)
        du_dindex = torch.stack(torch.gradient(block, dim=tuple(range(dimension)))[::-1], dim=-1)
        jacobian = du_dindex @ lps_per_index + identity
        determinant[start:stop] = _determinant(jacobian)[start - lo : start - lo + (stop - start)].numpy()
    result = sitk.GetImageFromArray(determinant)
    result.CopyInformation(field)
    return result
