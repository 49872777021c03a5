"""Fine registration at the image's own resolution, on top of any fixed → moving map.

The map to refine, ``φ`` (the network's, uniCARL's, a user's transform), maps fixed points to
moving points. The refinement is a stationary velocity field ``v`` on a grid over the fixed
region (LPS geometry of that region, spacing ``spacing_mm``); the refined map is
``Φ = φ ∘ exp(v)``: ``x ↦ φ(x + u(x))`` with ``u = exp(v)``, so that its inverse is
``exp(−v) ∘ φ⁻¹``.

``v`` is found coarse to fine (each coarser level doubles the spacing; ``v`` is carried up by
linear interpolation) by Adam on ``1 − mean LNCC(fixed, moving ∘ φ ∘ exp(v)) + λ · smoothness(v)``
(:mod:`carlreg.svf`; LNCC with a Gaussian window of ``sigma_mm``). The images are smoothed
(σ = half the finest spacing) and resampled onto the finest grid once, the moving one through
``φ``, then halved in resolution level by level, so that an iteration interpolates only on the
grid. The velocity lives on a grid ``velocity_coarsening`` times coarser than its level's.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .geometry import foreground_mask
from .losses import gaussian_blur, lncc
from .maps import grid_sample
from .progress import CancelCheck, ProgressCallback, StageReporter
from .svf import GridSampler, smoothness

__all__ = ["RefineSettings", "Refinement", "refine", "smoothed_start", "compose"]

STAGE = "refinement"
#: margin around the fixed image's foreground where the refinement is computed; beyond it the
#: refinement's displacement continues its border's (see :func:`compose`)
FOREGROUND_MARGIN_MM = 10.0


@dataclass(frozen=True)
class RefineSettings:
    """How :func:`refine` works.

    - ``spacing_mm``: the finest level's grid spacing, where the similarity is computed.
    - ``velocity_coarsening``: the velocity's grid is this many times coarser than the level's
      (its exponential, the costly part of an iteration, then costs ``coarsening³`` times less;
      the displacement is interpolated linearly onto the level's grid).
    - ``levels``: levels of the pyramid (spacing × 2 each level up).
    - ``iterations``: Adam steps per level, coarsest first (one number: the same on every level).
    - ``sigma_mm``: σ of LNCC's Gaussian window.
    - ``regularization``: λ, the weight of the smoothness of ``v``.
    - ``step_voxels``: Adam's learning rate in voxels of each level.
    - ``squarings``: scaling-and-squaring steps of ``exp``.
    - ``start_sigma_mm``: σ of the Gaussian that smooths the map's displacement before the
      refinement starts from it (:func:`smoothed_start`; 0: as it is).
    """

    spacing_mm: float = 2.0
    velocity_coarsening: int = 2
    levels: int = 3
    iterations: Tuple[int, ...] = (40, 30, 20)
    sigma_mm: float = 3.0
    regularization: float = 1.0
    step_voxels: float = 0.25
    squarings: int = 6
    start_sigma_mm: float = 12.0

    def per_level(self) -> List[int]:
        """The iterations of each level, coarsest first."""
        counts = list(self.iterations) if len(self.iterations) > 1 else list(self.iterations) * self.levels
        if len(counts) != self.levels or any(n < 0 for n in counts):
            raise ValueError(
                f"RefineSettings: expected one iteration count per level ({self.levels}) or one for all, got {self.iterations}"
            )
        return counts

    def check(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        if not self.spacing_mm > 0 or self.levels < 1 or not self.sigma_mm > 0:
            raise ValueError(
                f"RefineSettings: spacing_mm and sigma_mm must be positive and levels ≥ 1, got "
                f"{self.spacing_mm}, {self.sigma_mm}, {self.levels}"
            )
        if self.velocity_coarsening < 1:
            raise ValueError(f"RefineSettings: velocity_coarsening must be ≥ 1, got {self.velocity_coarsening}")
        if self.regularization < 0 or not self.step_voxels > 0 or self.squarings < 0 or self.start_sigma_mm < 0:
            raise ValueError(
                f"RefineSettings: regularization ≥ 0, step_voxels > 0, squarings ≥ 0 and start_sigma_mm ≥ 0 expected, "
                f"got {self.regularization}, {self.step_voxels}, {self.squarings}, {self.start_sigma_mm}"
            )
        self.per_level()


@dataclass
class Refinement:
    """The result of :func:`refine`: ``velocity`` ``(1, D, *S)`` (mm, tensor axis order, CPU) on
    ``grid`` (an image giving the finest level's LPS geometry), and the seconds it took."""

    grid: sitk.Image
    velocity: torch.Tensor
    squarings: int
    seconds: float

    def displacement_field(self, inverse: bool = False, grid: Optional[sitk.Image] = None) -> sitk.Image:
        """``exp(v)`` (or ``exp(−v)`` with ``inverse``): an LPS mm displacement field on the
        velocity's grid, or resampled (linearly; border values beyond) onto ``grid``."""
        sampler = GridSampler(self.velocity.shape[2:], _extent_mm(self.grid), self.velocity.device)
        with torch.no_grad():
            displacement = sampler.exponential(-self.velocity if inverse else self.velocity, self.squarings)
        field = _to_field_image(displacement, self.grid)
        if grid is None:
            return field
        return _vector_image(_sample_field(field, grid), grid)


def _extent_mm(grid: sitk.Image) -> List[float]:
    """The extent of ``grid`` between its first and last voxel centres, tensor axis order."""
    return [(n - 1) * s for n, s in zip(grid.GetSize(), grid.GetSpacing())][::-1]


def _direction(grid: sitk.Image) -> np.ndarray:
    dimension = grid.GetDimension()
    return np.array(grid.GetDirection(), dtype=np.float64).reshape(dimension, dimension)


def _to_field_image(displacement: torch.Tensor, grid: sitk.Image) -> sitk.Image:
    """A ``(1, D, *S)`` displacement (mm along tensor axes) as an LPS displacement field on ``grid``."""
    along_index = displacement[0].detach().cpu().double().numpy()[::-1]  # x, y, z index axes first
    return _vector_image(np.moveaxis(np.tensordot(_direction(grid), along_index, axes=1), 0, -1), grid)


def smoothed_start(field: sitk.Image, sigma_mm: float) -> sitk.Image:
    """``field`` (an LPS mm displacement field) smoothed by a Gaussian of ``sigma_mm`` per
    component (0: unchanged), as float64: the map a refinement starts from. A network's map on
    its 3 mm grid errs at that scale in ways the refinement's smooth velocity does not undo; its
    large scale (the capture of an offset, the head's shape) survives the smoothing, and the
    refinement adds the detail (the real MR landmarks of bench/landmarks.py: README)."""
    if sigma_mm == 0:
        return field
    return sitk.Cast(sitk.SmoothingRecursiveGaussian(field, sigma_mm), sitk.sitkVectorFloat64)


def refinement_grid(region: sitk.Image, spacing_mm: float) -> sitk.Image:
    """A grid with ``region``'s origin, direction and extent (first and last voxel centres on
    ``region``'s), its spacing ``spacing_mm`` or just under it along each axis."""
    extent = [(n - 1) * s for n, s in zip(region.GetSize(), region.GetSpacing())]
    size = [max(2, int(math.ceil(e / spacing_mm - 1e-6)) + 1) for e in extent]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetOrigin(region.GetOrigin())
    grid.SetDirection(region.GetDirection())
    grid.SetSpacing([e / (n - 1) if e > 0 else spacing_mm for e, n in zip(extent, size)])
    return grid


def _on_grid(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform, device: torch.device) -> torch.Tensor:
    """``image`` smoothed (σ = half the grid's spacing), resampled through ``transform`` onto
    ``grid`` (linear, 0 outside) and scaled to [0, 1]: ``(1, 1, *S)`` float32."""
    smoothed = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), min(grid.GetSpacing()) / 2)
    resampled = sitk.Resample(smoothed, grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    array = torch.from_numpy(sitk.GetArrayFromImage(resampled))
    low, high = float(array.min()), float(array.max())
    array = (array - low) / (high - low) if high > low else array * 0
    return array[None, None].to(device)


def _resized(tensor: torch.Tensor, shape) -> torch.Tensor:
    """A ``(1, C, *S)`` field resampled linearly onto a grid of ``shape`` with the same extent."""
    if tuple(tensor.shape[2:]) == tuple(shape):
        return tensor
    return F.interpolate(tensor, size=tuple(shape), mode="trilinear" if len(shape) == 3 else "bilinear", align_corners=True)


@dataclass
class _Level:
    """One level of the pyramid: its images on ``grid`` and the velocity's coarser grid."""

    grid: sitk.Image
    velocity_grid: sitk.Image
    fixed: torch.Tensor
    moving: torch.Tensor
    iterations: int


def _optimize_level(
    level: _Level, velocity: torch.Tensor, settings: RefineSettings, reporter: StageReporter, done: int
) -> torch.Tensor:
    """Adam on ``velocity`` (on the level's velocity grid) for one level; returns it detached."""
    spacing = list(level.grid.GetSpacing())[::-1]
    velocity_spacing = list(level.velocity_grid.GetSpacing())[::-1]
    image_sampler = GridSampler(level.fixed.shape[2:], _extent_mm(level.grid), level.fixed.device)
    velocity_sampler = GridSampler(velocity.shape[2:], _extent_mm(level.grid), level.fixed.device)
    velocity = velocity.detach().clone().requires_grad_(True)
    optimizer = _Adam(velocity, settings.step_voxels * min(spacing))
    sigma = settings.sigma_mm / min(spacing)
    for step in range(level.iterations):
        displacement = _resized(velocity_sampler.exponential(velocity, settings.squarings), level.fixed.shape[2:])
        warped = image_sampler.sample(level.moving, displacement)
        loss = 1 - lncc(warped, level.fixed, sigma).mean() + settings.regularization * smoothness(velocity, velocity_spacing)
        (gradient,) = torch.autograd.grad(loss, velocity)
        optimizer.step(gradient)
        reporter.report(done + step + 1, f"{min(spacing):.1f} mm, loss {float(loss.detach()):.4f}")
    return velocity.detach()


class _Adam:
    """Adam with ``torch.optim.Adam``'s defaults (β 0.9, 0.999; ε 1e-8; bias-corrected) on one tensor.

    Not ``torch.optim.Adam``: a process's first ``torch.optim`` optimizer imports
    ``torch._dynamo``, seconds of every fresh worker process's registration.
    """

    BETA1, BETA2, EPS = 0.9, 0.999, 1e-8

    def __init__(self, parameter: torch.Tensor, learning_rate: float) -> None:
        self.parameter, self.learning_rate = parameter, learning_rate
        self.mean = torch.zeros_like(parameter)
        self.square = torch.zeros_like(parameter)
        self.steps = 0

    @torch.no_grad()
    def step(self, gradient: torch.Tensor) -> None:
        beta1, beta2 = self.BETA1, self.BETA2
        self.steps += 1
        self.mean.lerp_(gradient, 1 - beta1)
        self.square.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
        denominator = (self.square.sqrt() / math.sqrt(1 - beta2**self.steps)).add_(self.EPS)
        self.parameter.addcdiv_(self.mean, denominator, value=-self.learning_rate / (1 - beta1**self.steps))


def foreground_region(fixed: sitk.Image, region: sitk.Image, margin_mm: float) -> sitk.Image:
    """The part of ``region`` (a grid) that holds the fixed image's foreground (Otsu threshold)
    with ``margin_mm`` around it: where the similarity has something to say. All of ``region``
    when the foreground is empty."""
    mask = foreground_mask(fixed, region)
    inside = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1]  # x, y, z index order
    if inside.size == 0:
        return region
    margin = np.ceil(margin_mm / np.array(region.GetSpacing())).astype(int)
    low = np.maximum(inside.min(axis=0) - margin, 0)
    high = np.minimum(inside.max(axis=0) + margin, np.array(region.GetSize()) - 1)
    return sitk.RegionOfInterest(mask, (high - low + 1).tolist(), low.tolist())


