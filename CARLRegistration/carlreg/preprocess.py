"""Intensity normalisation of one image to the network's [0, 1] range."""
from __future__ import annotations

import numpy as np
import torch

from .io import ImageError

__all__ = ["MODALITIES", "guess_modality", "normalize_intensities"]

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
