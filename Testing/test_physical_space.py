"""Registration in physical space, checked with a model whose map is known analytically.

The fixed and moving images are the real CT of ../shared/data re-gridded onto awkward grids
(oblique directions, anisotropic spacing, non-zero origins, different sizes and fields of
view). The test model returns, on the fixed image's network grid, the map of a known physical
mapping T (a 25 mm translation plus a smooth deformation), computed here independently of the
engine's geometry code: with SimpleITK's index ↔ point conversions and the linear-resize
relation ``i = (j + 0.5) N / n − 0.5`` on the images reoriented to RAS.
"""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from carlreg.io import read_transform, write_transform
from carlreg.pipeline import register
from conftest import require_module, shared_data_path

NETWORK_SHAPE = (40, 44, 48)
TRANSLATION = np.array([25.0, 0.0, 0.0])


def physical_map(points: np.ndarray) -> np.ndarray:
    """T: fixed LPS points (N, 3) → moving LPS points: a 25 mm shift plus a smooth deformation."""
    x, y, z = points.T
    return points + TRANSLATION + np.stack(
        [3.0 * np.sin(2 * np.pi * y / 180.0), 2.0 * np.cos(2 * np.pi * z / 150.0), 2.5 * np.sin(2 * np.pi * x / 200.0)], 1
    )


def physical_map_inverse(points: np.ndarray) -> np.ndarray:
    estimate = points - TRANSLATION
    for _ in range(60):  # fixed-point iteration; the deformation is a contraction
        estimate = estimate + (points - physical_map(estimate))
    return estimate


def rotation(angles_deg):
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def regrid(image: sitk.Image, size, spacing, angles_deg, centre_offset) -> sitk.Image:
    """``image`` resampled onto a grid of ``size`` voxels around its centre (+ offset), rotated."""
    direction = rotation(angles_deg)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    centre = centre + np.array(centre_offset)
    half_extent = direction @ ((np.array(size) - 1) * np.array(spacing) / 2)
    reference = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    reference.SetSpacing(spacing)
    reference.SetDirection(direction.flatten().tolist())
    reference.SetOrigin((centre - half_extent).tolist())
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)


def image_points(image: sitk.Image, index_ijk: np.ndarray) -> np.ndarray:
    return np.array([image.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in index_ijk])


class KnownMapModel(nn.Module):
    """The model interface with a known answer: the map of T (or of T⁻¹ for the swapped pair).

    With ``input_spacing_mm``, the network grid of an image is centred on it with that spacing
    along its axes: network voxel ``j`` at index ``(j − (n − 1)/2) · s / spacing + (N − 1)/2``.
    """

    def __init__(self, fixed: sitk.Image, moving: sitk.Image, input_spacing_mm=None):
        super().__init__()
        self.input_shape = NETWORK_SHAPE
        self.input_spacing_mm = input_spacing_mm
        # the network sees each image's voxels reoriented to the closest RAS axes
        self.fixed, self.moving = sitk.DICOMOrient(fixed, "RAS"), sitk.DICOMOrient(moving, "RAS")
        self.calls = []

    def _index_per_network_voxel(self, image: sitk.Image) -> np.ndarray:
        n_xyz = np.array(NETWORK_SHAPE[::-1], dtype=float)
        if self.input_spacing_mm is None:
            return np.array(image.GetSize()) / n_xyz
        return self.input_spacing_mm / np.array(image.GetSpacing())

    def _unit_map(self, source: sitk.Image, target: sitk.Image, mapping) -> torch.Tensor:
        n_xyz = np.array(NETWORK_SHAPE[::-1], dtype=float)
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in NETWORK_SHAPE], indexing="ij"), -1).reshape(-1, 3)
        network_xyz = grid[:, ::-1].astype(float)
        source_centre, target_centre = (np.array(source.GetSize()) - 1) / 2, (np.array(target.GetSize()) - 1) / 2
        source_ijk = (network_xyz - (n_xyz - 1) / 2) * self._index_per_network_voxel(source) + source_centre
        target_points = mapping(image_points(source, source_ijk))
        target_ijk = np.array([target.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in target_points])
        target_network = (target_ijk - target_centre) / self._index_per_network_voxel(target) + (n_xyz - 1) / 2
        unit_zyx = (target_network / (n_xyz - 1))[:, ::-1]
        return torch.from_numpy(unit_zyx.T.reshape((1, 3) + NETWORK_SHAPE).astype(np.float32))

    def forward(self, moving, fixed):
        swapped = len(self.calls) % 2 == 1  # register() calls (moving, fixed), then (fixed, moving)
        self.calls.append(swapped)
        if swapped:
            return self._unit_map(self.moving, self.fixed, physical_map_inverse)
        return self._unit_map(self.fixed, self.moving, physical_map)


