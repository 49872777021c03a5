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
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .maps import identity_map, sample

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
    return F.grid_sample(image, grid[None].to(image.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)


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
    """
    grid = output_grid(fixed) if grid is None else grid
    dimension = fixed.GetDimension()
    network_shape = list(fixed_to_moving_unit.shape[2:])
    network_xyz = network_shape[::-1]
    fixed_size, moving_size = fixed.GetSize(), moving.GetSize()
    fixed_ratios = network_ratios(fixed, network_shape, spacing_mm)
    moving_ratios = network_ratios(moving, network_shape, spacing_mm)
    grid_to_lps = _index_to_lps_matrix(grid)
    lps_to_fixed_ijk = np.linalg.inv(_index_to_lps_matrix(fixed))
    moving_ijk_to_lps = _index_to_lps_matrix(moving)
    grid_origin = np.array(grid.GetOrigin())
    fixed_origin, moving_origin = np.array(fixed.GetOrigin()), np.array(moving.GetOrigin())
    map64 = fixed_to_moving_unit.detach().to(device="cpu", dtype=torch.float64)
    # Sample the displacement, not the map: beyond the grid's outer voxel centres (half a network
    # voxel at each border) the map continues as x + u(border), not as a constant.
    displacement_unit = map64 - identity_map(network_shape, dtype=torch.float64)

    shape = grid.GetSize()[::-1]  # tensor order
    slab = max(1, SLAB_VOXELS // int(np.prod(shape[1:])))
    displacement = np.empty(tuple(shape) + (dimension,), dtype=np.float64)
    for start in range(0, shape[0], slab):
        stop = min(shape[0], start + slab)
        ranges = [np.arange(start, stop, dtype=np.float64)] + [np.arange(n, dtype=np.float64) for n in shape[1:]]
        index_tensor_order = np.meshgrid(*ranges, indexing="ij")
        grid_ijk = np.stack([a.ravel() for a in index_tensor_order[::-1]])  # (D, N) in x, y, z order
        fixed_lps = grid_to_lps @ grid_ijk + grid_origin[:, None]
        fixed_ijk = lps_to_fixed_ijk @ (fixed_lps - fixed_origin[:, None])
        unit_xyz = np.stack([index_to_unit(fixed_ijk[a], fixed_size[a], network_xyz[a], fixed_ratios[a]) for a in range(dimension)])
        coords_unit = torch.from_numpy(np.ascontiguousarray(unit_xyz[::-1]))
        coords_unit = coords_unit.view((1, dimension, -1) + (1,) * (dimension - 1))
        moving_unit = (coords_unit + sample(displacement_unit, coords_unit)).view(dimension, -1).numpy()[::-1]
        moving_ijk = np.stack([unit_to_index(moving_unit[a], moving_size[a], network_xyz[a], moving_ratios[a]) for a in range(dimension)])
        moving_lps = moving_ijk_to_lps @ moving_ijk + moving_origin[:, None]
        displacement[start:stop] = (moving_lps - fixed_lps).T.reshape((stop - start,) + tuple(shape[1:]) + (dimension,))
    field = sitk.GetImageFromArray(displacement, isVector=True)
    field.CopyInformation(grid)
    return field


def _determinant(matrices: np.ndarray) -> np.ndarray:
    """Determinants of ``(..., D, D)`` matrices: written out for D = 2 and 3 (twice as fast as
    ``np.linalg.det`` on millions of small matrices)."""
    m = matrices
    if m.shape[-1] == 2:
        return m[..., 0, 0] * m[..., 1, 1] - m[..., 0, 1] * m[..., 1, 0]
    if m.shape[-1] == 3:
        return (m[..., 0, 0] * (m[..., 1, 1] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 1])
                - m[..., 0, 1] * (m[..., 1, 0] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 0])
                + m[..., 0, 2] * (m[..., 1, 0] * m[..., 2, 1] - m[..., 1, 1] * m[..., 2, 0]))
    return np.linalg.det(m)


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
    lps_per_index = np.linalg.inv(index_to_lps).astype(np.float32)  # d(index)/d(lps)
    determinant = np.empty(vectors.shape[:-1], dtype=np.float32)
    slab = max(1, SLAB_VOXELS // int(np.prod(vectors.shape[1:-1])))
    n0 = vectors.shape[0]
    for start in range(0, n0, slab):
        stop = min(n0, start + slab)
        lo, hi = max(0, start - 1), min(n0, stop + 1)
        block = np.asarray(vectors[lo:hi], dtype=np.float32)
        # derivatives along tensor axes (z, y, x), reversed to SimpleITK index axes (x, y, z)
        du_dindex = np.stack(np.gradient(block, axis=tuple(range(dimension)))[::-1], axis=-1)
        jacobian = du_dindex @ lps_per_index + np.eye(dimension, dtype=np.float32)
        determinant[start:stop] = _determinant(jacobian)[start - lo : start - lo + (stop - start)]
    result = sitk.GetImageFromArray(determinant)
    result.CopyInformation(field)
    return result
