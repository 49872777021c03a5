"""Instance optimization: tune the network on one pair, then restore its weights.

Adam over all network parameters for N steps of a training objective on the
pair, with BatchNorm in eval mode (the reference's defaults: lr 2e-5,
GradICON, λ = 1.5, LNCC σ = 4). The maps come from the tuned network; the
network's state_dict is then restored bit for bit, also after an exception or
a cancel (the reference leaves the weights tuned when it fails part-way).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

import torch
from torch import nn

from .inference import MapPair, predict_maps
from .losses import make_objective
from .progress import CancelCheck, ProgressCallback, StageReporter

__all__ = ["DEFAULT_IO_LEARNING_RATE", "weights_restored", "tune", "instance_optimize"]

DEFAULT_IO_LEARNING_RATE = 2e-5
STAGE = "instance optimization"


@contextlib.contextmanager
def weights_restored(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``model`` may change; afterwards its state_dict and mode are as before."""
    saved = {name: value.detach().clone() for name, value in model.state_dict().items()}
    was_training = model.training
    try:
        yield model
    finally:
        model.load_state_dict(saved)
        model.train(was_training)
        for parameter in model.parameters():
            parameter.grad = None


def tune(
    model: nn.Module,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    steps: int,
    learning_rate: float = DEFAULT_IO_LEARNING_RATE,
    objective: str = "gradicon",
    progress: Optional[ProgressCallback] = None,
    should_cancel: Optional[CancelCheck] = None,
) -> List[float]:
    """Tune ``model`` in place on one pair; returns the objective before each step.

    ``moving`` and ``fixed`` are ``(B, 1, *input_shape)`` images in [0, 1] on the
    model's device. BatchNorm runs in eval mode (running statistics unchanged).

    Raises:
        carlreg.progress.Cancelled: ``should_cancel()`` became true (weights are then part-tuned:
            use :func:`instance_optimize` or :func:`weights_restored`).
    """
    if steps < 0:
        raise ValueError(f"tune(): steps must be ≥ 0, got {steps}")
    if not learning_rate > 0:
        raise ValueError(f"tune(): learning_rate must be positive, got {learning_rate}")
    model.eval()
    loss_model = make_objective(objective, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    reporter = StageReporter(STAGE, steps, progress, should_cancel)
    reporter.report(0)  # the stage shows (and can be cancelled) before its first step, which may be long
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        loss = loss_model(moving, fixed).total
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        reporter.report(step + 1, f"loss {losses[-1]:.4f}")
    return losses


def instance_optimize(
    model: nn.Module,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    steps: int = 50,
    learning_rate: float = DEFAULT_IO_LEARNING_RATE,
    objective: str = "gradicon",
    inverse: bool = False,
    progress: Optional[ProgressCallback] = None,
    should_cancel: Optional[CancelCheck] = None,
) -> MapPair:
    """Maps of one pair from the network tuned on it; the network is left exactly as it was.

    Returns the :class:`~carlreg.inference.MapPair` of the tuned network
    (float32, fixed → moving and, with ``inverse``, moving → fixed).
    """
    with weights_restored(model):
        tune(model, moving, fixed, steps, learning_rate, objective, progress, should_cancel)
        return predict_maps(model, moving, fixed, inverse=inverse)
