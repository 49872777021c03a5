"""The public pipeline: two images in physical space in, an ITK transform and the warped image out.

The model interface (how to plug in your own network): ``model(moving, fixed)``, called with
``[1, 1, *input_shape]`` float tensors in [0, 1] (tensor axis order, z, y, x in 3-D; each 3-D
image's voxel axes reoriented to the closest RAS orientation, then brought to ``input_shape``:
its whole array resized linearly, or, when the model has an ``input_spacing_mm``, sampled at
that spacing on a grid centred on the image, see :mod:`carlreg.geometry`), returns the
fixed → moving map in the unit frame, ``[1, D, *input_shape]`` (channel ``k`` is the coordinate
along tensor axis ``k``, voxel ``i`` at ``i / (N − 1)``), and ``model.input_shape`` gives the
spatial shape. Networks from :func:`carlreg.build_carl` and the shipped models satisfy it.
Instance optimization additionally needs the network's ``transform`` method (CARL networks).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Dict, NamedTuple, Optional, Tuple, Union

import SimpleITK as sitk
import torch
from torch import nn

from .device import resolve_device
from .geometry import (
    canonical_orientation, covering_box, covering_grid, jacobian_determinant, map_to_displacement_field, network_ratios, output_grid,
    to_network,
)
from .inference import MapPair, predict_maps
from .inverse import invert_displacement_field, round_trip_error
from .io import ImageError, PathLike, image_to_tensor, read_image
from .landmarks import read_landmarks, target_registration_error
from .losses import lncc
from .metrics import dice_per_label
from .models import load_model
from .network import CARLConfig, RegistrationModule, set_box
from .optimize import instance_optimize
from .preprocess import normalize_intensities, unicarl_preprocess
from .progress import CancelCheck, ProgressCallback, StageReporter
from .refine import Refinement, RefineSettings, compose, refine, refinement_grid, smoothed_start

__all__ = ["RegistrationResult", "register", "warp_image"]


@dataclass
class RegistrationResult:
    """What :func:`register` returns.

    - ``transform``: fixed → moving (resampling transform), a displacement field in LPS mm on
      the fixed grid: ``sitk.Resample(moving, fixed, transform)`` is ``warped``.
    - ``inverse_transform``: moving → fixed, a displacement field in LPS mm on the moving grid,
      or None unless ``inverse=True``. ``inverse_method="exact"``: the numerical inverse of
      ``transform`` (:func:`carlreg.inverse.invert_displacement_field`, started from the
      network's reverse pass, which it keeps where the forward field is not defined);
      ``"network"``: the reverse pass (images swapped) as is, inverse only approximately.
    - ``warped``: the moving image on the fixed grid (linear interpolation).
    - ``jacobian``: determinant of the fixed → moving map's Jacobian, on the field's grid.
    - ``metrics``: ``lncc_before``, ``lncc_after`` (mean local NCC, 1 = identical),
      ``folding_percent`` (voxels with determinant ≤ 0), ``seconds``, ``device``, and
      ``dice_before``/``dice_after`` (mean over labels) when label maps were given, and with
      ``inverse=True`` the inverse's round trip ``|ψ(φ(x)) − x|`` over the fixed foreground
      (:func:`carlreg.inverse.round_trip_error`): ``inverse_round_trip_mean_mm``,
      ``inverse_round_trip_p95_mm`` and ``inverse_round_trip_voxels`` (the voxels counted).
    - ``warped_labels``: the moving label map on the fixed grid (nearest neighbour), or None.
    """

    transform: sitk.DisplacementFieldTransform
    inverse_transform: Optional[sitk.DisplacementFieldTransform]
    warped: sitk.Image
    jacobian: sitk.Image
    metrics: Dict[str, Union[float, str]] = field(default_factory=dict)
    warped_labels: Optional[sitk.Image] = None
    fixed_to_moving_unit: Optional[torch.Tensor] = None


def warp_image(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform, labels: bool = False) -> sitk.Image:
    """``image`` resampled onto ``reference``'s grid through ``transform`` (reference → image points).

    Linear for intensities (float32), nearest neighbour for label maps (pixel type and label set kept).
    """
    if labels:
        return sitk.Resample(image, reference, transform, sitk.sitkNearestNeighbor, 0, image.GetPixelID())
    background = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(image, reference, transform, sitk.sitkLinear, background, sitk.sitkFloat32)


def _label_tensor(labels: sitk.Image) -> torch.Tensor:
    return torch.from_numpy(sitk.GetArrayFromImage(labels).astype("int64"))


def _as_image(image: Union[sitk.Image, PathLike], what: str) -> sitk.Image:
    return image if isinstance(image, sitk.Image) else read_image(image, what)


def network_input(image: sitk.Image, modality: str, shape, spacing_mm: Optional[float], what: str) -> torch.Tensor:
    """The image normalised and on its network grid (see :mod:`carlreg.geometry`)."""
    normalized = normalize_intensities(image_to_tensor(image), modality, what)
    return to_network(normalized, shape, network_ratios(image, shape, spacing_mm))


def _declared(network: nn.Module, name: str):
    """The model interface's ``name`` (``input_spacing_mm``, ``preprocessing``, ``config``): a
    user's module without it gets :class:`~carlreg.network.RegistrationModule`'s default."""
    return getattr(network, name, getattr(RegistrationModule, name))


def _oriented(image: sitk.Image, network: nn.Module, what: str) -> sitk.Image:
    """The image as the network's geometry sees it: for models whose preprocessing is
    ``"unicarl"`` their authors' (:func:`carlreg.preprocess.unicarl_preprocess`, cropped and
    scaled), for the others reoriented to RAS."""
    if _declared(network, "preprocessing") == "unicarl":
        try:
            return unicarl_preprocess(image)
        except ImageError as err:
            raise ImageError(f"{what}: {err}") from err
    return canonical_orientation(image)


def _network_tensor(oriented: sitk.Image, network: nn.Module, modality: str, shape, spacing_mm, what: str) -> torch.Tensor:
    """The ``(1, 1, *shape)`` network input of an image from :func:`_oriented`: uniCARL's whole
    array resized, the others' the modality setting on their own grid (:func:`network_input`)."""
    if _declared(network, "preprocessing") == "unicarl":
        return to_network(image_to_tensor(oriented), shape)
    return network_input(oriented, modality, shape, spacing_mm, what)


