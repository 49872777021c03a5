"""The paper's 2-D retina experiment (CARL §6.1) on DRIVE: the ``drive2d`` data source.

Images are made from the 20 DRIVE *training* manual vessel segmentations and their
field-of-view (FOV) masks (``../shared/data/drive/training``, numbers 21–40): the image is 1
inside the FOV away from vessels and 0 on vessels and outside the FOV, as the ICON family's
retina data set composes them (``icon_registration.data.get_dataset_retina`` with the FOV
boundary). The first 3 (21–23) are the test images, the other 17 train; horizontal flips are
added. Both images of a pair come from the same segmentation, at 584 × 565 pixels:

- moving: the image on a canvas padded with 200 empty rows at the bottom (784 × 565);
- fixed: the same image on the same canvas, randomly deformed by two smooth elastic warps
  (random displacements of σ = 25 px on a 3 × 3 grid of control points, then σ = 12 px on
  6 × 6, cubic interpolation, as elasticdeform's ``deform_random_grid``), and, by variant:

  - ``baseline``: nothing else;
  - ``shift``: moved down by the 200 rows (50 pixels after pooling), so that its content sits
    at the bottom of the canvas while the moving image's sits at the top;
  - ``scale_shift``: also scaled to 80 % about the image centre.

Both are then average-pooled by 4, giving ``(1, 196, 141)`` images (tensor order: rows,
columns). Vessel labels (1 = vessel) are the pooled vessel fraction ≥ 0.25, so that thin vessels
(1–2 px at full resolution) survive pooling. Warping the fixed image and its labels uses one
sampling of the original, so both see exactly the same deformation.

All randomness of a batch comes from the generator passed in (exact resume); the test set is a
fixed draw with the same random warp fields (on the canvas) for every variant.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .data import LabelPair
from .maps import grid_sample

__all__ = ["RETINA_SPLITS", "RETINA_VARIANTS", "POOLED_SHAPE", "load_drive_segmentation", "DriveSource"]

#: DRIVE training-set numbers of each split (the paper: first 3 test, other 17 train)
RETINA_SPLITS: Dict[str, Tuple[int, ...]] = {"train": tuple(range(24, 41)), "test": (21, 22, 23)}
RETINA_VARIANTS = ("baseline", "shift", "scale_shift")
ORIGINAL_SHAPE = (584, 565)
PAD_ROWS = 200
POOL = 4
#: network input shape: the padded canvas average-pooled by 4
POOLED_SHAPE = ((ORIGINAL_SHAPE[0] + PAD_ROWS) // POOL, ORIGINAL_SHAPE[1] // POOL)
#: (control points per axis, σ in pixels) of the two elastic warps, applied in this order
ELASTIC_WARPS = ((3, 25.0), (6, 12.0))
SCALE = 0.8
VESSEL_FRACTION = 0.25


@functools.lru_cache(maxsize=64)
def load_drive_segmentation(folder: Path, number: int) -> torch.Tensor:
    """``(2, 584, 565)`` float tensor of one DRIVE training image: channel 0 the retina image
    (FOV without vessels = 1, else 0), channel 1 the vessel mask (0/1). Cached: do not modify."""
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError("load_drive_segmentation(): reading DRIVE's GIF files needs Pillow (pip install Pillow)") from error
    folder = Path(folder)
    vessels_path = folder / "training" / "1st_manual" / f"{number:02d}_manual1.gif"
    fov_path = folder / "training" / "mask" / f"{number:02d}_training_mask.gif"
    for path in (vessels_path, fov_path):
        if not path.is_file():
            raise FileNotFoundError(f"load_drive_segmentation(): {path} not found (expected the DRIVE layout)")
    vessels = np.asarray(Image.open(vessels_path).convert("L")) > 127
    fov = np.asarray(Image.open(fov_path).convert("L")) > 127
    if vessels.shape != ORIGINAL_SHAPE or fov.shape != ORIGINAL_SHAPE:
        raise ValueError(
            f"load_drive_segmentation(): image {number} is {vessels.shape}/{fov.shape}, expected {ORIGINAL_SHAPE}"
        )
    image = fov & ~vessels
    return torch.from_numpy(np.stack([image, vessels]).astype(np.float32))


def _elastic_displacement(shape: Sequence[int], points: int, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``(2, *shape)`` random smooth displacement in pixels (row, column): N(0, σ²) at a
    ``points × points`` grid of control points spanning the image, bicubic in between."""
    control = torch.randn((1, 2, points, points), generator=generator) * sigma
    return F.interpolate(control, size=list(shape), mode="bicubic", align_corners=True)[0]


