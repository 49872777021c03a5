"""Registration quality figures: overlap of label maps."""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch

__all__ = ["dice_per_label", "mean_dice", "folding_percent"]


def dice_per_label(
    labels_a: torch.Tensor, labels_b: torch.Tensor, label_values: Optional[Iterable[int]] = None
) -> Dict[int, float]:
    """Dice ``2|A∩B| / (|A| + |B|)`` of each label, for two integer label tensors of one shape.

    ``label_values`` defaults to the non-zero labels present in either tensor.
    """
    if labels_a.shape != labels_b.shape:
        raise ValueError(
            f"dice_per_label(): label maps must have one shape, got {tuple(labels_a.shape)} and {tuple(labels_b.shape)}"
        )
    if label_values is None:
        label_values = [int(v) for v in torch.unique(torch.cat([labels_a.flatten(), labels_b.flatten()])) if v != 0]
    scores = {}
    for value in label_values:
        in_a, in_b = labels_a == value, labels_b == value
        total = int(in_a.sum()) + int(in_b.sum())
        if total:
            scores[int(value)] = 2.0 * int((in_a & in_b).sum()) / total
    return scores


def mean_dice(labels_a: torch.Tensor, labels_b: torch.Tensor, below: Optional[int] = None) -> float:
    """Mean Dice over the non-zero labels of ``labels_b`` (the fixed image's), optionally those ``< below``."""
    values = [int(v) for v in torch.unique(labels_b) if v != 0 and (below is None or v < below)]
    scores = dice_per_label(labels_a, labels_b, values)
    return sum(scores.values()) / len(scores) if scores else float("nan")


def folding_percent(phi: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """Percentage of grid points where a map folds (det ∂φ/∂x ≤ 0), over the points where
    ``mask`` (boolean, shape ``S``) is true if given.

    ``phi``: ``(1, D, *S)`` map, unit frame (:mod:`carlreg.maps`), on its own grid of shape ``S``.
    The determinant is :func:`carlreg.geometry.jacobian_determinant`'s, in voxel units.
    """
    import SimpleITK as sitk

    from .geometry import jacobian_determinant
    from .maps import identity_map

    if phi.dim() not in (4, 5) or phi.shape[0] != 1 or phi.shape[1] != phi.dim() - 2:
        raise ValueError(f"folding_percent(): expected one (1, D, *S) map, got shape {tuple(phi.shape)}")
    shape = phi.shape[2:]
    scale = torch.tensor([n - 1 for n in shape], dtype=torch.float64).view(-1, *([1] * len(shape)))
    voxels = (phi[0].double().cpu() - identity_map(shape, dtype=torch.float64)[0]) * scale
    # SimpleITK vectors are (x, y, z): the tensor's channels reversed, in a grid of unit spacing
    field = sitk.GetImageFromArray(voxels.flip(0).movedim(0, -1).numpy(), isVector=True)
    folded = sitk.GetArrayFromImage(jacobian_determinant(field)) <= 0
    if mask is not None:
        folded = folded[mask.cpu().numpy().astype(bool)]
    return 100.0 * float(folded.mean()) if folded.size else float("nan")