#: the values of register()'s ``network_box``
NETWORK_BOXES = ("trained", "cover")
#: ``network_box="cover"`` grows the box up to this many times the model's input shape per axis
MAX_BOX_FACTOR = 2


def _network_box(network: nn.Module, images, spacing_mm: Optional[float], network_box: str) -> Tuple[int, ...]:
    """The box the network runs on. CARL networks at a physical spacing run on the box their
    weights were trained on (``"trained"``: the images sit in it as the training images did, with
    their background around; what lies beyond it is cut; for images smaller than it, the box that
    holds them plus the margin the trained box has beyond the input shape), or grow it to hold
    both images whole (:func:`carlreg.geometry.covering_box`), up to twice the input shape
    (``"cover"``); the others keep their own input shape."""
    config = _declared(network, "config")
    if spacing_mm is None or not isinstance(config, CARLConfig):
        return tuple(int(n) for n in network.input_shape)
    trained = config.largest_box
    if network_box == "trained":
        # trimmed to what holds the images with the margin training kept around the head, so
        # that small images do not pay for a large box
        margins = [t - n for t, n in zip(trained, config.input_shape)]
        needed = covering_box(images, spacing_mm, [1] * len(trained), trained)
        return tuple(int(min(t, max(i, n + m))) for t, i, n, m in zip(trained, config.input_shape, needed, margins))
    largest = [max(n, MAX_BOX_FACTOR * m) for n, m in zip(trained, config.input_shape)]
    return covering_box(images, spacing_mm, trained, largest)


@contextlib.contextmanager
def _boxed(network: nn.Module, shape: Tuple[int, ...]):
    """The network on ``shape`` for the duration (:func:`carlreg.network.set_box`), then back."""
    before = tuple(int(n) for n in network.input_shape)
    if shape == before:
        yield network
        return
    set_box(network, shape)
    try:
        yield network
    finally:
        set_box(network, before)