@pytest.fixture(scope="module")
def awkward_pair():
    ct = sitk.ReadImage(str(shared_data_path("totalsegmentator_examples", "example_ct.nii.gz")), sitk.sitkFloat32)
    fixed = regrid(ct, (96, 80, 60), (3.1, 3.4, 4.2), (12, -8, 25), (0, 0, 0))
    moving = regrid(ct, (84, 92, 70), (3.6, 2.9, 3.3), (-5, 10, -15), (25, 10, -5))
    return fixed, moving


@pytest.fixture(scope="module")
def known_result(awkward_pair):
    fixed, moving = awkward_pair
    model = KnownMapModel(fixed, moving)
    result = register(moving, fixed, model, modality="ct", device="cpu", inverse=True)
    assert model.calls == [False, True]
    return result


def interior_indices(image: sitk.Image, count: int, margin: int = 4, seed: int = 0) -> np.ndarray:
    generator = np.random.default_rng(seed)
    size = np.array(image.GetSize())
    return generator.uniform(margin, size - 1 - margin, size=(count, 3))


def test_transform_equals_the_analytic_mapping(awkward_pair, known_result):
    fixed, _ = awkward_pair
    points = image_points(fixed, interior_indices(fixed, 1500))
    expected = physical_map(points)
    mapped = np.array([known_result.transform.TransformPoint(p.tolist()) for p in points])
    error_in_voxels = np.linalg.norm(mapped - expected, axis=1) / min(fixed.GetSpacing())
    assert error_in_voxels.max() <= 0.25, error_in_voxels.max()
    # the 25 mm shift is really there (the check is not vacuous)
    assert np.abs(np.median(mapped - points, axis=0)[0] - 25.0) < 3.0


def test_models_with_a_physical_input_spacing_map_exactly_too(awkward_pair):
    fixed, moving = awkward_pair
    spacing = 5.0
    model = KnownMapModel(fixed, moving, input_spacing_mm=spacing)
    result = register(moving, fixed, model, modality="ct", device="cpu")
    # the network box (n · 5 mm, centred on the fixed image) covers only part of the fixed image:
    # the map is the analytic one inside it, where the moving image's box also reaches
    oriented = sitk.DICOMOrient(fixed, "RAS")
    half_box = (np.array(NETWORK_SHAPE[::-1]) - 1) / 2 * spacing / np.array(oriented.GetSpacing()) - 3
    centre = (np.array(oriented.GetSize()) - 1) / 2
    candidates = image_points(oriented, interior_indices(oriented, 3000))
    inside = np.all(np.abs(np.array([oriented.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in candidates]) - centre)
                    < half_box, axis=1)
    moving_oriented = sitk.DICOMOrient(moving, "RAS")
    moving_half_box = (np.array(NETWORK_SHAPE[::-1]) - 1) / 2 * spacing / np.array(moving_oriented.GetSpacing()) - 3
    moving_centre = (np.array(moving_oriented.GetSize()) - 1) / 2
    targets = physical_map(candidates)
    inside &= np.all(np.abs(np.array([moving_oriented.TransformPhysicalPointToContinuousIndex(q.tolist()) for q in targets])
                            - moving_centre) < moving_half_box, axis=1)
    assert inside.sum() > 300
    points = candidates[inside]
    mapped = np.array([result.transform.TransformPoint(p.tolist()) for p in points])
    error_in_voxels = np.linalg.norm(mapped - targets[inside], axis=1) / min(fixed.GetSpacing())
    assert error_in_voxels.max() <= 0.25, error_in_voxels.max()
    # a whole-array resize would read the same network map as a different mapping
    assert np.abs(np.median(mapped - points, axis=0)[0] - 25.0) < 3.0


