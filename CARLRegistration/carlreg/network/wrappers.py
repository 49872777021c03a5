"""Registration modules and the wrappers that combine them (ICON's algebra).

A registration module takes a moving image A and a fixed image B, both
``(B, 1, *S)`` in tensor axis order, and returns ``phi_AB``, the fixed → moving
map in the unit frame, with ``A ∘ phi_AB ≈ B``:

- ``transform(A, B)`` returns it as a :class:`~carlreg.maps.Map` (a function
  of coordinates), which is how modules compose;
- ``forward(A, B)`` (calling the module) returns it evaluated on the module's
  own grid, a ``(B, D, *S)`` tensor: the documented model interface.

Each module owns its identity grid as a non-persistent buffer (it moves with
``.to(device)`` and stays out of checkpoints); ``set_input_shape`` assigns it
down the tree, halving (ceil) below a :class:`Down`.

The input shape is the network's box; the *unit shape* is the grid whose unit frame the
displacement-predicting U-Nets were trained in (the shape of the training box, ``CARLConfig``'s
``input_shape``). A U-Net's output is a displacement in that frame, rescaled to the current
box's: a box grown at inference (to cover both images, see :func:`carlreg.network.build.set_box`)
keeps each step's displacements the same in voxels, and at the unit shape nothing changes.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..maps import ComposedMap, DisplacementMap, Map, identity_map, sample

if TYPE_CHECKING:
    from .build import CARLConfig

__all__ = ["RegistrationModule", "FunctionFromVectorField", "TwoStep", "Down"]


class RegistrationModule(nn.Module):
    """Base class: ``transform(moving, fixed) -> Map`` (fixed → moving).

    A whole network (a builder's result) also tells the pipeline how to prepare its inputs
    (``input_spacing_mm``, ``preprocessing``) and how to rebuild it (``config``): its builder sets them.
    """

    identity_map: torch.Tensor
    #: resolution factor between this module's grid and its children's
    downscale_factor = 1
    #: physical spacing (mm) of the network's input grid, centred on each image (None: each
    #: image's whole array resized to the input shape); see :mod:`carlreg.geometry`
    input_spacing_mm: Optional[float] = None
    #: how each image is prepared: ``"modality"`` (reoriented to RAS, intensities normalised for
    #: the modality, :mod:`carlreg.preprocess`) or ``"unicarl"`` (its authors' preprocessing)
    preprocessing: str = "modality"
    #: what rebuilds a CARL network (:func:`carlreg.network.build_carl`); None for the others
    config: Optional["CARLConfig"] = None

    def __init__(self) -> None:
        super().__init__()
        self.input_shape: Tuple[int, ...] = ()

    def set_input_shape(self, input_shape: Sequence[int], unit_shape: Optional[Sequence[int]] = None) -> None:
        """Assign the spatial input shape (tensor order) to this module and its children.

        ``unit_shape``: the grid the U-Nets' displacements are expressed in (default: ``input_shape``).
        """
        self.input_shape = tuple(int(n) for n in input_shape)
        self.unit_shape = self.input_shape if unit_shape is None else tuple(int(n) for n in unit_shape)
        if len(self.unit_shape) != len(self.input_shape):
            raise ValueError(
                f"set_input_shape(): unit_shape {list(self.unit_shape)} and input_shape {list(self.input_shape)} "
                "must have as many axes"
            )
        device = next((b.device for b in self.buffers()), None)
        self.register_buffer(
            "identity_map", identity_map(self.input_shape, device=device), persistent=False
        )
        child_shape = tuple(math.ceil(n / self.downscale_factor) for n in self.input_shape)
        child_unit = tuple(math.ceil(n / self.downscale_factor) for n in self.unit_shape)
        for child in self.children():
            if isinstance(child, RegistrationModule):
                child.set_input_shape(child_shape, child_unit)

    def transform(self, moving: torch.Tensor, fixed: torch.Tensor) -> Map:
        raise NotImplementedError

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """``(B, D, *input_shape)`` fixed → moving map, unit frame, on this module's grid."""
        self._check_inputs(moving, fixed)
        return self.transform(moving, fixed).on_grid(self.identity_map)

    def _check_inputs(self, moving: torch.Tensor, fixed: torch.Tensor) -> None:
        expected = tuple(self.input_shape)
        for name, image in (("moving", moving), ("fixed", fixed)):
            if tuple(image.shape[2:]) != expected or image.dim() != len(expected) + 2:
                raise ValueError(
                    f"{type(self).__name__}(): {name} image must be (B, C, *{list(expected)}), "
                    f"got {tuple(image.shape)}"
                )


class FunctionFromVectorField(RegistrationModule):
    """Wraps a network predicting a ``(B, D, *S)`` displacement as ``x ↦ x + u(x)``.

    ``in_unit_shape_frame``: the network's output is in the unit frame of the unit shape
    (:meth:`set_input_shape`; a U-Net's, whose convolutions see voxels), and ``u`` is it times
    ``(unit − 1) / (input − 1)`` per axis; otherwise (Ξ's attention, which returns coordinates of
    the grid it is given) it is ``u`` as is.
    """

    displacement_scale: Optional[torch.Tensor]

    def __init__(self, net: nn.Module, in_unit_shape_frame: bool = False) -> None:
        super().__init__()
        self.net = net
        self.in_unit_shape_frame = in_unit_shape_frame

    def set_input_shape(self, input_shape: Sequence[int], unit_shape: Optional[Sequence[int]] = None) -> None:
        super().set_input_shape(input_shape, unit_shape)
        scale = [(u - 1) / (n - 1) for u, n in zip(self.unit_shape, self.input_shape)]
        buffer = None
        if self.in_unit_shape_frame and any(s != 1 for s in scale):
            view = (1, len(scale)) + (1,) * len(scale)
            buffer = torch.tensor(scale, dtype=torch.float32, device=self.identity_map.device).view(view)
        self.register_buffer("displacement_scale", buffer, persistent=False)

    def transform(self, moving: torch.Tensor, fixed: torch.Tensor) -> Map:
        displacement = self.net(moving, fixed)
        if self.displacement_scale is not None:
            displacement = displacement * self.displacement_scale.to(displacement.dtype)
        return DisplacementMap(displacement)


class TwoStep(RegistrationModule):
    """``TwoStep{Φ, Ψ}[A, B] = φ ∘ ψ`` with ``φ = Φ[A, B]`` and ``ψ = Ψ[A ∘ φ, B]``."""

    def __init__(self, netPhi: RegistrationModule, netPsi: RegistrationModule) -> None:
        super().__init__()
        self.netPhi = netPhi
        self.netPsi = netPsi

    def transform(self, moving: torch.Tensor, fixed: torch.Tensor) -> Map:
        phi = self.netPhi.transform(moving, fixed)
        moving_warped = sample(moving, phi.on_grid(self.identity_map))
        psi = self.netPsi.transform(moving_warped, fixed)
        return ComposedMap(phi, psi)


class Down(RegistrationModule):
    """Runs ``net`` on both images average-pooled by 2 (ceil mode).

    Maps share the unit frame at every level, so no rescaling of the result is needed.
    """

    downscale_factor = 2

    def __init__(self, net: RegistrationModule, dimension: int) -> None:
        super().__init__()
        if dimension not in (2, 3):
            raise ValueError(f"Down(): dimension must be 2 or 3, got {dimension}")
        self.net = net
        self.dimension = dimension

    def _pool(self, image: torch.Tensor) -> torch.Tensor:
        pool = F.avg_pool2d if self.dimension == 2 else F.avg_pool3d
        return pool(image, 2, ceil_mode=True)

    def transform(self, moving: torch.Tensor, fixed: torch.Tensor) -> Map:
        return self.net.transform(self._pool(moving), self._pool(fixed))
