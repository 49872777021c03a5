"""Training data: brain label maps turned into random-contrast image pairs (SynthMorph-style),
and the user's own pairs from a CSV.

``synthseg3d``: the 20 whole-head label maps of ``../shared/data/synthseg_label_maps``
(FreeSurfer labels; brain structures below 100, extra-cerebral structures above 500). Subjects
01–15 train, 16–18 validate, 19–20 stay untouched until the final evaluation. Each map is
reoriented to RAS, resampled (nearest) onto a box of the training shape around its centre and
kept as a label tensor. Every step draws a moving and a fixed subject, translates each by a
random number of voxels (:data:`SHIFT_MODES`), and synthesises an image from each: a random
intensity per label, a Gaussian blur, a smooth multiplicative bias field and noise, rescaled to
[0, 1], so that the network does not learn one MR contrast. The two images of a pair share their
intensity per label (blur, bias and noise are drawn for each): training is unsupervised with
LNCC, which rewards alignment only where the two contrasts are related (SynthMorph, which draws
them independently, trains on label overlap instead).

All randomness of a step comes from a generator seeded by ``(seed, step)``, so that a run
resumed from a checkpoint draws exactly the batches the uninterrupted run would have drawn.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .geometry import canonical_orientation
from .losses import gaussian_blur

__all__ = [
    "SPLITS",
    "BRAIN_LABEL_LIMIT",
    "BACKGROUNDS",
    "LabelPair",
    "label_map_image",
    "load_label_map",
    "random_contrast",
    "synthesize_image",
    "SynthSegSource",
    "PairsSource",
]

#: subjects (1-based numbers of training_seg_NN.nii.gz) of each split
SPLITS: Dict[str, Tuple[int, ...]] = {
    "train": tuple(range(1, 16)),
    "validation": (16, 17, 18),
    "test": (19, 20),
}
#: FreeSurfer labels below this are brain structures (Dice is reported over them)
BRAIN_LABEL_LIMIT = 100
#: synthesised backgrounds: ``random`` dark grey (up to 0.2 of the range, then bias and noise), or
#: ``dark`` near 0 as in scans scaled to their own range. Only a dark background looks like the
#: zero padding around the network's box, so the network cannot tell where the box ends
#: (``bench/equivariance.py`` measures what that costs the equivariance).
BACKGROUNDS = ("random", "dark")
#: how a pair's translations are drawn, in whole voxels per axis: ``each``, every image by up to
#: ``max_shift`` independently (relative shifts up to twice that, but mostly small: a relative
#: shift of ``2·max_shift`` is one draw in ``(2·max_shift + 1)²``); ``relative``, the pair's
#: relative shift uniform up to ``2·max_shift``, each image still within ``max_shift`` (so that
#: the largest offsets, the capture range, are trained as often as the small ones)
SHIFT_MODES = ("each", "relative")


class LabelPair(NamedTuple):
    """A batch of pairs: ``(B, 1, *shape)`` images in [0, 1] and their ``(B, 1, *shape)`` integer labels.

    ``moving_valid``, ``fixed_valid``: ``(B, 1, *shape)`` float masks, 1 where the image shows its
    subject and 0 where its content was lost (moved out of the box, or beyond its field of view),
    or None where every voxel is valid.
    """

    moving: torch.Tensor
    fixed: torch.Tensor
    moving_labels: torch.Tensor
    fixed_labels: torch.Tensor
    moving_valid: Optional[torch.Tensor] = None
    fixed_valid: Optional[torch.Tensor] = None


def label_map_image(path: Path, shape: Sequence[int], spacing_mm: float) -> sitk.Image:
    """A label map reoriented to RAS and resampled (nearest) onto a box of ``shape`` voxels
    (tensor order) of ``spacing_mm``, centred on the map's own centre; an int32 image."""
    image = canonical_orientation(sitk.ReadImage(str(path)))
    image = sitk.Cast(image, sitk.sitkInt32)
    size_xyz = [int(n) for n in reversed(shape)]
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    direction = np.array(image.GetDirection()).reshape(3, 3)
    extent = direction @ (np.array(size_xyz, dtype=float) - 1) * spacing_mm
    reference = sitk.Image(size_xyz, sitk.sitkInt32)
    reference.SetSpacing([spacing_mm] * 3)
    reference.SetDirection(image.GetDirection())
    reference.SetOrigin(tuple(np.array(centre) - extent / 2))
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)


@functools.lru_cache(maxsize=64)
def load_label_map(path: Path, shape: Tuple[int, ...], spacing_mm: float) -> torch.Tensor:
    """:func:`label_map_image` as an int64 ``(*shape)`` tensor in tensor axis order (the
    SimpleITK array's z, y, x); cached, so it must not be modified."""
    return torch.from_numpy(sitk.GetArrayFromImage(label_map_image(path, shape, spacing_mm)).astype(np.int64))


