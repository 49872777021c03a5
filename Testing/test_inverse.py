"""The inverse transform: the numerical inverse of the forward field (carlreg.inverse) and register()'s use of it.

A synthetic, known forward field on a real image's grid checks the fixed-point inversion from a
poor start, judged by carlreg's round trip and, independently, by ITK's own transforms; the shipped
brain model on the MONAI pair checks the exact inverse against the network's reverse pass, in
Python and through the command line. Tolerances are in voxels of the fixed image (its smallest
spacing).
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from carlreg.inverse import invert_displacement_field, round_trip_error
from carlreg.pipeline import register
from carlreg.progress import Cancelled
from conftest import shared_data_path

ROUND_TRIP_KEYS = {"inverse_round_trip_mean_mm", "inverse_round_trip_p95_mm", "inverse_round_trip_voxels"}


def grid_points(image: sitk.Image) -> np.ndarray:
    """LPS points of every voxel, (N, 3), in array order (x fastest)."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in image.GetSize()[::-1]], indexing="ij")[::-1], -1)
    index_to_lps = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    return index.reshape(-1, 3) @ index_to_lps.T + np.array(image.GetOrigin())


def foreground_points(fixed: sitk.Image, every: int) -> np.ndarray:
    mask = sitk.GetArrayFromImage(sitk.OtsuThreshold(fixed, 0, 1)).reshape(-1) > 0
    return grid_points(fixed)[mask][::every]


def inside(image: sitk.Image, point) -> bool:
    index = np.array(image.TransformPhysicalPointToContinuousIndex([float(c) for c in point]))
    return bool(np.all((index >= 0) & (index <= np.array(image.GetSize()) - 1)))


def itk_round_trip(forward: sitk.Transform, inverse: sitk.Transform, inverse_grid: sitk.Image, points: np.ndarray) -> np.ndarray:
    """|ψ(φ(x)) − x| in mm by ITK's TransformPoint, for the points whose φ(x) is inside the inverse grid."""
    mapped = [forward.TransformPoint(p.tolist()) for p in points]
    kept = [i for i, q in enumerate(mapped) if inside(inverse_grid, q)]
    back = np.array([inverse.TransformPoint(mapped[i]) for i in kept])
    return np.linalg.norm(back - points[kept], axis=1)


def known_field(reference: sitk.Image, seed: int = 1) -> sitk.Image:
    """A 7.8 mm translation plus a smooth deformation (3 plane waves per component, 2 mm each,
    wavelengths 60–100 mm), on ``reference``'s grid: fixed → moving, LPS mm."""
    generator = np.random.default_rng(seed)
    points = grid_points(reference)
    displacement = np.tile([6.0, -4.0, 3.0], (len(points), 1))
    for component in range(3):
        for _ in range(3):
            direction = generator.normal(size=3)
            direction /= np.linalg.norm(direction)
            phase = 2 * np.pi * points @ direction / generator.uniform(60, 100) + generator.uniform(0, 2 * np.pi)
            displacement[:, component] += 2.0 * np.sin(phase)
    field = sitk.GetImageFromArray(displacement.reshape(*reference.GetSize()[::-1], 3), isVector=True)
    field.CopyInformation(reference)
    return field


def oblique_grid(reference: sitk.Image, spacing, angle_deg: float, margin_mm: float) -> sitk.Image:
    """A grid around ``reference``'s extent (plus a margin), rotated about z, with its own spacing."""
    a = np.deg2rad(angle_deg)
    rotation = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    centre = np.array(reference.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in reference.GetSize()]))
    extent = (np.array(reference.GetSize()) - 1) * np.array(reference.GetSpacing()) + 2 * margin_mm
    size = np.ceil(extent / np.array(spacing)).astype(int) + 1
    grid = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    grid.SetSpacing(spacing)
    grid.SetDirection(rotation.flatten().tolist())
    grid.SetOrigin((centre - rotation @ ((size - 1) * np.array(spacing) / 2)).tolist())
    return grid