def _levels(
    fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, region: sitk.Image, settings: RefineSettings,
    device: torch.device,
) -> List[_Level]:
    """The pyramid, coarsest first: each level's grids and its images (the moving one through
    ``initial``). The finest level's images are resampled from the inputs; each coarser level's
    are the finer ones blurred (σ = one finer voxel) and resampled to half the resolution."""
    identity = sitk.Transform(fixed.GetDimension(), sitk.sitkIdentity)
    finest = refinement_grid(region, settings.spacing_mm)
    images = (_on_grid(fixed, finest, identity, device), _on_grid(moving, finest, initial, device))
    levels = []
    for power, iterations in zip(range(settings.levels), settings.per_level()[::-1]):
        spacing = settings.spacing_mm * 2**power
        grid = refinement_grid(region, spacing)
        if power:
            images = tuple(_resized(gaussian_blur(image, 1.0), grid.GetSize()[::-1]) for image in images)
        velocity_grid = refinement_grid(region, spacing * settings.velocity_coarsening)
        levels.append(_Level(grid, velocity_grid, images[0], images[1], iterations))
    return levels[::-1]


def refine(
    fixed: sitk.Image,
    moving: sitk.Image,
    initial: sitk.Transform,
    region: Optional[sitk.Image] = None,
    settings: RefineSettings = RefineSettings(),
    device: torch.device = torch.device("cpu"),
    progress: Optional[ProgressCallback] = None,
    should_cancel: Optional[CancelCheck] = None,
) -> Refinement:
    """The velocity field ``v`` that refines ``initial`` (fixed → moving, physical) into
    ``initial ∘ exp(v)`` (see the module's docstring).

    Args:
        fixed, moving: the images, each in its own geometry.
        initial: the fixed → moving transform to refine (identity for none).
        region: the grid the refinement covers (default: the fixed image's), cut down to the
            fixed image's foreground and a margin (:func:`foreground_region`); its direction and
            that extent give the refinement grids'.
        settings: :class:`RefineSettings`.

    Raises:
        carlreg.progress.Cancelled: ``should_cancel()`` became true (nothing is returned).
    """
    settings.check()
    started = time.perf_counter()
    reporter = StageReporter(STAGE, sum(settings.per_level()), progress, should_cancel)
    reporter.report(0)  # the stage shows (and can be cancelled) before its first step, which may be long
    region = foreground_region(fixed, region if region is not None else fixed, FOREGROUND_MARGIN_MM)
    levels = _levels(fixed, moving, initial, region, settings, device)
    velocity = torch.zeros((1, fixed.GetDimension(), *levels[0].velocity_grid.GetSize()[::-1]), device=device)
    done = 0
    for level in levels:
        velocity = _optimize_level(level, _resized(velocity, level.velocity_grid.GetSize()[::-1]), settings, reporter, done)
        done += level.iterations
    return Refinement(levels[-1].velocity_grid, velocity.cpu(), settings.squarings, time.perf_counter() - started)