def test_network_grids_of_both_kinds():
    from carlreg.geometry import network_ratios, to_network

    image = sitk.Image([50, 40, 30], sitk.sitkFloat32)
    image.SetSpacing((1.0, 2.0, 2.5))
    ramp = torch.arange(50, dtype=torch.float32).view(1, 1, 1, 1, 50).expand(1, 1, 30, 40, 50).contiguous()
    shape = (10, 12, 16)
    assert network_ratios(image, shape) == (50 / 16, 40 / 12, 30 / 10)
    resized = to_network(ramp, shape)
    assert torch.equal(resized, torch.nn.functional.interpolate(ramp, size=list(shape), mode="trilinear", align_corners=False))
    ratios = network_ratios(image, shape, spacing_mm=2.0)
    assert ratios == (2.0, 1.0, 0.8)
    sampled = to_network(ramp, shape, ratios)
    # x: network voxel j at index (j − 7.5)·2 + 24.5, the ramp's value there; zero beyond the image
    expected = (torch.arange(16, dtype=torch.float32) - 7.5) * 2 + 24.5
    assert torch.allclose(sampled[0, 0, 5, 6], expected, atol=1e-4)
    wide = to_network(ramp, (10, 12, 40), network_ratios(image, (10, 12, 40), spacing_mm=2.0))
    assert float(wide[0, 0, 5, 6, 0]) == 0.0 and float(wide[0, 0, 5, 6, 20]) > 0


def test_inverse_composed_with_forward_is_identity(awkward_pair, known_result):
    fixed, moving = awkward_pair
    points = image_points(fixed, interior_indices(fixed, 1500, margin=8))
    forward = np.array([known_result.transform.TransformPoint(p.tolist()) for p in points])
    inside = np.array([np.all((np.array(moving.TransformPhysicalPointToContinuousIndex(q.tolist())) > 2)
                              & (np.array(moving.TransformPhysicalPointToContinuousIndex(q.tolist())) < np.array(moving.GetSize()) - 3))
                       for q in forward])
    assert inside.mean() > 0.3
    back = np.array([known_result.inverse_transform.TransformPoint(q.tolist()) for q in forward[inside]])
    error_in_voxels = np.linalg.norm(back - points[inside], axis=1) / min(fixed.GetSpacing())
    assert error_in_voxels.max() <= 0.5, error_in_voxels.max()


def test_itk_reads_our_transform_files_and_agrees(tmp_path, awkward_pair, known_result):
    fixed, moving = awkward_pair
    h5, nifti, nrrd = tmp_path / "t.h5", tmp_path / "t.nii.gz", tmp_path / "t.nrrd"
    for path in (h5, nifti, nrrd):
        write_transform(known_result.transform, path)
    from_h5 = sitk.ReadTransform(str(h5))
    resampled = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, from_h5, sitk.sitkLinear, -1024.0, sitk.sitkFloat32))
    ours = sitk.GetArrayFromImage(known_result.warped)
    nrms = np.sqrt(np.mean((resampled - ours) ** 2)) / (ours.max() - ours.min())
    assert nrms <= 0.01
    points = image_points(fixed, interior_indices(fixed, 200, seed=1))
    for path in (nifti, nrrd):
        other = read_transform(path)
        for p in points:
            assert np.allclose(other.TransformPoint(p.tolist()), from_h5.TransformPoint(p.tolist()), atol=1e-4)


def test_metrics_are_reported(known_result):
    metrics = known_result.metrics
    assert metrics["folding_percent"] == 0.0
    assert -1.0 <= metrics["lncc_before"] <= 1.0 and -1.0 <= metrics["lncc_after"] <= 1.0
    assert metrics["device"] == "cpu" and metrics["seconds"] > 0
    determinant = sitk.GetArrayFromImage(known_result.jacobian)
    assert 0.8 < float(np.median(determinant)) < 1.2


