"""Splitting a dense transform into its affine part and a residual field (``--out-affine``).

For a fixed → moving displacement field ``u`` on the fixed grid (LPS mm: moving point
``φ(x) = x + u(x)``), the affine map ``A(x) = M x + t`` closest to ``φ`` in least squares over the
grid's points, and the residual ``r`` with ``φ(x) = A(x + r(x))`` at every grid point, so that
``r = M⁻¹ (φ(x) − A(x))``. uniCARL's authors offer the same split (their affine decomposition);
this one works in physical space on any model's field.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import SimpleITK as sitk

from .geometry import _index_to_lps_matrix

__all__ = ["affine_part", "decompose"]


def _points_lps(grid: sitk.Image) -> np.ndarray:
    """``(N, D)`` LPS points of ``grid``'s voxels, array order (x fastest)."""
    axes = [np.arange(n, dtype=np.float64) for n in grid.GetSize()[::-1]]
    index_xyz = np.stack(np.meshgrid(*axes, indexing="ij")[::-1], axis=-1).reshape(-1, grid.GetDimension())
    return index_xyz @ _index_to_lps_matrix(grid).T + np.array(grid.GetOrigin())


def _mapped_points(field: sitk.Image) -> Tuple[np.ndarray, np.ndarray]:
    """``x`` and ``x + u(x)`` at the field's grid points, ``(N, D)`` each, LPS mm."""
    points = _points_lps(field)
    return points, points + sitk.GetArrayViewFromImage(field).reshape(-1, field.GetDimension())


def _fit(points: np.ndarray, mapped: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    centre = points.mean(axis=0)  # centring keeps the normal equations well conditioned
    design = np.c_[points - centre, np.ones(len(points))]
    solution, *_ = np.linalg.lstsq(design, mapped, rcond=None)
    matrix = solution[:-1].T
    return matrix, solution[-1] - matrix @ centre


def affine_part(field: sitk.Image) -> Tuple[np.ndarray, np.ndarray]:
    """``(M, t)``, ``D × D`` and ``D``: the least-squares affine map of ``x ↦ x + u(x)`` over the
    field's grid points (LPS mm, fixed → moving)."""
    return _fit(*_mapped_points(field))


def decompose(field: sitk.Image) -> sitk.CompositeTransform:
    """``A ∘ (id + r)`` as one ITK composite transform (the affine first in the list, applied last):
    the affine part of ``field`` and the residual displacement field on the same grid.

    Args:
        field: fixed → moving displacement field, vector float64 image, LPS mm.
    Returns:
        the composite transform; it maps every grid point where ``field`` does.
    """
    points, mapped = _mapped_points(field)
    matrix, translation = _fit(points, mapped)
    residual = (mapped - points @ matrix.T - translation) @ np.linalg.inv(matrix).T
    residual_image = sitk.GetImageFromArray(residual.reshape(sitk.GetArrayViewFromImage(field).shape), isVector=True)
    residual_image.CopyInformation(field)
    affine = sitk.AffineTransform(field.GetDimension())
    affine.SetMatrix(matrix.ravel().tolist())
    affine.SetTranslation(translation.tolist())
    return sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(residual_image)])