def _mean_lncc(image: sitk.Image, fixed: sitk.Image, modality: str, shape, spacing_mm: Optional[float]) -> float:
    """Mean LNCC of an image on the fixed grid against the fixed image, on the fixed network grid.

    0 for a constant image: the moving image resampled without registration is empty where the two
    do not overlap (a large offset), and correlates with nothing."""
    statistics = sitk.StatisticsImageFilter()
    statistics.Execute(image)
    if statistics.GetMinimum() == statistics.GetMaximum():
        return 0.0
    a = network_input(image, modality, shape, spacing_mm, "image")
    b = network_input(fixed, modality, shape, spacing_mm, "fixed image")
    return float(torch.mean(lncc(a, b)))


#: the values of register()'s ``inverse_method`` and ``field_extent``
INVERSE_METHODS = ("exact", "network")
#: the values of register()'s ``io_mode``: none, the refinement of the map by a velocity field
#: (:mod:`carlreg.refine`), the paper's tuning of the network's weights (:mod:`carlreg.optimize`)
IO_MODES = ("none", "svf", "network")
FIELD_EXTENTS = ("fixed", "both")


def _field_grid(fixed: sitk.Image, moving: sitk.Image, spacing_mm: Optional[float], extent: str):
    """The forward field's grid (:func:`carlreg.geometry.output_grid`), grown over the moving
    image's extent too when ``extent`` is ``"both"``; and the slices (tensor order) of its array
    that hold the fixed extent (None: all of it)."""
    grid = output_grid(fixed, spacing_mm)
    if extent == "fixed":
        return grid, None
    return covering_grid(grid, moving)


def _inverse_field(
    network_forward: sitk.Image,
    reverse_field: sitk.Image,
    refinement: Optional[Refinement],
    method: str,
    progress: Optional[ProgressCallback],
    should_cancel: Optional[CancelCheck],
) -> sitk.Image:
    """The moving → fixed field :func:`register` returns, on the moving grid (LPS mm).

    ``network_forward``: the network's fixed → moving field; ``reverse_field``: its reverse pass
    (moving grid). ``method`` ``"exact"`` refines the reverse pass into the numerical inverse of
    ``network_forward``, ``"network"`` keeps it. A refinement ``exp(v)`` is undone by ``exp(−v)``
    after it: ``(φ ∘ exp(v))⁻¹ = exp(−v) ∘ φ⁻¹``.
    """
    reporter = StageReporter("inverse", 2, progress, should_cancel)
    field = reverse_field
    if method == "exact":
        field = invert_displacement_field(network_forward, reverse_field, should_cancel=should_cancel)
    reporter.report(1, method)
    if refinement is not None:
        field = compose(refinement.displacement_field(inverse=True), field)
    reporter.report(2)
    return field


def _warped_labels_and_dice(moving_labels, fixed_labels, fixed: sitk.Image, transform: sitk.Transform):
    """The moving label map on the fixed grid (nearest neighbour), and with a fixed label map the
    mean Dice over labels before and after (``dice_before``, ``dice_after``)."""
    moving_labels = _as_image(moving_labels, "moving label map")
    warped = warp_image(moving_labels, fixed, transform, labels=True)
    if fixed_labels is None:
        return warped, {}
    fixed_array = _label_tensor(_as_image(fixed_labels, "fixed label map"))
    before = warp_image(moving_labels, fixed, sitk.Transform(fixed.GetDimension(), sitk.sitkIdentity), labels=True)
    dice = {}
    for key, labels_image in (("dice_before", before), ("dice_after", warped)):
        scores = dice_per_label(_label_tensor(labels_image), fixed_array)
        dice[key] = sum(scores.values()) / len(scores) if scores else float("nan")
    return warped, dice