class IdentityModel(nn.Module):
    input_shape = (40, 40, 40)

    def forward(self, moving, fixed):
        from carlreg.maps import identity_map

        return identity_map(self.input_shape).expand(moving.shape[0], -1, -1, -1, -1)


def test_identity_warps_a_label_map_onto_itself(tmp_path):
    image = sitk.ReadImage(str(shared_data_path("totalsegmentator_examples", "example_ct.nii.gz")))
    labels = sitk.ReadImage(str(shared_data_path("totalsegmentator_examples", "example_ct_seg_total_v1.nii.gz")))
    result = register(image, image, IdentityModel(), modality="ct", device="cpu", moving_labels=labels, fixed_labels=labels)
    warped = result.warped_labels
    assert warped.GetPixelID() == labels.GetPixelID()
    assert set(np.unique(sitk.GetArrayViewFromImage(warped))) == set(np.unique(sitk.GetArrayViewFromImage(labels)))
    assert result.metrics["dice_after"] == 1.0
    assert np.abs(sitk.GetArrayViewFromImage(result.transform.GetDisplacementField())).max() < 1e-3  # mm; float32 maps


def _write(image: sitk.Image, path):
    sitk.WriteImage(image, str(path))
    return str(path)


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "carlreg", "register", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def identity_checkpoint(tmp_path_factory):
    """A tiny CARL network saved with its model card: a model file the command line can load."""
    from carlreg import build_carl

    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = build_carl(3, (40, 40, 40), width=0.125)
    torch.save(model.state_dict(), folder / "tiny.pt")
    card = {"architecture": {"dimension": 3, "input_shape": [40, 40, 40], "width": 0.125}}
    (folder / "tiny.json").write_text(json.dumps(card))
    return folder / "tiny.pt"


def test_the_command_line_lists_its_commands_and_refuses_a_missing_or_unknown_one(capsys):
    """``python -m carlreg --help`` says what each command does (training and the demo included);
    no command or an unknown one exits 2 with one line saying which commands there are."""
    from carlreg.cli import main

    listed = subprocess.run([sys.executable, "-m", "carlreg", "--help"], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    commands = listed.stdout.split("commands:\n")[1].splitlines()
    assert [line.split()[0] for line in commands] == ["register", "warp", "models", "train", "demo"]
    assert "register a moving image to a fixed image (carl-register)" in commands[0]
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "name a command: register, warp, models (--help says what each does)")
    with pytest.raises(SystemExit) as exited:
        main(["bogus"])
    assert exited.value.code == 2
    refusal = capsys.readouterr().err.strip().splitlines()[-1]  # argparse's wording varies with the Python
    assert "invalid choice: 'bogus'" in refusal and all(name in refusal for name in ("register", "warp", "models"))