@pytest.fixture(scope="module")
def synthetic():
    """The fixed image, a known forward field on its grid, and the poor initial inverse −u on an
    oblique grid of its own (2.5 × 2 × 3 mm, rotated 12°; zero beyond the fixed grid)."""
    fixed = sitk.ReadImage(str(shared_data_path("tiny_fixtures", "monai_anatomical_pair", "anatomical.nii")))
    forward = known_field(fixed)
    negated = sitk.GetImageFromArray(-sitk.GetArrayFromImage(forward), isVector=True)
    negated.CopyInformation(forward)
    grid = oblique_grid(fixed, (2.5, 2.0, 3.0), 12.0, 10.0)
    initial = sitk.Resample(negated, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    return fixed, forward, initial


def test_the_inverse_of_a_known_field_from_a_poor_start(synthetic):
    fixed, forward, initial = synthetic
    voxel = min(fixed.GetSpacing())
    u = sitk.GetArrayFromImage(forward)
    gradient = np.stack(np.gradient(u, *fixed.GetSpacing()[::-1], axis=(0, 1, 2))[::-1], -1).reshape(-1, 3, 3)
    assert np.linalg.norm(gradient, ord=2, axis=(1, 2)).max() < 0.5  # invertible, |∇u| well below 1
    calls = []
    inverse = invert_displacement_field(forward, initial, should_cancel=lambda: calls.append(1) or False)
    assert len(calls) + 1 < 50  # converged (tolerance 0.01 mm) before the iteration limit
    assert inverse.GetSize() == initial.GetSize() and inverse.GetOrigin() == initial.GetOrigin()
    assert inverse.GetDirection() == initial.GetDirection() and inverse.GetSpacing() == initial.GetSpacing()

    before, after = round_trip_error(forward, initial, fixed), round_trip_error(forward, inverse, fixed)
    assert set(after) == ROUND_TRIP_KEYS and after["inverse_round_trip_voxels"] > 10_000
    assert before["inverse_round_trip_p95_mm"] > 1.0 * voxel  # the start is poor: the test can fail
    assert after["inverse_round_trip_p95_mm"] <= 0.1 * voxel
    assert after["inverse_round_trip_mean_mm"] < after["inverse_round_trip_p95_mm"]

    # independently, through ITK's own displacement-field transforms
    forward_tf = sitk.DisplacementFieldTransform(sitk.Image(forward))
    inverse_tf = sitk.DisplacementFieldTransform(sitk.Image(inverse))
    errors = itk_round_trip(forward_tf, inverse_tf, inverse, foreground_points(fixed, every=7))
    assert errors.size > 2000 and np.percentile(errors, 95) <= 0.1 * voxel
    # at the inverse's own grid points (no interpolation of v) φ(ψ(y)) = y to the iteration's
    # tolerance (0.01 mm, float32 arithmetic), wherever ψ(y) lies inside the forward grid
    nodes = grid_points(inverse)[::5]
    images = [inverse_tf.TransformPoint(y.tolist()) for y in nodes]
    kept = [i for i, x in enumerate(images) if inside(forward, x)]
    assert len(kept) > 1000
    residual = np.linalg.norm(np.array([forward_tf.TransformPoint(images[i]) for i in kept]) - nodes[kept], axis=1)
    assert residual.max() <= 0.02


def test_cancel_between_iterations(synthetic):
    _, forward, initial = synthetic
    calls = []
    with pytest.raises(Cancelled):
        invert_displacement_field(forward, initial, should_cancel=lambda: calls.append(1) or True)
    assert len(calls) == 1  # asked once, after the first iteration


@pytest.fixture(scope="module")
def monai_pair():
    folder = shared_data_path("tiny_fixtures", "monai_anatomical_pair")
    return folder / "reoriented_anat_moved.nii", folder / "anatomical.nii"


@pytest.fixture(scope="module")
def registered(monai_pair):
    """carl-brain-3d on the MONAI pair, with the exact inverse (and its progress) and the network's."""
    moving, fixed = monai_pair
    reports = []
    exact = register(moving, fixed, "carl-brain-3d", modality="mr", inverse=True, device="cpu", progress=reports.append)
    network = register(moving, fixed, "carl-brain-3d", modality="mr", inverse=True, device="cpu", inverse_method="network")
    return exact, network, reports


def test_exact_inverse_of_the_brain_model_on_the_monai_pair(monai_pair, registered):
    exact, network, reports = registered
    fixed = sitk.ReadImage(str(monai_pair[1]))
    moving = sitk.ReadImage(str(monai_pair[0]))
    voxel = min(fixed.GetSpacing())
    assert ROUND_TRIP_KEYS <= set(exact.metrics) and ROUND_TRIP_KEYS <= set(network.metrics)
    assert exact.metrics["inverse_round_trip_voxels"] > 10_000
    assert exact.metrics["inverse_round_trip_p95_mm"] <= 0.5 * voxel
    # the network's own reverse map is only approximately inverse
    assert network.metrics["inverse_round_trip_p95_mm"] > exact.metrics["inverse_round_trip_p95_mm"]
    assert network.metrics["inverse_round_trip_mean_mm"] > exact.metrics["inverse_round_trip_mean_mm"]
    # the returned transforms themselves, through ITK, on the moving grid
    field = exact.inverse_transform.GetDisplacementField()
    assert field.GetSize() == moving.GetSize() and np.allclose(field.GetDirection(), moving.GetDirection())
    errors = itk_round_trip(exact.transform, exact.inverse_transform, field, foreground_points(fixed, every=5))
    assert errors.size > 2000 and np.percentile(errors, 95) <= 0.5 * voxel
    inverse_stage = [report for report in reports if report.stage == "inverse"]
    assert inverse_stage and inverse_stage[-1].step == inverse_stage[-1].total


def test_command_line_summary_carries_the_round_trip(tmp_path, monai_pair):
    moving, fixed = monai_pair
    summary = tmp_path / "s.json"
    completed = subprocess.run(
        [sys.executable, "-m", "carlreg", "register", "--moving", str(moving), "--fixed", str(fixed),
         "--model", "carl-brain-3d", "--modality", "mr", "--device", "cpu", "--progress", "none",
         "--out-transform", str(tmp_path / "t.h5"), "--out-inverse", str(tmp_path / "inv.h5"), "--summary", str(summary)],
        capture_output=True, text=True,
    )
    assert completed.returncode == 0, completed.stderr
    metrics = json.loads(summary.read_text())
    voxel = min(sitk.ReadImage(str(fixed)).GetSpacing())
    assert {"inverse_round_trip_mean_mm", "inverse_round_trip_p95_mm"} <= set(metrics)
    assert 0 < metrics["inverse_round_trip_p95_mm"] <= 0.5 * voxel
    assert (tmp_path / "inv.h5").is_file()


def test_bad_inverse_method_is_a_one_line_error(monai_pair):
    moving, fixed = monai_pair
    with pytest.raises(ValueError) as raised:
        register(moving, fixed, "carl-brain-3d", inverse=True, device="cpu", inverse_method="backward")
    message = str(raised.value)
    assert "\n" not in message and message.startswith("register():")
    assert "inverse_method" in message and "'exact' or 'network'" in message and "'backward'" in message
