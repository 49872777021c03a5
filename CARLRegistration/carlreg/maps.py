"""Maps in the unit frame: identity grids, sampling, warping and composing.

Conventions (ICON's, which the reference CARL implementation uses):

- Tensors are ``(B, C, *spatial)``; spatial axes are in tensor order (for a
  3-D image read through SimpleITK: z, y, x).
- A *map* is a ``(B, D, *spatial)`` tensor of coordinates in the *unit frame*:
  channel ``k`` is the coordinate along tensor axis ``k`` and voxel ``i`` sits
  at ``i / (N_k - 1)``, so every grid spans ``[0, 1]`` whatever its resolution.
- Sampling is (bi/tri)linear with ``align_corners=True`` and border
  (replicate) padding.
- A registration of moving image A to fixed image B yields ``phi_AB``, the
  fixed → moving map: ``A ∘ phi_AB ≈ B``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .device import cpu_fold, fold_rows, unfold_rows

__all__ = [
    "identity_map",
    "grid_sample",
    "sample",
    "Map",
    "DisplacementMap",
    "ComposedMap",
]


def identity_map(
    shape: Sequence[int],
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The identity map of a grid.

    Args:
        shape: spatial shape in tensor order, 2 or 3 axes.
    Returns:
        ``(1, D, *shape)`` map, unit frame: channel ``k`` holds ``i_k / (N_k - 1)``.
    """
    shape = [int(n) for n in shape]
    if len(shape) not in (2, 3) or min(shape) < 2:
        raise ValueError(
            f"identity_map(): expected 2 or 3 spatial axes of at least 2 voxels, got {shape}"
        )
    axes = [
        torch.arange(n, dtype=torch.float64, device=device) / (n - 1) for n in shape
    ]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(grids).unsqueeze(0).to(dtype)


def grid_sample(values: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border") -> torch.Tensor:
    """``F.grid_sample`` with ``align_corners=True``, on every CPU thread for a single image:
    the grid's points folded into :func:`carlreg.device.cpu_fold` batch entries over the same
    (expanded, not copied) input. Same values as without.

    Args:
        values: ``(B, C, *S)``.
        grid: ``(B, *T, D)``: grid_sample's frame, ``[-1, 1]`` along x, y(, z): the reverse of
            tensor-axis order.
    Returns:
        ``(B, C, *T)``.
    """
    fold = cpu_fold(values, max(values.shape[0], grid.shape[0]))
    if fold == 1:
        return F.grid_sample(values, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    targets, channels = grid.shape[1:-1], values.shape[1]
    points = grid.reshape(-1, grid.shape[-1])
    folded_points = fold_rows(points, fold)
    folded_grid = folded_points.reshape(fold, *[1] * (len(targets) - 1), *folded_points.shape[1:])
    folded = F.grid_sample(values.expand(fold, *values.shape[1:]), folded_grid, mode=mode,
                           padding_mode=padding_mode, align_corners=True)
    rows = unfold_rows(folded.reshape(fold, channels, -1).transpose(1, 2), points.shape[0])
    return rows.transpose(0, 1).reshape(1, channels, *targets)


def sample(values: torch.Tensor, coords_unit: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Values of an image or field at coordinates.

    Args:
        values: ``(B, C, *S)`` image or vector field on a grid of shape ``S``.
        coords_unit: ``(B or 1, D, *T)`` coordinates in ``values``' unit frame,
            channel ``k`` along tensor axis ``k``.
        mode: ``"bilinear"`` (linear in 2-D and 3-D) or ``"nearest"`` (label maps).
    Returns:
        ``(B, C, *T)``: interpolated with ``align_corners=True`` and border padding.
    """
    dimension = values.dim() - 2
    if coords_unit.shape[1] != dimension or coords_unit.dim() != values.dim():
        raise ValueError(
            "sample(): coordinates must be (B, D, *T) with D equal to the "
            f"{dimension} spatial axes of values {tuple(values.shape)}, "
            f"got {tuple(coords_unit.shape)}"
        )
    # grid_sample wants (x, y, z) = reversed tensor-axis order, in [-1, 1], channels last.
    grid = (coords_unit * 2.0 - 1.0).flip(1).movedim(1, -1)
    if grid.shape[0] == 1 and values.shape[0] != 1:
        grid = grid.expand(values.shape[0], *grid.shape[1:])
    # Coordinates need float32 at least: in bfloat16 a coordinate near 1 is off by up to 1/256.
    dtype = torch.promote_types(torch.promote_types(values.dtype, grid.dtype), torch.float32)
    with torch.autocast(values.device.type, enabled=False):
        return grid_sample(values.to(dtype), grid.to(dtype), mode=mode)


class Map:
    """A spatial map in the unit frame.

    Calling it on ``(B, D, *T)`` coordinates returns the mapped ``(B, D, *T)``
    coordinates. For a registration result the direction is fixed → moving.
    """

    def __call__(self, coords_unit: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def on_grid(self, identity: torch.Tensor) -> torch.Tensor:
        """The map evaluated on an identity grid ``identity`` (see ``identity_map``).

        Equal to ``self(identity)``; subclasses skip interpolation where the
        map is stored on that very grid.
        """
        return self(identity)


class DisplacementMap(Map):
    """``x ↦ x + u(x)`` with ``u`` a displacement field sampled linearly.

    Args:
        displacement: ``(B, D, *S)`` displacement, unit frame, on the identity grid of shape ``S``.
    """

    def __init__(self, displacement: torch.Tensor) -> None:
        self.displacement = displacement

    def __call__(self, coords_unit: torch.Tensor) -> torch.Tensor:
        return coords_unit + sample(self.displacement, coords_unit)

    def on_grid(self, identity: torch.Tensor) -> torch.Tensor:
        if identity.shape[2:] == self.displacement.shape[2:]:
            return identity + self.displacement
        return self(identity)


class ComposedMap(Map):
    """``outer ∘ inner``: ``x ↦ outer(inner(x))``."""

    def __init__(self, outer: Map, inner: Map) -> None:
        self.outer = outer
        self.inner = inner

    def __call__(self, coords_unit: torch.Tensor) -> torch.Tensor:
        return self.outer(self.inner(coords_unit))

    def on_grid(self, identity: torch.Tensor) -> torch.Tensor:
        return self.outer(self.inner.on_grid(identity))