def test_without_a_model_the_default_is_named_or_the_models_are_listed(tmp_path, capsys):
    """The command's process for a registration; its refusals and ``carlreg models`` through the
    command's functions in this process (the same code, a process each saved)."""
    from carlreg.cli import main, register_main

    rng = np.random.default_rng(0)
    volume = [_write(sitk.GetImageFromArray(rng.random((40, 40, 40)).astype(np.float32)), tmp_path / f"{n}.nii.gz") for n in "mf"]
    completed = _run_cli("--moving", volume[0], "--fixed", volume[1], "--out-transform", tmp_path / "t.h5", "--device", "cpu")
    assert completed.returncode == 0, completed.stderr
    assert "no --model given: using carl-brain-3d, the default for 3-D images" in completed.stderr
    assert sitk.ReadTransform(str(tmp_path / "t.h5")).GetDimension() == 3
    flat = [_write(sitk.GetImageFromArray(rng.random((40, 40)).astype(np.float32)), tmp_path / f"{n}.nii.gz") for n in "ab"]
    capsys.readouterr()
    assert register_main(["--moving", flat[0], "--fixed", flat[1], "--out-transform", str(tmp_path / "t2.h5")]) == 2
    assert not (tmp_path / "t2.h5").exists()
    assert capsys.readouterr().err.strip() == ("carl-register: no default model for 2-D images: name one with --model "
                                               "(carl-retina-2d, unet-retina-2d; --list-models describes them)")
    assert register_main(["--moving", volume[0]]) == 2
    assert capsys.readouterr().err.strip() == "carl-register: missing --fixed, --out-transform (carl-register --help lists the options)"
    assert main(["models"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:3] == ["NAME", "DIMENSION", "INPUT"]
    assert any(row.startswith("carl-brain-3d") and "64 × 72 × 64 at 3 mm" in row and "brain MR" in row for row in rows)
    assert rows[-1] == "default without --model: carl-brain-3d for 3-D images"


@pytest.mark.parametrize(
    "case, message",
    [
        ("4d", "must be 2-D or 3-D, got 4-D"),
        ("vector", "must be a scalar image, got 3 components"),
        ("zeros", "is constant (0 everywhere)"),
        ("nan", "has NaN or infinite values"),
        ("missing", "moving image not found"),
        ("2d", "moving image is 2-D, the model registers 3-D images"),
        ("unwritable", "output folder does not exist"),
        ("overwrite", "is also an input: refusing to overwrite it"),
    ],
)
def test_bad_input_gives_one_line_and_no_output(tmp_path, capsys, identity_checkpoint, case, message):
    """carl-register's own function in this process (the same code as the command, whose process
    the other tests run): a non-zero status, one line on stderr, no warning, no file written."""
    from carlreg.cli import register_main

    good = sitk.GetImageFromArray(np.random.default_rng(0).random((40, 40, 40)).astype(np.float32))
    fixed = _write(good, tmp_path / "fixed.nii.gz")
    moving = {
        "4d": lambda: _write(sitk.GetImageFromArray(np.ones((2, 5, 6, 7), np.float32), isVector=False), tmp_path / "m.nii.gz"),
        "vector": lambda: _write(sitk.GetImageFromArray(np.ones((5, 6, 7, 3), np.float32), isVector=True), tmp_path / "m.nii.gz"),
        "zeros": lambda: _write(sitk.GetImageFromArray(np.zeros((40, 40, 40), np.float32)), tmp_path / "m.nii.gz"),
        "nan": lambda: _write(sitk.GetImageFromArray(np.full((40, 40, 40), np.nan, np.float32)), tmp_path / "m.mha"),
        "missing": lambda: str(tmp_path / "absent.nii.gz"),
        "2d": lambda: _write(sitk.GetImageFromArray(np.random.default_rng(1).random((40, 40)).astype(np.float32)), tmp_path / "m.nii.gz"),
    }.get(case, lambda: _write(good, tmp_path / "m.nii.gz"))()
    out = tmp_path / "out" / "t.h5" if case == "unwritable" else tmp_path / "t.h5"
    warped = fixed if case == "overwrite" else tmp_path / "w.nii.gz"
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = register_main([str(a) for a in ("--moving", moving, "--fixed", fixed, "--model", identity_checkpoint,
                                               "--out-transform", out, "--out-warped", warped, "--progress", "none")])
    stderr = capsys.readouterr().err
    assert code != 0 and not caught, [str(w.message) for w in caught]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_command_line_end_to_end_on_the_monai_pair(tmp_path, identity_checkpoint):
    folder = shared_data_path("tiny_fixtures", "monai_anatomical_pair")
    outputs = {name: tmp_path / name for name in ("t.h5", "w.nii.gz", "inv.nrrd", "jac.nii.gz", "wl.nii.gz", "s.json", "r.png")}
    completed = _run_cli(
        "--moving", folder / "reoriented_anat_moved.nii", "--fixed", folder / "anatomical.nii",
        "--moving-labels", folder / "reoriented_anat_moved_label.nii.gz", "--fixed-labels", folder / "anatomical_label.nii.gz",
        "--model", identity_checkpoint, "--out-transform", outputs["t.h5"], "--out-warped", outputs["w.nii.gz"],
        "--out-inverse", outputs["inv.nrrd"], "--out-jacobian", outputs["jac.nii.gz"],
        "--out-warped-labels", outputs["wl.nii.gz"], "--summary", outputs["s.json"], "--report", outputs["r.png"],
        "--progress", "json",
    )
    assert completed.returncode == 0, completed.stderr
    assert all(path.is_file() for path in outputs.values())
    summary = json.loads(outputs["s.json"].read_text())
    assert {"lncc_before", "lncc_after", "folding_percent", "dice_before", "dice_after", "seconds"} <= set(summary)
    events = [json.loads(line) for line in completed.stdout.splitlines()]
    assert {"stage", "step", "total", "fraction", "eta_s", "message"} <= set(events[0])
    assert events[-1]["stage"] == "done"
    fixed = sitk.ReadImage(str(folder / "anatomical.nii"))
    warped = sitk.ReadImage(str(outputs["w.nii.gz"]))
    assert warped.GetSize() == fixed.GetSize() and np.allclose(warped.GetDirection(), fixed.GetDirection())
    assert not list(tmp_path.glob(".*partial*"))
    # carl-warp applies the saved transform: the same label map as carl-register wrote
    rewarped = tmp_path / "rewarped.nii.gz"
    completed = subprocess.run(
        [sys.executable, "-m", "carlreg", "warp", "--transform", outputs["t.h5"], "--labels",
         "--input", folder / "reoriented_anat_moved_label.nii.gz", "--reference", folder / "anatomical.nii", "--out", rewarped],
        capture_output=True, text=True,
    )
    assert completed.returncode == 0, completed.stderr
    first, second = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (outputs["wl.nii.gz"], rewarped))
    # the same field, once in memory and once read back from the file: a voxel on a label boundary
    # may round the other way, nothing more
    assert np.count_nonzero(first != second) <= 1e-2 * np.count_nonzero(first) and np.count_nonzero(first) > 300


