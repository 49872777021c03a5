"""Stationary velocity fields on a regular grid, as tensors.

A field on a grid of shape ``S`` is a ``(1, D, *S)`` tensor in tensor axis order (z, y, x in 3-D):
channel ``k`` is the displacement along tensor axis ``k`` in mm (the grid's index axis times its
spacing). The grid spans ``extent_mm[k] = (S[k] − 1) · spacing[k]`` along axis ``k``, so a field
keeps its values (mm) when it is resampled onto a finer or coarser grid of the same extent. A
displacement ``u`` sends the grid point ``x`` to ``x + u(x)`` (fixed → moving: an image is
sampled there).

``exp(v)``, the displacement of the flow of ``v`` after unit time, is computed by scaling and
squaring; ``exp(−v)`` is its inverse up to interpolation error, and a smooth ``v`` cannot fold.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .maps import grid_sample

__all__ = ["GridSampler", "smoothness"]


class GridSampler:
    """Sampling at displaced points of one grid (``shape``, ``extent_mm`` in tensor axis order)."""

    def __init__(self, shape: Sequence[int], extent_mm: Sequence[float], device: torch.device) -> None:
        self.shape = tuple(int(n) for n in shape)
        if len(self.shape) != len(extent_mm) or any(n < 2 for n in self.shape):
            raise ValueError(f"GridSampler(): expected ≥ 2 points per axis and one extent per axis, got {shape}, {extent_mm}")
        axes = [torch.linspace(-1.0, 1.0, n, device=device) for n in self.shape]
        # grid_sample takes its coordinates last and in x, y, z order: the reverse of tensor axes
        self.identity = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], dim=-1).unsqueeze(0)
        self.mm_to_unit = torch.tensor([2.0 / e for e in extent_mm], device=device).flip(0)

    def sample(self, image: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
        """``image`` ``(1, C, *S)`` at ``x + displacement(x)`` (linear; beyond the grid, its border)."""
        offset = displacement.movedim(1, -1).flip(-1) * self.mm_to_unit
        return grid_sample(image, self.identity + offset)

    def exponential(self, velocity: torch.Tensor, squarings: int = 6) -> torch.Tensor:
        """``exp(velocity)``: the displacement after unit time, by ``squarings`` squarings."""
        displacement = velocity / (2**squarings)
        for _ in range(squarings):
            displacement = displacement + self.sample(displacement, displacement)
        return displacement


def smoothness(velocity: torch.Tensor, spacing_mm: Sequence[float]) -> torch.Tensor:
    """Σ over axes of the mean squared forward difference quotient of ``velocity`` (mm/mm):
    the diffusion regulariser, independent of the grid's resolution."""
    total = velocity.new_zeros(())
    for axis, spacing in enumerate(spacing_mm):
        difference = torch.diff(velocity, dim=2 + axis) / spacing
        total = total + difference.pow(2).mean()
    return total