def random_contrast(max_label: int, generator: torch.Generator, background: str = "random") -> torch.Tensor:
    """``(max_label + 1,)`` random intensities in [0, 1], one per label; the background (label 0)
    dark grey (up to 0.2, ``background="random"``) or black (``"dark"``, see :data:`BACKGROUNDS`)."""
    _check_background(background, "random_contrast()")
    intensities = torch.rand(max_label + 1, generator=generator)
    intensities[0] = torch.rand(1, generator=generator) * 0.2
    if background == "dark":
        intensities[0] = 0.0
    return intensities


def _check_background(background: str, caller: str) -> None:
    if background not in BACKGROUNDS:
        raise ValueError(f"{caller}: background must be one of {BACKGROUNDS}, got {background!r}")


def synthesize_image(
    labels: torch.Tensor, generator: torch.Generator, intensities: torch.Tensor, background: str = "random"
) -> torch.Tensor:
    """A ``(1, 1, *shape)`` image in [0, 1] from an integer label tensor ``(*shape)``: the
    label's intensity (:func:`random_contrast`), then a random blur, bias field and noise; the
    result shifted to start at 0 (``background="random"``) or, for a black background
    (``"dark"``), clipped at 0 as a magnitude image is, so that the background stays near 0."""
    _check_background(background, "synthesize_image()")
    image = intensities[labels][None, None].float()
    # σ of 0.5, 1 or 1.5 voxels: odd kernels (4σ + 1 taps), so the blur does not shift the image
    image = gaussian_blur(image, 0.5 * int(torch.randint(1, 4, (1,), generator=generator)))
    coarse = torch.randn((1, 1, 4, 4, 4), generator=generator) * 0.3
    bias = torch.exp(F.interpolate(coarse, size=labels.shape, mode="trilinear", align_corners=True))
    image = image * bias
    image = image + torch.randn(image.shape, generator=generator) * 0.03 * float(torch.rand(1, generator=generator))
    image = image.clamp_min(0.0) if background == "dark" else image - image.min()
    return image / image.max().clamp_min(1e-6)


def _translate(labels: torch.Tensor, shift: Sequence[int]) -> torch.Tensor:
    """Labels moved by whole voxels; what leaves the box is lost, what enters is background."""
    out = torch.zeros_like(labels)
    source, target = [], []
    for n, s in zip(labels.shape, shift):
        source.append(slice(max(0, -s), n - max(0, s)))
        target.append(slice(max(0, s), n - max(0, -s)))
    out[tuple(target)] = labels[tuple(source)]
    return out