def _check_options(inverse_method: str, field_extent: str, io_mode: str, network_box: str) -> None:
    if network_box not in NETWORK_BOXES:
        raise ValueError(f"register(): network_box must be 'trained' or 'cover', got {network_box!r}")
    if io_mode not in IO_MODES:
        raise ValueError(f"register(): io_mode must be 'none', 'svf' or 'network', got {io_mode!r}")
    if inverse_method not in INVERSE_METHODS:
        raise ValueError(f"register(): inverse_method must be 'exact' or 'network', got {inverse_method!r}")
    if field_extent not in FIELD_EXTENTS:
        raise ValueError(f"register(): field_extent must be 'fixed' or 'both', got {field_extent!r}")


def _network_maps(network, moving_tensor, fixed_tensor, io_mode, io_steps, inverse, precision, progress, should_cancel):
    """The network's maps of the pair, from the network tuned on it for ``io_mode`` ``"network"``."""
    if io_mode == "network":
        return instance_optimize(
            network, moving_tensor, fixed_tensor, steps=io_steps, inverse=inverse, progress=progress, should_cancel=should_cancel,
        )
    reporter = StageReporter("registration", 1, progress, should_cancel)
    maps = predict_maps(network, moving_tensor, fixed_tensor, inverse=inverse, precision=precision)
    reporter.report(1)
    return maps


def _network_field_grid(grid: sitk.Image, io_mode: str, refine_settings: RefineSettings) -> sitk.Image:
    """Where the network's field is evaluated: the transform's grid, or for a refinement a grid
    of its spacing over the same extent (the network's 3 mm map loses nothing there, and the
    composition interpolates it onto the transform's grid anyway)."""
    if io_mode == "svf" and refine_settings.spacing_mm > max(grid.GetSpacing()):
        return refinement_grid(grid, refine_settings.spacing_mm)
    return grid


def _metrics(moving, fixed, warped, jacobian, fixed_part, modality, shape, spacing_mm) -> Dict[str, float]:
    """LNCC before and after on the fixed image's network grid of ``shape`` (the model's input
    shape, so that a model's figures do not depend on the box it runs on), and folding over the
    fixed extent."""
    identity = warp_image(moving, fixed, sitk.Transform(fixed.GetDimension(), sitk.sitkIdentity))
    determinant = sitk.GetArrayViewFromImage(jacobian)
    determinant = determinant if fixed_part is None else determinant[fixed_part]
    return {
        "lncc_before": _mean_lncc(identity, fixed, modality, shape, spacing_mm),
        "lncc_after": _mean_lncc(warped, fixed, modality, shape, spacing_mm),
        "folding_percent": float((determinant <= 0).mean() * 100.0),
    }


def _evaluations(metrics, moving_labels, fixed_labels, fixed, transform, fixed_landmarks, moving_landmarks, coordinate_system):
    """Dice and the TRE into ``metrics`` when labels or landmarks were given; the warped label map."""
    warped_labels = None
    if moving_labels is not None:
        warped_labels, dice = _warped_labels_and_dice(moving_labels, fixed_labels, fixed, transform)
        metrics.update(dice)
    if fixed_landmarks is not None and moving_landmarks is not None:
        metrics.update(target_registration_error(
            transform, read_landmarks(fixed_landmarks, coordinate_system), read_landmarks(moving_landmarks, coordinate_system),
        ))
    return warped_labels


class _NetworkRun(NamedTuple):
    """The network's maps of a pair (unit frame, :class:`carlreg.inference.MapPair`) and what turns
    them into physical fields: both images reoriented to RAS, the model's input spacing (mm, or
    None for whole arrays resized) and input shape (tensor order)."""

    maps: MapPair
    moving_oriented: sitk.Image
    fixed_oriented: sitk.Image
    spacing_mm: Optional[float]
    input_shape: Tuple[int, ...]