def _sample_pixels(image: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Values of ``image`` ``(C, H, W)`` at ``positions`` ``(2, *T)`` in pixels (row, column);
    bilinear, zero outside the image."""
    h, w = image.shape[-2:]
    grid = torch.stack([positions[1] / (w - 1), positions[0] / (h - 1)], dim=-1) * 2 - 1
    return grid_sample(image[None], grid[None], padding_mode="zeros")[0]


def _pool(full: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pooled image ``(1, 196, 141)`` and integer vessel labels from a ``(2, 784, 565)`` canvas."""
    pooled = F.avg_pool2d(full[None], POOL)[0]
    # the tolerance keeps windows of exactly 4 vessel pixels in 16 despite interpolation rounding
    return pooled[:1], (pooled[1:] >= VESSEL_FRACTION - 1e-4).long()


def make_pair(
    segmentation: torch.Tensor,
    variant: str,
    flip: bool,
    generator: torch.Generator,
    shift_rows: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pair from a ``(2, 584, 565)`` segmentation: moving and fixed ``(1, 196, 141)``
    images and their vessel labels, the fixed one drawn with ``generator``.

    ``shift_rows`` (full-resolution rows, 0 to 200) overrides the variant's shift of the fixed
    image: a translation sweep (the paper's Fig. 4) from Baseline (0) to Shift (200).
    """
    if variant not in RETINA_VARIANTS:
        raise ValueError(f"make_pair(): variant must be one of {RETINA_VARIANTS}, got {variant!r}")
    if shift_rows is None:
        shift_rows = 0 if variant == "baseline" else PAD_ROWS
    if not 0 <= shift_rows <= PAD_ROWS:
        raise ValueError(f"make_pair(): shift_rows must be within [0, {PAD_ROWS}], got {shift_rows}")
    if flip:
        segmentation = segmentation.flip(-1)
    canvas = (ORIGINAL_SHAPE[0] + PAD_ROWS, ORIGINAL_SHAPE[1])
    rows = torch.arange(canvas[0], dtype=torch.float32)[:, None].expand(canvas)
    columns = torch.arange(canvas[1], dtype=torch.float32)[None, :].expand(canvas)
    positions = torch.stack([rows, columns])
    # fixed(x) = original(T(x)): the last warp applied to the image is the first applied to x
    warps = [_elastic_displacement(canvas, points, sigma, generator) for points, sigma in ELASTIC_WARPS]
    for displacement in reversed(warps):
        positions = positions + _sample_pixels(displacement, positions)
    positions = positions - torch.tensor([float(shift_rows), 0.0])[:, None, None]
    if variant == "scale_shift":
        centre = torch.tensor([(n - 1) / 2 for n in ORIGINAL_SHAPE])[:, None, None]
        positions = centre + (positions - centre) / SCALE
    moving_full = F.pad(segmentation, (0, 0, 0, PAD_ROWS))
    fixed_full = _sample_pixels(segmentation, positions)
    moving, moving_labels = _pool(moving_full)
    fixed, fixed_labels = _pool(fixed_full)
    return moving, fixed, moving_labels, fixed_labels


class DriveSource:
    """Retina pairs (module docstring) of one split and variant.

    Args:
        folder: the DRIVE folder (with ``training/1st_manual`` and ``training/mask``).
        split: ``train`` (images 24–40) or ``test`` (21–23).
        variant: ``baseline``, ``shift`` or ``scale_shift``.
    """

    dimension = 2
    shape = POOLED_SHAPE

    def __init__(self, folder: Path, split: str, variant: str = "baseline") -> None:
        if split not in RETINA_SPLITS:
            raise ValueError(f"DriveSource(): split must be one of {sorted(RETINA_SPLITS)}, got {split!r}")
        if variant not in RETINA_VARIANTS:
            raise ValueError(f"DriveSource(): variant must be one of {RETINA_VARIANTS}, got {variant!r}")
        self.variant = variant
        self.numbers = RETINA_SPLITS[split]
        self.segmentations: List[torch.Tensor] = [load_drive_segmentation(Path(folder), n) for n in self.numbers]

    def batch(self, batch_size: int, generator: torch.Generator) -> LabelPair:
        """``batch_size`` pairs of random images, random flips and random warps."""
        parts = []
        for _ in range(batch_size):
            index = int(torch.randint(len(self.segmentations), (1,), generator=generator))
            flip = bool(torch.rand(1, generator=generator) < 0.5)
            parts.append(make_pair(self.segmentations[index], self.variant, flip, generator))
        return LabelPair(*(torch.stack(t) for t in zip(*parts)))

    def fixed_set(self, warps_per_image: int, seed: int = 0, shift_rows: Optional[int] = None) -> LabelPair:
        """Every image, unflipped and flipped, with ``warps_per_image`` warps each, drawn from
        ``seed``: the same warps for every variant and shift (evaluation)."""
        parts = []
        for index, segmentation in enumerate(self.segmentations):
            for flip in (False, True):
                for warp in range(warps_per_image):
                    generator = torch.Generator().manual_seed(seed * 1_000_003 + (index * 2 + flip) * 1000 + warp)
                    parts.append(make_pair(segmentation, self.variant, flip, generator, shift_rows))
        return LabelPair(*(torch.stack(t) for t in zip(*parts)))
