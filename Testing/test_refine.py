"""The fine registration (carlreg.refine): a known smooth warp of a real brain recovered, its
inverse, its settings, and its place in register()."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from carlreg.pipeline import register
from carlreg.progress import Cancelled
from carlreg.refine import RefineSettings, compose, refine, smoothed_start
from carlreg.svf import GridSampler
from conftest import shared_data_path

SPACING_MM = 3.0
#: a small pyramid, so that the test stays quick on two cores
SETTINGS = RefineSettings(spacing_mm=SPACING_MM, levels=2, iterations=(40, 40))


@pytest.fixture(scope="module")
def brain() -> sitk.Image:
    """The MNI152 T1 template (real MR), resampled to 3 mm."""
    image = sitk.ReadImage(str(shared_data_path("brain_templates", "antspy", "mni.nii.gz")), sitk.sitkFloat32)
    size = [int(n * s / SPACING_MM) for n, s in zip(image.GetSize(), image.GetSpacing())]
    smoothed = sitk.SmoothingRecursiveGaussian(image, SPACING_MM / 2)
    return sitk.Resample(smoothed, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), [SPACING_MM] * 3,
                         image.GetDirection(), 0.0, sitk.sitkFloat32)


def _smooth_warp(grid: sitk.Image) -> sitk.Image:
    """A smooth displacement field (LPS mm) on ``grid``: two Gaussian bumps of 6 and 4.5 mm
    (2 and 1.5 voxels), 30 mm wide, in different directions."""
    points = np.stack(np.meshgrid(*[np.arange(n) for n in grid.GetSize()[::-1]], indexing="ij")[::-1], -1) * SPACING_MM
    centre = np.array(grid.GetSize()) * SPACING_MM / 2
    field = np.zeros(points.shape)
    for offset, vector in (((-20, 10, 0), (6.0, 0.0, 0.0)), ((15, -15, 10), (0.0, -3.0, 3.4))):
        distance = np.sum((points - centre - np.array(offset)) ** 2, axis=-1)
        field += np.exp(-distance / (2 * 15.0**2))[..., None] * np.array(vector)
    image = sitk.GetImageFromArray(field, isVector=True)
    image.CopyInformation(grid)
    return image


def _brain_mask(image: sitk.Image) -> np.ndarray:
    """The foreground as the engine defines it (Otsu threshold), where the refinement works."""
    return sitk.GetArrayFromImage(sitk.OtsuThreshold(image, 0, 1)) > 0


def _length(field: sitk.Image) -> np.ndarray:
    return np.linalg.norm(sitk.GetArrayFromImage(field), axis=-1)


@pytest.fixture(scope="module")
def warped_pair(brain):
    """(fixed, moving, the true fixed → moving field): moving = fixed ∘ Ψ for a smooth Ψ, so
    that the true map is Ψ⁻¹, computed by ITK's own inversion (independent of ours)."""
    psi = _smooth_warp(brain)
    moving = sitk.Resample(brain, brain, sitk.DisplacementFieldTransform(sitk.Image(psi)), sitk.sitkLinear, 0.0)
    truth = sitk.InvertDisplacementField(psi, maximumNumberOfIterations=50, maxErrorToleranceThreshold=1e-4,
                                         meanErrorToleranceThreshold=1e-5, enforceBoundaryCondition=False)
    return brain, moving, truth


@pytest.fixture(scope="module")
def refined(warped_pair):
    fixed, moving, _ = warped_pair
    return refine(fixed, moving, sitk.Transform(3, sitk.sitkIdentity), settings=SETTINGS)


def test_a_known_smooth_warp_of_a_real_brain_is_recovered_to_half_a_voxel(warped_pair, refined):
    fixed, _, truth = warped_pair
    found = refined.displacement_field(grid=fixed)
    error = _length(sitk.Subtract(found, truth))[_brain_mask(fixed)]
    before = _length(truth)[_brain_mask(fixed)]
    assert before.max() > 1.5 * SPACING_MM  # the warp is worth recovering
    assert error.mean() < 0.25 * SPACING_MM and np.percentile(error, 95) < 0.5 * SPACING_MM, (error.mean(), np.percentile(error, 95))


def test_the_inverse_composed_with_the_forward_is_the_identity_to_a_tenth_of_a_voxel(warped_pair, refined):
    """exp(−v) after exp(v), both interpolated linearly from the velocity's grid (twice coarser
    than the level's): the round trip is within a tenth of a voxel at the 99th percentile of the
    foreground and within 0.15 voxel everywhere (measured: 0.024 and 0.11)."""
    fixed = warped_pair[0]
    forward = refined.displacement_field(grid=fixed)
    backward = refined.displacement_field(inverse=True, grid=fixed)
    round_trip = _length(compose(backward, forward))[_brain_mask(fixed)]
    assert _length(forward)[_brain_mask(fixed)].max() > SPACING_MM
    assert np.percentile(round_trip, 99) < 0.1 * SPACING_MM and round_trip.max() < 0.15 * SPACING_MM, round_trip.max()