def test_ants_applies_our_displacement_field_and_agrees(tmp_path, awkward_pair, known_result):
    ants = require_module("ants")
    fixed, moving = awkward_pair
    sitk.WriteImage(fixed, str(tmp_path / "fixed.nii.gz"))
    sitk.WriteImage(moving, str(tmp_path / "moving.nii.gz"))
    write_transform(known_result.transform, tmp_path / "field.nii.gz")
    warped = ants.apply_transforms(
        fixed=ants.image_read(str(tmp_path / "fixed.nii.gz")),
        moving=ants.image_read(str(tmp_path / "moving.nii.gz")),
        transformlist=[str(tmp_path / "field.nii.gz")],
        interpolator="linear",
        defaultvalue=-1024.0,
    )
    ants_array = warped.numpy().transpose(2, 1, 0)  # ANTs arrays are (x, y, z)
    ours = sitk.GetArrayFromImage(known_result.warped)
    nrms = np.sqrt(np.mean((ants_array - ours) ** 2)) / (ours.max() - ours.min())
    assert nrms <= 0.01, nrms


def test_landmark_error_of_a_known_shift_in_three_file_formats(tmp_path):
    """The MNI template and a copy moved 25 mm: the identity network map is exactly that shift."""
    from carlreg.landmarks import read_landmarks

    fixed = sitk.ReadImage(str(shared_data_path("brain_templates", "antspy", "mni.nii.gz")), sitk.sitkFloat32)
    fixed_landmarks = shared_data_path("brain_templates", "afids", "tpl-MNI152NLin6Asym_afids.fcsv")
    moving = sitk.Image(fixed)
    shift_lps = np.array([25.0, -10.0, 5.0])
    moving.SetOrigin((np.array(fixed.GetOrigin()) + shift_lps).tolist())
    landmarks = read_landmarks(fixed_landmarks)
    assert len(landmarks.labels) == 32
    moved = landmarks.points_lps + shift_lps
    # the moving landmarks as Slicer .mrk.json in RAS, and as CSV in LPS
    mrk = {"markups": [{"coordinateSystem": "RAS", "controlPoints": [
        {"label": label, "position": (p * [-1, -1, 1]).tolist()} for label, p in zip(landmarks.labels, moved)]}]}
    (tmp_path / "moving.mrk.json").write_text(json.dumps(mrk))
    (tmp_path / "moving.csv").write_text("label,x,y,z\n" + "".join(
        f"{label},{p[0]},{p[1]},{p[2]}\n" for label, p in zip(landmarks.labels, moved)))
    for moving_landmarks, system in ((tmp_path / "moving.mrk.json", None), (tmp_path / "moving.csv", "LPS")):
        result = register(moving, fixed, IdentityModel(), modality="mr", device="cpu",
                          fixed_landmarks=fixed_landmarks, moving_landmarks=moving_landmarks,
                          landmarks_coordinate_system=system, field_spacing_mm=4.0)
        assert result.metrics["landmarks"] == 32
        assert result.metrics["tre_before_mean_mm"] == pytest.approx(np.linalg.norm(shift_lps), abs=1e-6)
        assert result.metrics["tre_after_max_mm"] < 0.01
    with pytest.raises(ValueError, match="state its coordinate system"):
        read_landmarks(tmp_path / "moving.csv")


