"""Registering image tensors with a network: only the directions asked for, no loss."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from .device import precision_context

__all__ = ["MapPair", "predict_maps"]


class MapPair(NamedTuple):
    """Maps on the network grid, unit frame: ``(B, D, *input_shape)`` each.

    ``fixed_to_moving`` is φ_AB (moving ∘ φ_AB ≈ fixed; the resampling map);
    ``moving_to_fixed`` is φ_BA, from the pass with the images swapped, or None.
    """

    fixed_to_moving: torch.Tensor
    moving_to_fixed: Optional[torch.Tensor]


def predict_maps(
    model: nn.Module,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    inverse: bool = False,
    precision: str = "fp32",
) -> MapPair:
    """Run ``model`` in eval mode without gradients, once per direction asked for.

    Args:
        model: called as ``model(moving, fixed)`` on ``(B, 1, *input_shape)``
            images in [0, 1] on the model's device, returns the fixed → moving map.
        inverse: also compute the moving → fixed map (a second pass, images swapped).
        precision: ``"fp32"`` or ``"bf16"`` (see :mod:`carlreg.device`).
    Returns:
        float32 :class:`MapPair`.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), precision_context(precision, moving.device):
            forward = model(moving, fixed).float()
            backward = model(fixed, moving).float() if inverse else None
    finally:
        model.train(was_training)
    return MapPair(forward, backward)
