"""Registration quality figures: overlap of label maps."""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch

__all__ = ["dice_per_label", "mean_dice"]


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