def test_a_field_over_both_extents_keeps_the_fixed_part_and_covers_the_moving_image():
    """``field_extent="both"``: the same field on the fixed image's lattice, grown over the moving
    image (here moved 60 mm up, beyond the fixed image); the warped image and the folding are those
    of the fixed-extent field."""
    from carlreg.pipeline import register

    folder = shared_data_path("tiny_fixtures", "monai_anatomical_pair")
    fixed = sitk.ReadImage(str(folder / "anatomical.nii"))
    moving = sitk.ReadImage(str(folder / "reoriented_anat_moved.nii"))
    moving.SetOrigin((np.array(moving.GetOrigin()) + [0.0, 0.0, 60.0]).tolist())
    results = {extent: register(moving, fixed, "carl-brain-3d", modality="mr", device="cpu", field_extent=extent)
               for extent in ("fixed", "both")}
    small = results["fixed"].transform.GetDisplacementField()
    large = results["both"].transform.GetDisplacementField()
    assert large.GetSpacing() == small.GetSpacing() and large.GetDirection() == small.GetDirection()
    for corner in np.array(np.meshgrid(*[[0, n - 1] for n in moving.GetSize()], indexing="ij")).reshape(3, -1).T:
        index = large.TransformPhysicalPointToContinuousIndex(moving.TransformIndexToPhysicalPoint([int(c) for c in corner]))
        assert all(-1e-6 <= i <= n - 1 + 1e-6 for i, n in zip(index, large.GetSize()))
    offset = large.TransformPhysicalPointToIndex(small.GetOrigin())[::-1]
    part = tuple(slice(o, o + n) for o, n in zip(offset, small.GetSize()[::-1]))
    assert np.allclose(sitk.GetArrayViewFromImage(large)[part], sitk.GetArrayViewFromImage(small), atol=1e-6)
    assert np.prod(large.GetSize()) > 1.5 * np.prod(small.GetSize())
    assert np.allclose(sitk.GetArrayViewFromImage(results["both"].warped), sitk.GetArrayViewFromImage(results["fixed"].warped), atol=1e-4)
    assert results["both"].metrics["folding_percent"] == pytest.approx(results["fixed"].metrics["folding_percent"], abs=1e-9)
    # no overlap before registration: the unregistered moving image is empty on the fixed grid
    assert results["both"].metrics["lncc_before"] == 0.0 < results["both"].metrics["lncc_after"]
    with pytest.raises(ValueError, match="register\\(\\): field_extent must be 'fixed' or 'both', got 'moving'"):
        register(moving, fixed, "carl-brain-3d", field_extent="moving")