def test_the_exponential_of_a_translation_is_that_translation():
    sampler = GridSampler((8, 9, 10), (14.0, 16.0, 18.0), torch.device("cpu"))
    velocity = torch.tensor([1.5, -0.5, 2.0]).reshape(1, 3, 1, 1, 1).expand(1, 3, 8, 9, 10)
    assert torch.allclose(sampler.exponential(velocity), velocity, atol=1e-5)


def test_compose_follows_the_inner_map_then_the_outer_beyond_its_grid_too(brain):
    inner = _smooth_warp(brain)
    array = np.zeros((*brain.GetSize()[::-1], 3))
    array[..., 0] = 10.0  # a translation: its border value continues it beyond the grid
    shifted = sitk.GetImageFromArray(array, isVector=True)
    shifted.CopyInformation(brain)
    composed = sitk.GetArrayFromImage(compose(shifted, inner))
    expected = sitk.GetArrayFromImage(inner) + np.array([10.0, 0.0, 0.0])
    assert np.abs(composed - expected).max() < 1e-4


@pytest.mark.parametrize("settings, message", [
    (RefineSettings(levels=2, iterations=(1, 2, 3)), "one iteration count per level"),
    (RefineSettings(spacing_mm=0), "spacing_mm and sigma_mm must be positive"),
    (RefineSettings(regularization=-1), "regularization ≥ 0"),
])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        settings.check()


def test_cancel_part_way_raises_and_reports_no_further_step(warped_pair):
    fixed, moving, _ = warped_pair
    steps = []
    with pytest.raises(Cancelled):
        refine(fixed, moving, sitk.Transform(3, sitk.sitkIdentity), settings=SETTINGS,
               progress=lambda report: steps.append(report.step), should_cancel=lambda: len(steps) >= 6)
    assert steps == [0, 1, 2, 3, 4, 5]


def test_register_refines_any_models_map_and_inverts_it(warped_pair):
    """A user's model (here one that returns the identity map) refined by register(): the
    transform is the refinement's, and the inverse's round trip is small."""
    fixed, moving, truth = warped_pair

    class Identity(torch.nn.Module):
        input_shape = (32, 32, 32)

        def forward(self, moving_image, fixed_image):
            axes = [torch.linspace(0, 1, n) for n in self.input_shape]
            return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]

    result = register(moving, fixed, Identity(), io_mode="svf", refine_settings=SETTINGS, device="cpu",
                      inverse=True, inverse_method="network")
    found = result.transform.GetDisplacementField()
    error = _length(sitk.Subtract(found, truth))[_brain_mask(fixed)]
    assert error.mean() < 0.25 * SPACING_MM
    assert result.metrics["refine_seconds"] > 0 and result.metrics["folding_percent"] == 0.0
    assert result.metrics["inverse_round_trip_p95_mm"] < 0.1 * SPACING_MM


def test_a_translation_starts_the_refinement_as_it_is_and_fine_ripples_do_not():
    grid = sitk.Image([30, 24, 20], sitk.sitkVectorFloat64)
    grid.SetSpacing([2.0, 2.0, 2.0])
    values = np.zeros((20, 24, 30, 3))
    values[..., 0] = 7.5
    values[..., 2] = 1.5 * (-1.0) ** np.indices((20, 24, 30)).sum(axis=0)
    field = sitk.GetImageFromArray(values, isVector=True)
    field.CopyInformation(grid)
    start = sitk.GetArrayFromImage(smoothed_start(field, 12.0))
    assert np.abs(start[..., 0] - 7.5).max() < 1e-4
    # damped 8-fold at the corners (the filter's edges), to nothing inside
    assert np.abs(start[..., 2]).max() < 0.25 and np.abs(start[6:-6, 6:-6, 6:-6, 2]).max() < 0.02
    assert smoothed_start(field, 0.0) is field


def test_the_refinement_undoes_a_maps_error_at_its_own_grids_scale_from_the_smoothed_start(warped_pair):
    """A model whose map errs by ±3.6 mm from one of its voxels to the next (as a coarse network's
    map does): refined as it is, much of that error stays (the velocity is smooth); refined from
    its smoothed start (the default), the warp is recovered as from the identity."""
    fixed, moving, truth = warped_pair

    class Rippled(torch.nn.Module):
        input_shape = (32, 32, 32)

        def forward(self, moving_image, fixed_image):
            axes = [torch.linspace(0, 1, n) for n in self.input_shape]
            identity = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]
            ripple = (-1.0) ** torch.stack(torch.meshgrid(*[torch.arange(n) for n in self.input_shape], indexing="ij")).sum(0)
            return identity + 0.02 * ripple * torch.tensor([0.0, 0.0, 1.0]).reshape(1, 3, 1, 1, 1)

    errors = {}
    for sigma in (0.0, RefineSettings().start_sigma_mm):
        settings = RefineSettings(spacing_mm=SPACING_MM, levels=2, iterations=(40, 40), start_sigma_mm=sigma)
        found = register(moving, fixed, Rippled(), io_mode="svf", refine_settings=settings, device="cpu").transform
        errors[sigma] = _length(sitk.Subtract(found.GetDisplacementField(), truth))[_brain_mask(fixed)].mean()
    assert errors[RefineSettings().start_sigma_mm] < 0.25 * SPACING_MM and errors[0.0] > 2 * errors[RefineSettings().start_sigma_mm]
