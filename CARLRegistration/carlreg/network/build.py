"""Builders of the CARL networks, state_dict-compatible with the reference at width 1."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Tuple

from .attention import AttentionRegistration, FeatureNet
from .unet import UNet
from .wrappers import Down, FunctionFromVectorField, RegistrationModule, TwoStep

__all__ = ["CARLConfig", "VARIANTS", "build_carl", "build_from_config", "set_box"]

#: wirings of the reference (icon_registration.carl): ``make_network_<variant>``
VARIANTS = ("final_final", "final")
#: first steps: CARL's coordinate attention Ξ, or a displacement-predicting U-Net (the paper's
#: variant 1, the baseline that is not [W,U]-equivariant)
FIRST_STEPS = ("attention", "unet")
#: channels of Ξ's feature net at width 1
FEATURE_CHANNELS = 128
#: smallest input per axis: Ψ1 runs at half resolution and its U-Net halves 4 more times to ≥ 2 voxels
MIN_INPUT_SIZE = 33


@dataclass(frozen=True)
class CARLConfig:
    """Everything needed to rebuild a CARL network: stored beside its weights.

    ``input_shape`` is the spatial shape in tensor order (z, y, x for 3-D), the frame of the
    U-Nets' displacements; ``trained_box`` the largest box the weights were trained on (empty:
    ``input_shape``), the largest the pipeline grows the box to (:func:`set_box`);
    ``input_spacing_mm`` the physical spacing of the input grid (None: whole arrays resized).
    """

    dimension: int
    input_shape: Tuple[int, ...]
    variant: str = "final_final"
    fourth_step: bool = False
    width: float = 1.0
    first_step: str = "attention"
    trained_box: Tuple[int, ...] = ()
    input_spacing_mm: Optional[float] = None

    @property
    def largest_box(self) -> Tuple[int, ...]:
        """``trained_box``, or ``input_shape``."""
        return tuple(self.trained_box) or tuple(self.input_shape)

    def to_dict(self) -> dict:
        return asdict(self)


def _first(dimension: int, width: float, first_step: str) -> FunctionFromVectorField:
    if first_step == "unet":
        return _psi(dimension, width)
    channels = max(1, round(FEATURE_CHANNELS * width))
    return FunctionFromVectorField(AttentionRegistration(FeatureNet(dimension, channels), dimension))


def _psi(dimension: int, width: float) -> FunctionFromVectorField:
    return FunctionFromVectorField(UNet(dimension, width), in_unit_shape_frame=True)


def _check_build_arguments(dimension: int, input_shape: Tuple[int, ...], variant: str, width: float,
                          first_step: str) -> None:
    """build_carl()'s arguments, each refused with what was expected and what was received."""
    if dimension not in (2, 3):
        raise ValueError(f"build_carl(): dimension must be 2 or 3, got {dimension}")
    if len(input_shape) != dimension or min(input_shape) < MIN_INPUT_SIZE:
        raise ValueError(
            f"build_carl(): input_shape must be {dimension} sizes of at least {MIN_INPUT_SIZE} voxels, "
            f"got {list(input_shape)}"
        )
    if variant not in VARIANTS:
        raise ValueError(f"build_carl(): variant must be one of {VARIANTS}, got {variant!r}")
    if not width > 0:
        raise ValueError(f"build_carl(): width must be positive, got {width}")
    if first_step not in FIRST_STEPS:
        raise ValueError(f"build_carl(): first_step must be one of {FIRST_STEPS}, got {first_step!r}")
    if first_step == "unet" and min(input_shape) < 4 * (MIN_INPUT_SIZE // 2) + 1:
        raise ValueError(
            f"build_carl(): a U-Net first step runs at 1/4 resolution and needs inputs of at least "
            f"{4 * (MIN_INPUT_SIZE // 2) + 1} voxels per axis, got {list(input_shape)}"
        )


def build_carl(
    dimension: int,
    input_shape: Sequence[int],
    variant: str = "final_final",
    fourth_step: bool = False,
    width: float = 1.0,
    first_step: str = "attention",
    trained_box: Sequence[int] = (),
    input_spacing_mm: Optional[float] = None,
) -> RegistrationModule:
    """Build CARL: Ξ at 1/4 resolution, Ψ1 at 1/2, Ψ2 at full resolution (and Ψ3 at full).

    - ``"final_final"``: ``TwoStep{Down{TwoStep{Down{Ξ}, Ψ1}}, Ψ2}``, the paper's formula.
    - ``"final"``: ``TwoStep{Down{Down{Ξ}}, TwoStep{Down{Ψ1}, Ψ2}}``.
    - ``fourth_step``: ``TwoStep{CARL, Ψ3}``, as the paper's evaluated models.

    At ``width=1`` the state_dict keys and shapes equal the reference's
    ``regis_net`` for the same variant; ``width`` scales every channel count.
    ``first_step="unet"`` replaces Ξ by a displacement-predicting U-Net (the paper's variant 1,
    a baseline; it runs at 1/4 resolution, so inputs need at least 65 voxels per axis).
    Calling the result on ``(B, 1, *input_shape)`` moving and fixed images
    returns the ``(B, D, *input_shape)`` fixed → moving map, unit frame; the
    network's ``config`` (:class:`CARLConfig`) and ``input_shape`` describe it. ``trained_box``:
    the largest box its weights are trained for; ``input_spacing_mm``: the physical spacing its
    inputs are sampled at (None: whole arrays resized; :class:`CARLConfig`).
    """
    input_shape = tuple(int(n) for n in input_shape)
    _check_build_arguments(dimension, input_shape, variant, width, first_step)
    if variant == "final_final":
        net = TwoStep(Down(_first(dimension, width, first_step), dimension), _psi(dimension, width))
        net = TwoStep(Down(net, dimension), _psi(dimension, width))
    else:
        net = TwoStep(
            Down(Down(_first(dimension, width, first_step), dimension), dimension),
            TwoStep(Down(_psi(dimension, width), dimension), _psi(dimension, width)),
        )
    if fourth_step:
        net = TwoStep(net, _psi(dimension, width))
    net.set_input_shape(input_shape)
    net.config = CARLConfig(
        dimension, input_shape, variant, bool(fourth_step), float(width), first_step,
        tuple(int(n) for n in trained_box), None if input_spacing_mm is None else float(input_spacing_mm),
    )
    net.input_spacing_mm = net.config.input_spacing_mm
    return net


def build_from_config(config: CARLConfig) -> RegistrationModule:
    """``build_carl`` from a stored :class:`CARLConfig`."""
    return build_carl(
        config.dimension, config.input_shape, config.variant, config.fourth_step, config.width, config.first_step,
        config.trained_box, config.input_spacing_mm,
    )


def set_box(net: RegistrationModule, shape: Sequence[int]) -> None:
    """Run a CARL network on a box of ``shape`` (tensor order) instead of the one it was trained on.

    The U-Nets' displacements stay in the training box's frame (:mod:`carlreg.network.wrappers`),
    so the network's steps keep their size in voxels; Ξ's attention works on any box. A box
    that covers both images (:func:`carlreg.geometry.covering_box`) loses no content at its edge.
    ``set_box(net, net.config.input_shape)`` restores the trained box.
    """
    config = getattr(net, "config", None)
    if not isinstance(config, CARLConfig):
        raise ValueError(f"set_box(): expected a network from build_carl (with its CARLConfig), got {type(net).__name__}")
    shape = tuple(int(n) for n in shape)
    if len(shape) != config.dimension or min(shape) < MIN_INPUT_SIZE:
        raise ValueError(
            f"set_box(): shape must be {config.dimension} sizes of at least {MIN_INPUT_SIZE} voxels, got {list(shape)}"
        )
    net.set_input_shape(shape, config.input_shape)