def _run_network(moving, fixed, model, modality, network_box, io_mode, io_steps, inverse, precision, device, progress,
                 should_cancel) -> _NetworkRun:
    """Load the model, bring both images onto its box and run it (tuned on the pair for
    ``io_mode`` ``"network"``)."""
    reporter = StageReporter("loading", 1, progress, should_cancel)
    network = load_model(model, device, progress, should_cancel)
    dimension = len(network.input_shape)
    for what, image in (("moving", moving), ("fixed", fixed)):
        if image.GetDimension() != dimension:
            raise ImageError(
                f"register(): {what} image is {image.GetDimension()}-D, the model registers {dimension}-D images"
            )
    spacing_mm = _declared(network, "input_spacing_mm")
    moving_oriented, fixed_oriented = _oriented(moving, network, "moving image"), _oriented(fixed, network, "fixed image")
    shape = _network_box(network, (moving_oriented, fixed_oriented), spacing_mm, network_box)
    moving_tensor, fixed_tensor = (
        _network_tensor(image, network, modality, shape, spacing_mm, what)
        for image, what in ((moving_oriented, "moving image"), (fixed_oriented, "fixed image"))
    )
    reporter.report(1)
    with _boxed(network, shape):
        maps = _network_maps(network, moving_tensor.to(device), fixed_tensor.to(device), io_mode, io_steps, inverse,
                             precision, progress, should_cancel)
    return _NetworkRun(maps, moving_oriented, fixed_oriented, spacing_mm, tuple(network.input_shape))


def _forward_field(run: _NetworkRun, fixed, moving, grid, io_mode, refine_settings, device, progress, should_cancel):
    """The fixed → moving displacement field on ``grid`` (LPS mm), as
    ``(network field, refinement or None, field)``: the network's field (for ``svf``, smoothed:
    the refinement's start) and the field, which for ``svf`` composes the refinement on it."""
    reporter = StageReporter("transform", 1, progress, should_cancel)
    network_field = map_to_displacement_field(
        run.maps.fixed_to_moving, run.fixed_oriented, run.moving_oriented,
        _network_field_grid(grid, io_mode, refine_settings), run.spacing_mm,
    )
    reporter.report(1)
    if io_mode != "svf":
        return network_field, None, network_field
    network_field = smoothed_start(network_field, refine_settings.start_sigma_mm)
    network_transform = sitk.DisplacementFieldTransform(sitk.Image(network_field))
    refinement = refine(fixed, moving, network_transform, grid, refine_settings, device, progress, should_cancel)
    return network_field, refinement, compose(network_field, refinement.displacement_field(grid=grid))


def _inverse_transform(run: _NetworkRun, moving, fixed, network_field, field_image, refinement, io_mode, refine_settings,
                       inverse_method, progress, should_cancel):
    """The moving → fixed transform on the moving image's grid, and its round trip with ``field_image``."""
    reverse_field = map_to_displacement_field(
        run.maps.moving_to_fixed, run.moving_oriented, run.fixed_oriented, output_grid(moving), run.spacing_mm
    )
    if io_mode == "svf":  # the reverse of the smoothed start, as the start of its inversion
        reverse_field = smoothed_start(reverse_field, refine_settings.start_sigma_mm)
    inverse_field = _inverse_field(network_field, reverse_field, refinement, inverse_method, progress, should_cancel)
    round_trip = round_trip_error(field_image, inverse_field, fixed)
    # the transform takes the field's buffer: the round trip is measured first
    return sitk.DisplacementFieldTransform(inverse_field), round_trip