def _cut_to_window(labels: torch.Tensor, extent: Sequence[int]) -> torch.Tensor:
    """Labels outside a window of ``extent`` voxels per axis, centred in the box, made background:
    a scan's field of view, which the pipeline centres in the network's box as this window is."""
    out = torch.zeros_like(labels)
    window = tuple(slice((n - e) // 2, (n - e) // 2 + e) for n, e in zip(labels.shape, extent))
    out[window] = labels[window]
    return out


class SynthSegSource:
    """Random-contrast pairs from the SynthSeg label maps of one split.

    Args:
        folder: ``synthseg_label_maps`` (``training_seg_NN.nii.gz``).
        split: ``train``, ``validation`` or ``test``.
        shape: network input shape, tensor order; spacing_mm: its voxel size.
        max_shift: largest translation of each image, in voxels per axis.
        background: the synthesised background (:data:`BACKGROUNDS`).
        shifts: how the two images' translations are drawn (:data:`SHIFT_MODES`).
        field_of_view: smallest field of view, voxels per axis (0: the whole box): once moved, each
            image's content is cut to a window centred in the box, its extent per axis drawn
            uniformly from this to the box's, so that heads moved near the edge of a scan's field
            of view are partly lost, as in scans of other fields of view.
    """

    def __init__(
        self, folder: Path, split: str, shape: Sequence[int], spacing_mm: float, max_shift: int = 0,
        background: str = "random", shifts: str = "each", field_of_view: int = 0,
    ) -> None:
        _check_background(background, "SynthSegSource()")
        if shifts not in SHIFT_MODES:
            raise ValueError(f"SynthSegSource(): shifts must be one of {SHIFT_MODES}, got {shifts!r}")
        self.background = background
        self.shifts = shifts
        if split not in SPLITS:
            raise ValueError(f"SynthSegSource(): split must be one of {sorted(SPLITS)}, got {split!r}")
        self.shape = tuple(int(n) for n in shape)
        self.max_shift = int(max_shift)
        if not 0 <= field_of_view <= min(self.shape):
            raise ValueError(f"SynthSegSource(): field_of_view must be 0 to {min(self.shape)} voxels, got {field_of_view}")
        self.field_of_view = int(field_of_view)
        self.subjects = SPLITS[split]
        paths = [Path(folder) / f"training_seg_{number:02d}.nii.gz" for number in self.subjects]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise FileNotFoundError(f"SynthSegSource(): label maps not found: {', '.join(missing)}")
        self.labels: List[torch.Tensor] = [load_label_map(p, self.shape, spacing_mm) for p in paths]
        self.max_label = int(max(int(t.max()) for t in self.labels))

    def _image(self, labels: torch.Tensor, generator: torch.Generator, intensities: torch.Tensor,
               shift: Optional[List[int]] = None):
        """An image of ``labels`` moved by ``shift`` (voxels; None: drawn here, ``each``), then
        cut to a field of view when ``field_of_view`` is set; with its labels and validity mask."""
        valid = torch.ones_like(labels)
        if self.max_shift:
            if shift is None:
                shift = torch.randint(-self.max_shift, self.max_shift + 1, (3,), generator=generator).tolist()
            labels, valid = _translate(labels, shift), _translate(valid, shift)
        if self.field_of_view:
            extent = [int(torch.randint(self.field_of_view, n + 1, (1,), generator=generator)) for n in self.shape]
            labels, valid = _cut_to_window(labels, extent), _cut_to_window(valid, extent)
        image = synthesize_image(labels, generator, intensities, self.background)
        return image, labels[None, None], valid[None, None].to(image.dtype)

    def _relative_shifts(self, generator: torch.Generator) -> Tuple[List[int], List[int]]:
        """``relative``: the moving and fixed images' shifts, their difference uniform in
        ``[−2·max_shift, 2·max_shift]`` per axis, each within ``max_shift``."""
        limit = self.max_shift
        relative = torch.randint(-2 * limit, 2 * limit + 1, (3,), generator=generator).tolist()
        moving = [int(torch.randint(max(-limit, d - limit), min(limit, d + limit) + 1, (1,), generator=generator))
                  for d in relative]
        return moving, [m - d for m, d in zip(moving, relative)]

    def batch(self, batch_size: int, generator: torch.Generator) -> LabelPair:
        """``batch_size`` pairs of two different subjects with a shared random contrast, drawn with ``generator``."""
        parts = []
        for _ in range(batch_size):
            first, second = torch.randperm(len(self.labels), generator=generator)[:2].tolist()
            intensities = random_contrast(self.max_label, generator, self.background)
            shifts = self._relative_shifts(generator) if self.shifts == "relative" and self.max_shift else (None, None)
            parts.append(
                self._image(self.labels[first], generator, intensities, shifts[0])
                + self._image(self.labels[second], generator, intensities, shifts[1])
            )
        moving, moving_labels, moving_valid, fixed, fixed_labels, fixed_valid = (torch.cat(t) for t in zip(*parts))
        return LabelPair(moving, fixed, moving_labels, fixed_labels, moving_valid, fixed_valid)


class PairsSource:
    """The user's own pairs: a CSV with columns ``moving``, ``fixed`` and optionally
    ``moving_labels``, ``fixed_labels`` (paths relative to the CSV's folder).

    Each image is read once, reoriented to RAS, normalised (``modality``, see
    :mod:`carlreg.preprocess`) and resized to the network shape as at registration time;
    label maps are resized with nearest neighbour (zeros where none are given). A batch
    draws rows at random and swaps moving and fixed with probability 1/2.
    """

    def __init__(self, csv_path: Path, shape: Sequence[int], modality: str = "auto") -> None:
        import csv

        from .geometry import to_network
        from .io import image_to_tensor, read_image
        from .preprocess import normalize_intensities

        self.shape = tuple(int(n) for n in shape)
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise FileNotFoundError(f"PairsSource(): pair list not found: {csv_path}")
        with open(csv_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or not {"moving", "fixed"} <= set(rows[0]):
            raise ValueError(f"PairsSource(): {csv_path} needs columns moving and fixed (and optionally *_labels)")

        def image(relative: str) -> torch.Tensor:
            loaded = canonical_orientation(read_image(csv_path.parent / relative))
            # whole arrays resized: a model trained on them has no physical input spacing
            return to_network(normalize_intensities(image_to_tensor(loaded), modality, relative), self.shape)

        def labels(relative: str) -> torch.Tensor:
            if not relative:
                return torch.zeros((1, 1) + self.shape, dtype=torch.int64)
            loaded = image_to_tensor(canonical_orientation(read_image(csv_path.parent / relative)))
            return F.interpolate(loaded, size=list(self.shape), mode="nearest").long()

        self.pairs = [
            (image(r["moving"]), image(r["fixed"]), labels(r.get("moving_labels") or ""), labels(r.get("fixed_labels") or ""))
            for r in rows
        ]

    def batch(self, batch_size: int, generator: torch.Generator) -> LabelPair:
        parts = []
        for _ in range(batch_size):
            moving, fixed, moving_labels, fixed_labels = self.pairs[int(torch.randint(len(self.pairs), (1,), generator=generator))]
            if bool(torch.rand(1, generator=generator) < 0.5):
                moving, fixed, moving_labels, fixed_labels = fixed, moving, fixed_labels, moving_labels
            parts.append((moving, fixed, moving_labels, fixed_labels))
        return LabelPair(*(torch.cat(t) for t in zip(*parts)))
