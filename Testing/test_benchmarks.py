"""The benchmarks' ground truth: what bench/ scripts measure against is what they claim."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import load_bench, shared_data_path


def test_known_warp_truth_is_the_inverse_of_the_warp_that_made_the_moving_image(tmp_path):
    """The exact fixed → moving transform (T⁻¹, by inverting T's field) scores ~0 mm; the identity
    scores the displacement T applies, which is of the size asked for."""
    shared_data_path("totalsegmentator_examples", "example_ct.nii.gz")
    known_warp = load_bench("known_warp")
    fixed = sitk.Cast(sitk.ReadImage(str(known_warp.CT)), sitk.sitkFloat32)
    _, x, y = known_warp.make_case(fixed, 0, tmp_path)
    field = sitk.TransformToDisplacementField(known_warp.known_transform(fixed, 0), sitk.sitkVectorFloat64, fixed.GetSize(),
                                              fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection())
    exact = sitk.DisplacementFieldTransform(sitk.InvertDisplacementField(field, maximumNumberOfIterations=50))
    errors = np.linalg.norm(np.array([exact.TransformPoint(p.tolist()) for p in y]) - x, axis=1)
    assert np.median(errors) < 0.05 and errors.mean() < 0.5
    moved = np.linalg.norm(y - x, axis=1)
    assert 5.0 < moved.mean() < np.sqrt(3) * known_warp.TRANSLATION_MM + 4 * known_warp.DEFORMATION_MM


def test_brain_sweep_pairs_are_centroid_aligned_then_shifted(tmp_path):
    shared_data_path("synthseg_label_maps")
    brain = load_bench("brain")
    original_moving = brain.label_map_image(brain.LABEL_MAPS / "training_seg_19.nii.gz", brain.SHAPE, brain.SPACING_MM)
    for shift, placement in (([0.0, 0.0, 0.0], "fixed"), ([0.0, -30.0, 0.0], "split"), ([0.0, 0.0, 60.0], "fixed"),
                             ([-20.0, 0.0, 0.0], "together")):
        folder = tmp_path / f"{placement}{shift[0] + shift[1] + shift[2]}"
        folder.mkdir()
        fixed_shift, moving_shift = brain.placement_shifts(shift, placement)
        moving, fixed = brain.make_pairs(folder, fixed_shift, moving_shift_mm=moving_shift)[0]
        moving_labels, fixed_labels = sitk.ReadImage(str(moving["labels"])), sitk.ReadImage(str(fixed["labels"]))
        offset = brain._brain_centroid(fixed_labels) - brain._brain_centroid(moving_labels)
        # the offset between the two is the shift, none when they move together; at 60 mm part of
        # the head leaves the field of view, which moves the centroid a little
        expected = [0.0, 0.0, 0.0] if placement == "together" else shift
        assert np.allclose(offset, expected, atol=1.0 if max(map(abs, shift)) < 60 else 4.0), (shift, placement, offset)
        moved = brain._brain_centroid(moving_labels) - brain._brain_centroid(original_moving)
        assert np.allclose(moved, {"fixed": [0.0] * 3, "split": np.multiply(shift, -0.5), "together": shift}[placement], atol=1.0)
        if not any(shift):  # aligned by moving the grid, not by resampling: the voxels are the scan's own
            original = brain.label_map_image(brain.LABEL_MAPS / "training_seg_20.nii.gz", brain.SHAPE, brain.SPACING_MM)
            assert (sitk.GetArrayFromImage(fixed_labels) == sitk.GetArrayFromImage(original)).all()
            aligned = sitk.GetArrayFromImage(fixed_labels)
            aligned_centre = fixed_labels.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed_labels.GetSize()])
    # uncut: the fixed grid grown by the shift on both sides keeps every brain voxel of the aligned
    # fixed image, 60 mm away, and its centre (the cut sweep above loses part of the head)
    for shift in ([0.0, 0.0, 60.0], [0.0, 60.0, 0.0], [-60.0, 0.0, 0.0]):
        folder = tmp_path / f"uncut{shift}"
        folder.mkdir()
        moving, fixed = brain.make_pairs(folder, shift, uncut=True)[0]
        moving_labels, fixed_labels = sitk.ReadImage(str(moving["labels"])), sitk.ReadImage(str(fixed["labels"]))
        grown = sitk.GetArrayFromImage(fixed_labels)
        assert grown.size == aligned.size * 188 // 128, (shift, fixed_labels.GetSize())
        centre = fixed_labels.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed_labels.GetSize()])
        assert np.allclose(centre, aligned_centre, atol=1e-6), (centre, aligned_centre)
        assert ((grown > 0) & (grown < brain.BRAIN_LABEL_LIMIT)).sum() == ((aligned > 0) & (aligned < brain.BRAIN_LABEL_LIMIT)).sum()
        offset = brain._brain_centroid(fixed_labels) - brain._brain_centroid(moving_labels)
        assert np.allclose(offset, shift, atol=1.0), (shift, offset)
    with pytest.raises(ValueError, match="placement must be one of"):
        brain.placement_shifts([0.0, 0.0, 0.0], "both")


def test_checkpoints_are_judged_on_validation_pairs_never_on_the_test_pair(tmp_path):
    """bench/checkpoints.py's pairs are validation subjects, made as the sweep makes the test pair:
    the moving image the subject's own label map, the fixed one moved by the sweep's shift."""
    shared_data_path("synthseg_label_maps")
    from carlreg.data import SPLITS

    checkpoints, brain = load_bench("checkpoints"), load_bench("brain")
    assert checkpoints.PAIRS and all(set(pair) <= set(SPLITS["validation"]) - set(SPLITS["test"]) for pair in checkpoints.PAIRS)
    assert brain.sweep_shift(0, 60) == [-60.0, 0.0, 0.0] and brain.sweep_shift(2, 60) == [0.0, 0.0, 60.0]
    moving, fixed = brain.make_pairs(tmp_path, brain.sweep_shift(2, 30), subjects=checkpoints.PAIRS[0])[0]
    assert (moving["subject"], fixed["subject"]) == checkpoints.PAIRS[0]
    moving_labels, fixed_labels = sitk.ReadImage(str(moving["labels"])), sitk.ReadImage(str(fixed["labels"]))
    original = brain.label_map_image(brain.LABEL_MAPS / f"training_seg_{moving['subject']:02d}.nii.gz", brain.SHAPE, brain.SPACING_MM)
    assert (sitk.GetArrayFromImage(moving_labels) == sitk.GetArrayFromImage(original)).all()
    offset = brain._brain_centroid(fixed_labels) - brain._brain_centroid(moving_labels)
    assert np.allclose(offset, [0.0, 0.0, 30.0], atol=1.0), offset
    # each checkpoint's Dice over all brain structures and over the deep grey ones alone
    assert brain._dice(fixed_labels, fixed_labels) == {"dice": 1.0, "dice_deep": 1.0}
    array = sitk.GetArrayFromImage(fixed_labels)
    without_deep = sitk.GetImageFromArray(np.where(np.isin(array, brain.DEEP_GREY), 0, array))
    without_deep.CopyInformation(fixed_labels)
    figures = brain._dice(without_deep, fixed_labels)
    assert figures["dice_deep"] == 0.0 and 0.5 < figures["dice"] < 1.0


def test_equivariance_error_is_zero_for_an_equivariant_map_and_the_shift_for_one_that_ignores_it():
    """bench/equivariance.py's yardstick: |φ'(x) − φ(x − u)| over the brain voxels that stay in the box."""
    import torch

    from carlreg.maps import identity_map

    equivariance = load_bench("equivariance")
    shape, spacing_mm = (16, 18, 16), 3.0
    unit_mm = torch.tensor([(n - 1) * spacing_mm for n in shape])
    generator = torch.Generator().manual_seed(0)
    phi = identity_map(shape) + 0.05 * torch.randn((1, 3) + shape, generator=generator)
    mask = torch.zeros((1, 1) + shape, dtype=torch.bool)
    mask[..., 3:12, 4:14, 3:12] = True
    for axis in range(3):
        for voxels in (1, 3):
            moved = equivariance.shifted(phi, axis, voxels)
            assert equivariance.equivariance_error_mm(phi, moved, mask, axis, voxels, unit_mm).max() < 1e-5
            ignored = equivariance.equivariance_error_mm(identity_map(shape), identity_map(shape), mask, axis, voxels, unit_mm)
            assert np.allclose(ignored, voxels * spacing_mm, atol=1e-4)
            assert ignored.size == mask.narrow(2 + axis, 0, shape[axis] - voxels).sum()


def test_a_sweep_rerun_for_new_weights_keeps_the_peers_committed_rows():
    """``--keep none,ants,elastix``: their rows come from the committed CSV, as numbers, one per axis
    and shift, with the date of the run that measured them; our own rows cannot be kept."""
    brain = load_bench("brain")
    rows, date = brain.kept_rows("brain_sweep", ["ants", "elastix"])
    # the committed sweep kept its peers' rows from their run of 2026-11-25: that date carries on
    assert date == "2026-11-25"
    assert len(rows) == 2 * 3 * 7 and {row["method"] for row in rows} == {"ants", "elastix"}
    ants_x = [row for row in rows if row["method"] == "ants" and row["axis"].startswith("x")]
    assert [row["shift_mm"] for row in ants_x] == list(brain.SWEEP_SHIFTS_MM)
    assert all(isinstance(row["dice"], float) and 0.5 < row["dice"] < 0.7 for row in ants_x)
    with pytest.raises(SystemExit, match="do not depend on our weights"):
        brain.kept_rows("brain_sweep", ["ours"])