def register(
    moving: Union[sitk.Image, PathLike],
    fixed: Union[sitk.Image, PathLike],
    model: Union[str, PathLike, nn.Module],
    modality: str = "auto",
    io_mode: str = "none",
    io_steps: int = 50,
    refine_settings: RefineSettings = RefineSettings(),
    device: Union[str, torch.device] = "auto",
    inverse: bool = False,
    progress: Optional[ProgressCallback] = None,
    should_cancel: Optional[CancelCheck] = None,
    field_spacing_mm: Optional[float] = None,
    precision: str = "fp32",
    moving_labels: Optional[Union[sitk.Image, PathLike]] = None,
    fixed_labels: Optional[Union[sitk.Image, PathLike]] = None,
    fixed_landmarks: Optional[PathLike] = None,
    moving_landmarks: Optional[PathLike] = None,
    landmarks_coordinate_system: Optional[str] = None,
    inverse_method: str = "exact",
    field_extent: str = "fixed",
    network_box: str = "trained",
) -> RegistrationResult:
    """Register ``moving`` to ``fixed``; each keeps its own geometry (no pre-alignment needed).

    Each image is reoriented (axes permuted and flipped, exactly) to RAS and brought to the
    network's input grid (:func:`carlreg.geometry.to_network`: sampled at the model's
    ``input_spacing_mm`` on a grid centred on the image, or its whole array resized), and the
    network's map is turned into a physical displacement field on the fixed image's own grid.
    A CARL network at a physical spacing runs on a box grown from its input shape to hold both
    images whole, so that no content is cut at its edge, up to the largest box it was trained on.

    Args:
        moving, fixed: images or paths (anything SimpleITK reads, or a DICOM folder).
        model: a shipped model's name, a weights file, or a module with the model interface.
        modality: ``auto``, ``ct``, ``mr`` or ``max`` (see :mod:`carlreg.preprocess`).
        io_mode: instance optimization: ``none``; ``svf``, the network's map refined at the
            images' resolution by a stationary velocity field (:mod:`carlreg.refine`, with
            ``refine_settings``; any model); ``network``, the paper's: the network's weights
            tuned on the pair for ``io_steps`` steps (CARL networks).
        inverse: also compute the moving → fixed transform.
        inverse_method: ``exact`` (the numerical inverse of the network's forward field, started
            from its reverse pass) or ``network`` (the reverse pass as is); a refinement is
            inverted exactly after either.
        field_spacing_mm: spacing of the transform's grid (default: the fixed image's own).
        field_extent: ``fixed``: the transform's grid covers the fixed image (beyond it ITK
            applies no displacement, Slicer's grid transform the border's); ``both``: the grid,
            on the same lattice, grows to cover the moving image's extent too, so that ITK and
            Slicer agree there as well (the warped image is the same; folding is counted over the
            fixed extent).
        network_box: ``trained``: the box the model was trained on (its card's ``box_shape``, else
            its input shape); ``cover``: that box grown to hold both images whole, up to twice
            the input shape, beyond what it was trained on (a model never trained on a box that
            large may fold its map in the background: bench/brain.py --sweep, README).
        precision: ``fp32`` or ``bf16`` for the network.
        moving_labels, fixed_labels: label maps for the warped label map and Dice.
        fixed_landmarks, moving_landmarks: ``.fcsv``/``.mrk.json``/``.csv`` files for the TRE
            (``landmarks_coordinate_system``, RAS or LPS, for CSV).
    """
    started = time.perf_counter()
    _check_options(inverse_method, field_extent, io_mode, network_box)
    refine_settings.check()
    device = resolve_device(device)
    moving, fixed = _as_image(moving, "moving image"), _as_image(fixed, "fixed image")
    run = _run_network(moving, fixed, model, modality, network_box, io_mode, io_steps, inverse, precision, device,
                       progress, should_cancel)
    grid, fixed_part = _field_grid(fixed, moving, field_spacing_mm, field_extent)
    network_field, refinement, field_image = _forward_field(run, fixed, moving, grid, io_mode, refine_settings, device,
                                                            progress, should_cancel)
    metrics = {"refine_seconds": refinement.seconds} if refinement is not None else {}
    jacobian = jacobian_determinant(field_image)
    transform = sitk.DisplacementFieldTransform(sitk.Image(field_image))
    warped = warp_image(moving, fixed, transform)
    inverse_transform = None
    if inverse:
        inverse_transform, round_trip = _inverse_transform(run, moving, fixed, network_field, field_image, refinement,
                                                           io_mode, refine_settings, inverse_method, progress, should_cancel)
        metrics.update(round_trip)

    reporter = StageReporter("metrics", 1, progress, should_cancel)
    metrics.update(
        _metrics(moving, fixed, warped, jacobian, fixed_part, modality, run.input_shape, run.spacing_mm)
    )
    metrics["device"] = str(device)
    warped_labels = _evaluations(metrics, moving_labels, fixed_labels, fixed, transform, fixed_landmarks,
                                 moving_landmarks, landmarks_coordinate_system)
    metrics["seconds"] = time.perf_counter() - started
    reporter.report(1)
    return RegistrationResult(
        transform, inverse_transform, warped, jacobian, metrics, warped_labels, run.maps.fixed_to_moving.cpu()
    )
