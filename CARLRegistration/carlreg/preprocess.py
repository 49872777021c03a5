"""Preparing one image for a network: intensity normalisation to [0, 1], and uniCARL's own preprocessing."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from .io import ImageError

__all__ = ["MODALITIES", "guess_modality", "normalize_intensities", "UNICARL_ORIENTATION", "unicarl_preprocess"]

MODALITIES = ("auto", "ct", "mr", "max")
#: CT window, Hounsfield units
CT_RANGE = (-1000.0, 1000.0)
#: MR percentiles clipped to
MR_PERCENTILES = (0.5, 99.5)


def guess_modality(values: np.ndarray) -> str:
    """``"ct"`` when the values look like Hounsfield units (air near −1000 and tissue above 0), else ``"mr"``."""
    low, high = np.percentile(values, [1, 99])
    return "ct" if low < -500 and high > 0 else "mr"


def normalize_intensities(image: torch.Tensor, modality: str = "auto", what: str = "image") -> torch.Tensor:
    """Map intensities to [0, 1].

    - ``ct``: clip to [−1000, 1000] HU, scale to [0, 1];
    - ``mr``: clip to the 0.5–99.5 percentiles, scale to [0, 1];
    - ``max``: divide by the maximum (the paper's);
    - ``auto``: ``ct`` when the values look like Hounsfield units, else ``mr``.

    Raises:
        ImageError: NaN or infinite values, or a constant image (nothing to register).
    """
    if modality not in MODALITIES:
        raise ValueError(f"normalize_intensities(): modality must be one of {MODALITIES}, got {modality!r}")
    values = image.double()
    if not bool(torch.isfinite(values).all()):
        raise ImageError(f"{what} has NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low == high:
        raise ImageError(f"{what} is constant ({low:g} everywhere): nothing to register")
    if modality == "auto":
        sample = values.flatten()[:: max(1, values.numel() // 2_000_000)].numpy()
        modality = guess_modality(sample)
    if modality == "ct":
        low, high = CT_RANGE
    elif modality == "mr":
        sample = values.flatten()[:: max(1, values.numel() // 2_000_000)].numpy()
        low, high = (float(v) for v in np.percentile(sample, MR_PERCENTILES))
        if high <= low:
            low, high = float(values.min()), float(values.max())
    else:
        if high <= 0:
            raise ImageError(f"{what}: modality 'max' needs a positive maximum, got {high:g}")
        return (values / high).float()
    return ((values.clamp(low, high) - low) / (high - low)).float()


#: the orientation uniCARL's inputs are put in. Its authors' code asks ITK for the legacy code
#: ``ITK_COORDINATE_ORIENTATION_RAS``, which names where each axis comes *from*: the axes run
#: towards left, posterior and inferior, DICOM's "LPI" as SimpleITK's DICOMOrient names it.
UNICARL_ORIENTATION = "LPI"
#: the percentiles uniCARL's inputs are clamped to, then scaled to [0, 1]
UNICARL_QUANTILES = (0.01, 0.99)


def _constant_border(array: np.ndarray, axis: int, from_end: bool) -> int:
    """How many slices at one end of ``axis`` hold a single value each."""
    slices = np.moveaxis(array, axis, 0)
    order = range(len(slices) - 1, -1, -1) if from_end else range(len(slices))
    count = 0
    for index in order:
        if not np.all(slices[index] == slices[index].flat[0]):
            return count
        count += 1
    raise ImageError("the image is constant: nothing to register")


def _kth_smallest(values: np.ndarray, fraction: float) -> float:
    """The ``int(fraction · N)``-th smallest value (1-based, as ``torch.kthvalue``)."""
    k = max(1, int(fraction * values.size))
    return float(np.partition(values.ravel(), k - 1)[k - 1])


def unicarl_preprocess(image: sitk.Image) -> sitk.Image:
    """uniCARL's preprocessing, the same for every modality (its authors' ``preprocess``).

    The image cast to float32 and reoriented to :data:`UNICARL_ORIENTATION` (axes permuted and
    flipped, exactly); at each end of each axis the slices of a single value cropped, and one more
    (the crop keeps the physical placement: the origin moves with it); intensities clamped to the
    1st–99th percentile of the cropped image and scaled to [0, 1]. The network then sees the whole
    array resized to its input shape.

    Raises:
        ImageError: a constant image.
    """
    oriented = sitk.DICOMOrient(sitk.Cast(image, sitk.sitkFloat32), UNICARL_ORIENTATION)
    array = sitk.GetArrayViewFromImage(oriented)  # tensor order (z, y, x)
    lower, upper = [], []
    for axis in range(array.ndim)[::-1]:  # SimpleITK's x, y, z
        lower.append(_constant_border(array, axis, from_end=False) + 1)
        upper.append(_constant_border(array, axis, from_end=True) + 1)
    if any(lo + up >= n for lo, up, n in zip(lower, upper, oriented.GetSize())):
        raise ImageError("the image has no content left once its constant border is cropped")
    cropped = sitk.Crop(oriented, lower, upper)
    values = sitk.GetArrayViewFromImage(cropped)
    low, high = (_kth_smallest(values, q) for q in UNICARL_QUANTILES)
    if high <= low:
        raise ImageError(f"the image's 1st and 99th percentiles are equal ({low:g}): nothing to register")
    scaled = (np.clip(values, low, high).astype(np.float64) - low) * (1.0 / (high - low))
    result = sitk.GetImageFromArray(scaled.astype(np.float32))
    result.CopyInformation(cropped)
    return result