def _vector_image(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    """An ``(*S, D)`` array of LPS vectors as a float64 displacement field with ``grid``'s geometry."""
    image = sitk.GetImageFromArray(array.astype(np.float64), isVector=True)
    image.CopyInformation(grid)
    return image


def _sample_field(field: sitk.Image, grid: sitk.Image, displacement: Optional[np.ndarray] = None) -> np.ndarray:
    """``field`` (LPS mm) at the voxel centres ``x`` of ``grid``, or at ``x + displacement(x)``
    (``(*S, D)`` LPS mm), linearly; beyond its grid its border's values (Slicer's convention for
    grid transforms). Returns ``(*S, D)`` float32, tensor axis order.

    The sample points are an affine function of ``grid``'s index, built axis by axis in float32:
    no array of physical points is made."""
    dimension = field.GetDimension()
    to_index = np.linalg.inv(_direction(field) @ np.diag(field.GetSpacing()))
    scale = 2.0 / (np.array(field.GetSize(), dtype=np.float64) - 1)
    lps_to_unit = scale[:, None] * to_index
    grid_to_unit = lps_to_unit @ _direction(grid) @ np.diag(grid.GetSpacing())
    offset = lps_to_unit @ (np.array(grid.GetOrigin()) - np.array(field.GetOrigin())) - 1.0
    shape = grid.GetSize()[::-1]
    unit = torch.from_numpy(offset).float().expand(*shape, dimension).clone()
    for axis, size in enumerate(grid.GetSize()):  # index axes x, y, z: tensor axes last to first
        steps = torch.arange(size, dtype=torch.float32).reshape(*[size if k == dimension - 1 - axis else 1 for k in range(dimension)], 1)
        unit += steps * torch.from_numpy(grid_to_unit[:, axis]).float()
    if displacement is not None:
        unit += torch.from_numpy(displacement).float() @ torch.from_numpy(lps_to_unit.T).float()
    values = torch.from_numpy(sitk.GetArrayFromImage(field)).float().movedim(-1, 0)[None]
    sampled = grid_sample(values, unit[None])
    return sampled[0].movedim(0, -1).numpy()


def compose(outer: sitk.Image, inner: sitk.Image) -> sitk.Image:
    """The displacement field, on ``inner``'s grid (LPS mm), of ``x ↦ y + outer(y)`` with
    ``y = x + inner(x)``: the map of ``inner`` followed by the map of ``outer``.

    Both are displacement fields (LPS mm) on their own grids; ``outer`` takes its border's value
    beyond its grid."""
    displacement = sitk.GetArrayFromImage(inner)
    return _vector_image(displacement + _sample_field(outer, inner, displacement), inner)