def test_a_field_splits_into_its_affine_part_and_a_residual(tmp_path, capsys):
    """A known affine map plus a smooth residual on a real image's grid: the affine part is found,
    and the composite maps the grid's points as the field does; the command line writes it."""
    from carlreg.affine import affine_part, decompose
    from carlreg.cli import register_main

    folder = shared_data_path("tiny_fixtures", "monai_anatomical_pair")
    fixed = sitk.ReadImage(str(folder / "anatomical.nii"))
    truth = sitk.AffineTransform(3)
    truth.SetMatrix([1.05, 0.03, 0.0, -0.02, 0.97, 0.04, 0.01, 0.0, 1.02])
    truth.SetTranslation([4.0, -7.0, 12.0])
    field = sitk.TransformToDisplacementField(truth, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(),
                                              fixed.GetSpacing(), fixed.GetDirection())
    matrix, translation = affine_part(field)
    assert np.allclose(matrix, np.array(truth.GetMatrix()).reshape(3, 3), atol=1e-9)
    assert np.allclose(translation, truth.GetTranslation(), atol=1e-7)
    wavy = sitk.GetArrayFromImage(field)
    z = np.linspace(0, np.pi, wavy.shape[0])[:, None, None]
    wavy[..., 0] += 2.0 * np.sin(z)
    bent = sitk.GetImageFromArray(wavy, isVector=True)
    bent.CopyInformation(field)
    composite = decompose(bent)
    reference = sitk.DisplacementFieldTransform(sitk.Image(bent))
    points = [fixed.TransformIndexToPhysicalPoint([i, j, k]) for i, j, k in [(0, 0, 0), (5, 9, 3), (20, 30, 12), (32, 40, 24)]]
    for point in points:
        assert np.allclose(composite.TransformPoint(point), reference.TransformPoint(point), atol=1e-6)
    # carl-register's function in this process (its process: the other command-line tests)
    pair = ["--moving", str(folder / "reoriented_anat_moved.nii"), "--fixed", str(folder / "anatomical.nii")]
    assert register_main(pair + ["--model", "carl-brain-3d", "--device", "cpu", "--progress", "none",
                                 "--out-transform", str(tmp_path / "t.h5"), "--out-affine", str(tmp_path / "a.h5")]) == 0
    written = sitk.CompositeTransform(sitk.ReadTransform(str(tmp_path / "a.h5")))
    assert written.GetNumberOfTransforms() == 2 and written.GetNthTransform(0).GetName() == "AffineTransform"
    capsys.readouterr()
    assert register_main(pair + ["--out-transform", str(tmp_path / "t2.h5"), "--out-affine", str(tmp_path / "a.nii.gz")]) == 2
    assert "--out-affine expects an ITK transform file" in capsys.readouterr().err


def test_the_demo_reruns_in_its_own_folder_and_refuses_others(tmp_path, monkeypatch, capsys):
    """``carlreg demo``'s folder rules, with stand-ins for the pair and for carl-register (the real
    run: Testing/test_packaging.py): a second run in its own folder, no run in a folder holding
    other files or with an unknown model, and nothing written before a refusal."""
    from carlreg import demo

    calls = []

    def pair(folder):
        calls.append(("pair", folder))
        folder.mkdir(parents=True, exist_ok=True)
        return folder / "moving.nii.gz", folder / "fixed.nii.gz"

    def register_main(argv):
        calls.append(("register", argv))
        figures = dict.fromkeys(("seconds", "lncc_before", "lncc_after", "folding_percent"), 0.0)
        Path(dict(zip(argv[::2], argv[1::2]))["--summary"]).write_text(json.dumps(dict(figures, device="cpu")))
        return 0

    monkeypatch.setattr(demo, "make_demo_pair", pair)
    monkeypatch.setattr(demo, "register_main", register_main)
    out = tmp_path / "demo"
    for _ in range(2):
        assert demo.demo_main(["--out", str(out), "--device", "cpu", "--progress", "none"]) == 0
    assert [kind for kind, _ in calls] == ["pair", "register"] * 2
    options = dict(zip(calls[1][1][::2], calls[1][1][1::2]))
    assert (options["--moving"], options["--fixed"], options["--model"]) == (
        str(out / "moving.nii.gz"), str(out / "fixed.nii.gz"), "carl-brain-3d")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert demo.demo_main(["--out", str(other)]) == 2 and "holds other files" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    assert demo.demo_main(["--model", "no-such-model", "--out", str(tmp_path / "new")]) == 2
    assert "no model named 'no-such-model'" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and len(calls) == 4
