"""The module's Logic and Widget end to end on Slicer's own core (the ``slicer-core`` wheel).

The scene, nodes, module logics, storage nodes and ``slicer.util`` are Slicer's real ones;
Testing/slicer_shim adds only what the wheel lacks (``slicer.app`` and its IO manager on the real
logics, ScriptedLoadableModule, parameterNodeWrapper, qt). A real worker process runs the real engine.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import unittest
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import vtk

from conftest import REPO, require_module, shared_data_path

SHIM = Path(__file__).parent / "slicer_shim"
MODULE_DIR = REPO / "CARLRegistration"
if sys.version_info < (3, 10):
    pytest.skip("slicer-core has no wheel for Python 3.9", allow_module_level=True)
sys.path[:0] = [str(SHIM), str(MODULE_DIR)]
require_module("slicer_core")

import slicer_app  # noqa: E402

slicer = slicer_app.install()
import CARLRegistration as module  # noqa: E402


#: LPS ↔ RAS (files and ITK are LPS, the scene RAS)
LPS_RAS = np.diag([-1.0, -1.0, 1.0])


def _points_inside(volume, count: int) -> np.ndarray:
    """``count`` RAS points at random inside ``volume``'s grid, between its voxel centres."""
    dimensions = np.array(volume.GetImageData().GetDimensions())
    ijk = np.random.default_rng(0).uniform(1.0, dimensions - 2.0, size=(count, 3))
    return (_ijk_to_ras(volume) @ np.c_[ijk, np.ones(count)].T).T[:, :3]


def _data_nodes() -> int:
    """Nodes of the scene other than display and storage nodes."""
    scene = slicer.mrmlScene
    return sum(1 for i in range(scene.GetNumberOfNodes())
               if not scene.GetNthNode(i).IsA("vtkMRMLDisplayNode") and not scene.GetNthNode(i).IsA("vtkMRMLStorageNode"))


def _interior(image: sitk.Image) -> sitk.Image:
    """A mask on ``image``'s grid: 1 inside, 0 on its outer voxel layer."""
    mask = np.zeros(image.GetSize()[::-1], np.uint8)
    mask[1:-1, 1:-1, 1:-1] = 1
    result = sitk.GetImageFromArray(mask)
    result.CopyInformation(image)
    return result


def _ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from carlreg import build_carl

    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = build_carl(3, (40, 40, 40), width=0.125)
    with torch.no_grad():  # non-zero output layers, so that the maps are not the identity
        for name, parameter in model.named_parameters():
            if "lastConv" in name:
                parameter.normal_(std=0.02)
    torch.save(model.state_dict(), folder / "tiny.pt")
    (folder / "tiny.json").write_text(json.dumps({"architecture": {"dimension": 3, "input_shape": [40, 40, 40], "width": 0.125}}))
    return folder / "tiny.pt"


@pytest.fixture()
def scene_pair():
    slicer.mrmlScene.Clear()
    folder = shared_data_path("tiny_fixtures", "monai_anatomical_pair")
    moving = slicer.util.loadVolume(str(folder / "reoriented_anat_moved.nii"))
    fixed = slicer.util.loadVolume(str(folder / "anatomical.nii"))
    return moving, fixed, folder


def _snapshot(node):
    """An input node as the user has it: voxels, geometry, name, parent transform, and its storage
    (file name and whether it differs from that file: what saving the scene relies on)."""
    storage = node.GetStorageNode()
    return (slicer.util.arrayFromVolume(node).copy(), np.array(_ijk_to_ras(node)), node.GetName(), node.GetTransformNodeID(),
            storage.GetFileName() if storage else None, node.GetModifiedSinceRead())


def _assert_unchanged(nodes, snapshots):
    for node, snapshot in zip(nodes, snapshots):
        now = _snapshot(node)
        assert np.array_equal(now[0], snapshot[0]) and np.array_equal(now[1], snapshot[1]), node.GetName()
        assert now[2:] == snapshot[2:], node.GetName()


def _run(logic, **kwargs):
    logic.start(**kwargs)
    folder = logic.folder
    events, deadline = [], time.monotonic() + 120
    while logic.isRunning() and time.monotonic() < deadline:
        events += logic.poll()
        time.sleep(0.05)
    return folder, events


def test_module_file_imports_without_torch():
    code = (
        f"import sys; sys.path[:0] = [{str(SHIM)!r}, {str(MODULE_DIR)!r}]; import slicer_app; slicer_app.install(); "
        "import CARLRegistration; "
        "print('torch' in sys.modules, 'carlreg' in sys.modules)"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["False", "False"]


def test_registration_end_to_end_matches_the_engine(tmp_path, scene_pair, tiny_model):
    moving, fixed, folder = scene_pair
    before = [_snapshot(moving), _snapshot(fixed)]
    logic = module.CARLRegistrationLogic()
    work_folder, events = _run(logic, movingVolume=moving, fixedVolume=fixed, model=str(tiny_model), device="cpu")
    assert events and events[-1]["stage"] == "done"
    result = logic.finish()
    assert not os.path.exists(work_folder)

    transform, warped = result["transform"], result["warped"]
    assert isinstance(transform, slicer.vtkMRMLGridTransformNode)
    assert transform.GetNodeReferenceID(slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole()) == moving.GetID()
    assert transform.GetNodeReferenceID(slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole()) == fixed.GetID()
    assert warped.GetImageData().GetDimensions() == fixed.GetImageData().GetDimensions()
    assert np.allclose(_ijk_to_ras(warped), _ijk_to_ras(fixed), atol=1e-6)
    for composite in slicer_app.slice_composite_nodes():  # every slice view: fixed, warped at 50 % over it
        assert (composite.GetBackgroundVolumeID(), composite.GetForegroundVolumeID()) == (fixed.GetID(), warped.GetID())
        assert composite.GetForegroundOpacity() == 0.5
    display = transform.GetDisplayNode()
    assert display.GetVisualizationMode() == slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID
    assert display.GetRegionNode() is fixed and display.GetVisibility() and display.GetVisibility2D()
    _assert_unchanged((moving, fixed), before)  # inputs untouched, their storage too

    # the engine on the original files: its transform is the scene's, between voxel centres too
    reference = tmp_path / "engine.h5"
    completed = subprocess.run(
        [sys.executable, "-m", "carlreg", "register", "--moving", folder / "reoriented_anat_moved.nii",
         "--fixed", folder / "anatomical.nii", "--model", tiny_model, "--device", "cpu",
         "--out-transform", reference, "--out-warped", tmp_path / "engine.nii.gz", "--progress", "none"],
        capture_output=True, text=True,
    )
    assert completed.returncode == 0, completed.stderr
    engine = sitk.DisplacementFieldTransform(sitk.ReadTransform(str(reference)))
    points_ras = _points_inside(fixed, 2000)
    scene_mapped = np.array([transform.GetTransformFromParent().TransformPoint(p) for p in points_ras])
    engine_mapped = np.array([LPS_RAS @ engine.TransformPoint((LPS_RAS @ p).tolist()) for p in points_ras])
    assert np.abs(engine_mapped - points_ras).max() > 0.5  # a real deformation, not the identity
    # Slicer interpolates a loaded grid transform cubically unless told otherwise; ITK linearly
    assert np.abs(scene_mapped - engine_mapped).max() <= 1e-3


def test_hardening_a_copy_of_the_moving_volume_reproduces_the_engine_warp(tmp_path, scene_pair):
    """With the shipped brain model (a smooth, invertible field: Slicer's resampling of a volume
    under a grid transform inverts it numerically)."""
    moving, fixed, folder = scene_pair
    logic = module.CARLRegistrationLogic()
    _run(logic, movingVolume=moving, fixedVolume=fixed, model="carl-brain-3d", modality="mr", device="cpu")
    transform = logic.finish()["transform"]
    completed = subprocess.run(
        [sys.executable, "-m", "carlreg", "register", "--moving", folder / "reoriented_anat_moved.nii",
         "--fixed", folder / "anatomical.nii", "--model", "carl-brain-3d", "--modality", "mr", "--device", "cpu",
         "--out-transform", tmp_path / "engine.h5", "--out-warped", tmp_path / "engine.nii.gz", "--progress", "none"],
        capture_output=True, text=True,
    )
    assert completed.returncode == 0, completed.stderr
    copy = slicer.modules.volumes.logic().CloneVolume(slicer.mrmlScene, moving, "hardened copy")
    copy.SetAndObserveTransformNodeID(transform.GetID())
    slicer.vtkSlicerTransformLogic.hardenTransform(copy)
    assert slicer.util.exportNode(copy, str(tmp_path / "hardened.nrrd"), properties={})
    # on the hardened copy's own grid, the engine's transform gives moving(φ(x)): one interpolation
    # each; compared where both are defined (x inside the field's grid, φ(x) inside the moving image)
    hardened = sitk.ReadImage(str(tmp_path / "hardened.nrrd"), sitk.sitkFloat32)
    engine = sitk.DisplacementFieldTransform(sitk.ReadTransform(str(tmp_path / "engine.h5")))
    moving_image = sitk.ReadImage(str(folder / "reoriented_anat_moved.nii"), sitk.sitkFloat32)
    expected = sitk.Resample(moving_image, hardened, engine, sitk.sitkLinear, np.nan)
    inside_moving = sitk.Resample(_interior(moving_image), hardened, engine, sitk.sitkNearestNeighbor, 0)
    inside_field = sitk.Resample(_interior(sitk.ReadImage(str(folder / "anatomical.nii"))), hardened,
                                 sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    both = (sitk.GetArrayFromImage(inside_moving) > 0) & (sitk.GetArrayFromImage(inside_field) > 0)
    both &= np.isfinite(sitk.GetArrayFromImage(expected))
    difference = sitk.GetArrayFromImage(hardened)[both] - sitk.GetArrayFromImage(expected)[both]
    assert both.sum() > 1000
    assert np.sqrt(np.mean(difference**2)) <= 0.01 * np.ptp(sitk.GetArrayFromImage(moving_image)), (
        np.sqrt(np.mean(difference**2)), np.ptp(sitk.GetArrayFromImage(moving_image)), both.sum())


def test_slicer_and_itk_apply_the_transform_alike_over_both_images(tmp_path, scene_pair, tiny_model):
    """The moving volume placed 40 mm above the fixed one: the transform's grid covers both, so that
    Slicer (which continues a grid transform with its border displacement) and ITK (which applies
    none outside the grid) map every point of the moving image's extent alike."""
    moving, fixed, _ = scene_pair
    matrix = _ijk_to_ras(moving)
    matrix[2, 3] += 40.0
    moving.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix))
    logic = module.CARLRegistrationLogic()
    _run(logic, movingVolume=moving, fixedVolume=fixed, model=str(tiny_model), device="cpu")
    transform = logic.finish()["transform"]
    assert slicer.util.exportNode(transform, str(tmp_path / "scene.h5"), properties={})
    itk = sitk.ReadTransform(str(tmp_path / "scene.h5"))
    points_ras = _points_inside(moving, 1000)
    fixed_bounds = np.array([0.0] * 6)
    fixed.GetRASBounds(fixed_bounds)
    outside_fixed = points_ras[:, 2] > fixed_bounds[5]
    assert outside_fixed.sum() > 100  # the comparison reaches beyond the fixed image
    slicer_mapped = np.array([transform.GetTransformFromParent().TransformPoint(p) for p in points_ras])
    itk_mapped = np.array([LPS_RAS @ itk.TransformPoint((LPS_RAS @ p).tolist()) for p in points_ras])
    assert np.abs(slicer_mapped - itk_mapped).max() <= 1e-3


def test_results_go_into_existing_output_nodes(scene_pair, tiny_model):
    moving, fixed, _ = scene_pair
    logic = module.CARLRegistrationLogic()
    _run(logic, movingVolume=moving, fixedVolume=fixed, model=str(tiny_model), device="cpu")
    fresh = logic.finish()
    transform = slicer.mrmlScene.AddNode(slicer.vtkMRMLGridTransformNode())
    transform.SetName("my transform")
    volume = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), np.float32), name="my warped")
    nodes = _data_nodes()
    _run(logic, movingVolume=moving, fixedVolume=fixed, model=str(tiny_model), device="cpu",
         outputTransform=transform, outputVolume=volume)
    reused = logic.finish()
    assert reused["transform"] is transform and reused["warped"] is volume
    assert _data_nodes() == nodes  # nothing new (but display nodes): the loaded results moved into them
    assert (transform.GetName(), volume.GetName()) == ("my transform", "my warped")
    # two registrations of the same pair: equal up to the threaded kernels' rounding (a oneDNN
    # convolution may take another kernel on its first call in a process), not bit for bit
    assert np.allclose(slicer.util.arrayFromGridTransform(transform), slicer.util.arrayFromGridTransform(fresh["transform"]), atol=1e-3)
    warped_fresh = slicer.util.arrayFromVolume(fresh["warped"])
    assert np.allclose(slicer.util.arrayFromVolume(volume), warped_fresh, atol=1e-4 * np.ptp(warped_fresh))
    assert np.allclose(_ijk_to_ras(volume), _ijk_to_ras(fixed), atol=1e-6)
    assert transform.GetNodeReferenceID(slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole()) == moving.GetID()
    assert moving.GetTransformNodeID() is None  # not asked: the moving volume keeps no parent transform


def test_the_moving_volume_is_placed_under_the_transform_when_asked(scene_pair, tiny_model):
    moving, fixed, _ = scene_pair
    voxels = slicer.util.arrayFromVolume(moving).copy()
    logic = module.CARLRegistrationLogic()
    _run(logic, movingVolume=moving, fixedVolume=fixed, model=str(tiny_model), device="cpu", movingUnderTransform=True)
    result = logic.finish()
    assert moving.GetTransformNodeID() == result["transform"].GetID()
    assert fixed.GetTransformNodeID() is None
    assert np.array_equal(slicer.util.arrayFromVolume(moving), voxels)


def test_a_segmentation_is_warped_into_a_new_segmentation(scene_pair, tiny_model):
    moving, fixed, _ = scene_pair
    voxels = slicer.util.arrayFromVolume(moving)
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "structures")
    bright, mid = np.percentile(voxels, 90), np.percentile(voxels, 60)
    masks = {"bright": voxels > bright, "mid": (voxels > mid) & (voxels <= bright)}
    for name, color in (("bright", (1.0, 0.0, 0.0)), ("mid", (0.0, 1.0, 0.0))):
        segment_id = segmentation.GetSegmentation().AddEmptySegment(name + "_id", name, color)
        slicer.util.updateSegmentBinaryLabelmapFromArray(masks[name].astype(np.uint8), segmentation, segment_id, moving)
    # the same structures as a label map, warped by the label-map path for comparison
    labelmap = slicer.util.addVolumeFromArray((masks["bright"] * 1 + masks["mid"] * 2).astype(np.uint8), slicer.util.vtkMatrixFromArray(_ijk_to_ras(moving)),
                                              "labels", "vtkMRMLLabelMapVolumeNode")
    logic = module.CARLRegistrationLogic()
    _run(logic, movingVolume=moving, fixedVolume=fixed, model=str(tiny_model), device="cpu", movingLabels=labelmap)
    expected = slicer.util.arrayFromVolume(logic.finish()["warpedLabels"])
    nodes = _data_nodes()
    _run(logic, movingVolume=moving, fixedVolume=fixed, model=str(tiny_model), device="cpu", movingLabels=segmentation)
    result = logic.finish()
    warped = result["warpedSegmentation"]
    assert "warpedLabels" not in result and isinstance(warped, slicer.vtkMRMLSegmentationNode)
    assert warped.GetName() == "structures_warped"
    assert warped.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()) is fixed
    assert _data_nodes() == nodes + 3  # transform, warped volume, segmentation (and their display nodes)
    segments = warped.GetSegmentation()
    assert [(segments.GetSegment(i).GetName(), segments.GetSegment(i).GetColor()) for i in ("bright_id", "mid_id")] == [
        ("bright", (1.0, 0.0, 0.0)), ("mid", (0.0, 1.0, 0.0))]
    bright_mask = slicer.util.arrayFromSegmentBinaryLabelmap(warped, "bright_id", fixed)
    mid_mask = slicer.util.arrayFromSegmentBinaryLabelmap(warped, "mid_id", fixed)
    # the label map came from another registration of the same pair (equal up to threaded rounding):
    # nearest-neighbour voxels on a boundary may flip, a few per thousand at most
    for mask, label in ((bright_mask, 1), (mid_mask, 2)):
        assert np.count_nonzero(mask != (expected == label)) <= 2e-3 * np.count_nonzero(mask), label
    assert bright_mask.sum() > 1000 and mid_mask.sum() > 1000
    # the source segmentation is untouched
    assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, "bright_id", moving), masks["bright"])


def test_an_input_chosen_as_output_is_refused_before_anything_runs(scene_pair, tiny_model):
    moving, fixed, _ = scene_pair
    nodes = slicer.mrmlScene.GetNumberOfNodes()
    before = _snapshot(moving)
    logic = module.CARLRegistrationLogic()
    with pytest.raises(ValueError, match="The output volume '.*' is an input of the registration"):
        logic.start(movingVolume=moving, fixedVolume=fixed, model=str(tiny_model), outputVolume=moving)
    assert logic.job is None and logic.folder is None
    assert slicer.mrmlScene.GetNumberOfNodes() == nodes
    assert np.array_equal(_snapshot(moving)[0], before[0])


def test_a_result_that_fails_to_load_leaves_no_half_made_nodes(scene_pair, tiny_model, monkeypatch):
    moving, fixed, _ = scene_pair
    nodes = slicer.mrmlScene.GetNumberOfNodes()
    logic = module.CARLRegistrationLogic()
    work_folder, _ = _run(logic, movingVolume=moving, fixedVolume=fixed, model=str(tiny_model), device="cpu",
                          computeJacobian=True)

    def failing_load(filename, properties=None, returnNode=False):
        raise RuntimeError(f"Failed to load {filename}")

    monkeypatch.setattr(slicer.util, "loadVolume", failing_load)
    with pytest.raises(RuntimeError, match="Failed to load"):
        logic.finish()
    assert slicer.mrmlScene.GetNumberOfNodes() == nodes  # the transform loaded first was removed again
    assert not os.path.exists(work_folder)


def test_cancel_stops_the_worker_and_leaves_the_scene_as_it_was(scene_pair, tiny_model):
    moving, fixed, _ = scene_pair
    nodes, before = slicer.mrmlScene.GetNumberOfNodes(), [_snapshot(moving), _snapshot(fixed)]
    logic = module.CARLRegistrationLogic()
    logic.start(movingVolume=moving, fixedVolume=fixed, model=str(tiny_model), device="cpu", ioMode="network", ioSteps=500)
    work_folder = logic.folder
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(e["stage"] == "instance optimization" for e in logic.poll()):
        assert logic.isRunning()
        time.sleep(0.05)
    started = time.monotonic()
    logic.cancel()
    assert time.monotonic() - started < 2.0
    assert not logic.isRunning() and slicer.mrmlScene.GetNumberOfNodes() == nodes
    _assert_unchanged((moving, fixed), before)
    assert not os.path.exists(work_folder)


def test_a_failing_worker_surfaces_its_error_and_adds_no_node(scene_pair, tmp_path):
    moving, fixed, _ = scene_pair
    nodes, before = slicer.mrmlScene.GetNumberOfNodes(), [_snapshot(moving), _snapshot(fixed)]
    logic = module.CARLRegistrationLogic()
    work_folder, _ = _run(logic, movingVolume=moving, fixedVolume=fixed, model=str(tmp_path / "absent.pt"), device="cpu")
    with pytest.raises(RuntimeError, match="carl-register: load_model\\(\\): model file not found"):
        logic.finish()
    assert logic.lastError.startswith("carl-register: load_model(): model file not found")
    assert slicer.mrmlScene.GetNumberOfNodes() == nodes
    _assert_unchanged((moving, fixed), before)
    assert not os.path.exists(work_folder)


#: file extension per storable node class, as Slicer's Save dialog proposes them
SAVE_EXTENSIONS = {"vtkMRMLTransformNode": ".h5", "vtkMRMLSegmentationNode": ".seg.nrrd", "vtkMRMLVolumeNode": ".nrrd"}


def _save_scene_as_the_save_dialog_does(folder: Path) -> Path:
    """Slicer's Save Data dialog: every storable node whose data is not in a file yet (no storage
    node, no file name) or has changed since it was read is written into ``folder``; the others
    keep their files; then the .mrml scene file."""
    scene = slicer.mrmlScene
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLStorableNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLStorableNode")
        storage = node.GetStorageNode()
        kind = next((k for k in SAVE_EXTENSIONS if node.IsA(k)), None)
        if kind is None or not node.GetSaveWithScene():
            continue
        if storage is None or not storage.GetFileName() or node.GetModifiedSinceRead():
            assert slicer.util.saveNode(node, str(folder / (node.GetName().replace(" ", "_") + SAVE_EXTENSIONS[kind])), {})
    assert slicer.util.saveScene(str(folder / "scene.mrml"), {})
    return folder / "scene.mrml"


def test_the_scene_saves_and_reloads_after_a_registration(tmp_path, scene_pair, tiny_model):
    moving, fixed, folder = scene_pair
    before = [_snapshot(moving), _snapshot(fixed)]
    logic = module.CARLRegistrationLogic()
    _run(logic, movingVolume=moving, fixedVolume=fixed, model=str(tiny_model), device="cpu",
         computeInverse=True, computeJacobian=True)
    result = logic.finish()
    # the inputs still refer to their own files, unmodified: nothing to save for them
    _assert_unchanged((moving, fixed), before)
    assert moving.GetStorageNode().GetFileName() == str(folder / "reoriented_anat_moved.nii")
    names = {node.GetName(): node.GetClassName() for node in (moving, fixed, result["transform"], result["warped"],
                                                              result["inverse"], result["jacobian"])}
    saved = tmp_path / "saved"
    saved.mkdir()
    scene_file = _save_scene_as_the_save_dialog_does(saved)

    slicer.mrmlScene.Clear()
    slicer.util.loadScene(str(scene_file), {})
    for name, class_name in names.items():
        node = slicer.mrmlScene.GetFirstNodeByName(name)
        assert node is not None and node.GetClassName() == class_name, name
        if node.IsA("vtkMRMLVolumeNode"):
            assert node.GetImageData() is not None and node.GetImageData().GetNumberOfPoints() > 0, name
        else:
            grid = node.GetTransformFromParent()
            grid.Update()
            assert grid.GetDisplacementGrid().GetNumberOfPoints() > 0, name
    reloaded = slicer.mrmlScene.GetFirstNodeByName(moving.GetName())
    assert np.array_equal(slicer.util.arrayFromVolume(reloaded), before[0][0])


def test_an_input_under_a_parent_transform_is_registered_as_the_user_sees_it(tmp_path, scene_pair, tiny_model):
    """A moving volume under a translation (a manual alignment, say): the worker gets the volume with
    the transform hardened into its copy, and the user's nodes stay as they were."""
    moving, fixed, folder = scene_pair
    shift = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "manual alignment")
    matrix = np.eye(4)
    matrix[:3, 3] = [12.0, -8.0, 6.0]
    shift.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    moving.SetAndObserveTransformNodeID(shift.GetID())
    before = [_snapshot(moving), _snapshot(fixed)]
    logic = module.CARLRegistrationLogic()
    _run(logic, movingVolume=moving, fixedVolume=fixed, model=str(tiny_model), device="cpu")
    transform = logic.finish()["transform"]
    _assert_unchanged((moving, fixed), before)
    assert moving.GetTransformNodeID() == shift.GetID()

    # the engine on the moving volume as the user sees it: the same transform
    moved = sitk.ReadImage(str(folder / "reoriented_anat_moved.nii"))
    moved.SetOrigin((np.array(moved.GetOrigin()) + LPS_RAS @ matrix[:3, 3]).tolist())
    sitk.WriteImage(moved, str(tmp_path / "seen.nii.gz"))
    completed = subprocess.run(
        [sys.executable, "-m", "carlreg", "register", "--moving", tmp_path / "seen.nii.gz", "--fixed", folder / "anatomical.nii",
         "--model", tiny_model, "--device", "cpu", "--out-transform", tmp_path / "engine.h5", "--progress", "none"],
        capture_output=True, text=True,
    )
    assert completed.returncode == 0, completed.stderr
    engine = sitk.DisplacementFieldTransform(sitk.ReadTransform(str(tmp_path / "engine.h5")))
    points_ras = _points_inside(fixed, 500)
    scene_mapped = np.array([transform.GetTransformFromParent().TransformPoint(p) for p in points_ras])
    engine_mapped = np.array([LPS_RAS @ engine.TransformPoint((LPS_RAS @ p).tolist()) for p in points_ras])
    assert np.abs(scene_mapped - engine_mapped).max() <= 1e-2

    with pytest.raises(ValueError, match="is already under the transform 'manual alignment'"):
        logic.start(movingVolume=moving, fixedVolume=fixed, model=str(tiny_model), movingUnderTransform=True)
    assert logic.job is None


def test_torch_is_installed_through_slicer_pytorch_after_asking(monkeypatch):
    import importlib.util
    import types

    logic = module.CARLRegistrationLogic()
    calls = []
    stand_in = types.SimpleNamespace(PyTorchUtilsLogic=lambda: types.SimpleNamespace(
        installTorch=lambda **kwargs: calls.append(kwargs) or object()))
    monkeypatch.setitem(sys.modules, "PyTorchUtils", stand_in)
    logic.ensureTorch()
    assert calls == []  # torch is importable: nothing to install
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    logic.ensureTorch()
    assert calls == [{"askConfirmation": True, "torchVersionRequirement": ">=2.4"}]
    stand_in.PyTorchUtilsLogic = lambda: types.SimpleNamespace(installTorch=lambda **kwargs: None)
    with pytest.raises(ValueError, match="needs PyTorch, which was not installed"):
        logic.ensureTorch()


def test_the_worker_explains_a_numpy_2_import_failure():
    from carlreg.cli import _import_problem

    message = _import_problem(ImportError("numpy.core.multiarray failed to import"))
    assert "NumPy" in message and "newer PyTorch" in message
    assert "not installed" in _import_problem(ModuleNotFoundError("No module named 'torch'", name="torch"))


def test_devices_are_listed_without_importing_torch_in_the_gui(monkeypatch):
    import shutil as shutil_module

    logic = module.CARLRegistrationLogic()
    monkeypatch.setattr(shutil_module, "which", lambda name: None)
    assert logic.availableDevices()[0] == "auto" and logic.availableDevices()[-1] == "cpu"
    assert "cuda" not in logic.availableDevices()
    monkeypatch.setattr(shutil_module, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    assert "cuda" in logic.availableDevices()


def _poll_until_done(widget, seconds=120):
    deadline = time.monotonic() + seconds
    while widget._timer.active and time.monotonic() < deadline:
        widget.onPoll()
        time.sleep(0.05)


def test_the_panels_choices_give_the_engines_io_mode():
    assert module.ioMode(refine=True, tuneNetwork=False) == "svf"  # the panel's default
    assert module.ioMode(refine=False, tuneNetwork=False) == "none"
    assert module.ioMode(refine=True, tuneNetwork=True) == module.ioMode(refine=False, tuneNetwork=True) == "network"


def test_the_widget_runs_a_registration_from_its_panel(scene_pair, tiny_model):
    moving, fixed, _ = scene_pair
    widget = module.CARLRegistrationWidget()
    widget.setup()
    ui = widget.ui
    assert widget.layout.widgets and ui.modelComboBox.items[-1] == module.CUSTOM_MODEL
    assert ui.deviceComboBox.items[0] == "auto" and ui.deviceComboBox.items[-1] == "cpu"
    parameters = widget._parameterNode
    assert parameters.fixedVolume is not None  # the first volume of the scene, as the template does
    assert parameters.refine and parameters.refineSpacing == 2.0 and not parameters.instanceOptimization
    parameters.fixedVolume, parameters.movingVolume = None, None
    widget._updateButtonState()
    assert not ui.registerButton.enabled and "a moving volume and a fixed volume" in ui.registerButton.toolTip
    parameters.movingVolume, parameters.fixedVolume = moving, fixed
    parameters.model, parameters.customModelPath, parameters.device = module.CUSTOM_MODEL, str(tiny_model), "cpu"
    widget._updateButtonState()
    assert ui.registerButton.enabled and ui.registerButton.text == "Register"

    widget.onRegisterButton()
    assert ui.registerButton.text == "Cancel" and widget._timer.active
    seen = set()
    deadline = time.monotonic() + 120
    while widget._timer.active and time.monotonic() < deadline:
        widget.onPoll()
        seen.add(ui.statusLabel.text)
        time.sleep(0.05)
    # the worker's progress reached the panel: "<stage>: step i of n[, t s left]"
    assert any(": step " in text and text.split(":")[0] in {"loading", "registration", "transform", "metrics"} for text in seen)
    assert any(text.startswith("refinement: step ") for text in seen)  # Refine is the panel's default
    assert ui.progressBar.value == 100 and ui.registerButton.text == "Register"
    assert re.search(r" s on cpu \(refinement \d+\.\d s\); LNCC ", ui.statusLabel.text) and "folding" in ui.statusLabel.text
    assert isinstance(parameters.outputTransform, slicer.vtkMRMLGridTransformNode)
    assert np.allclose(_ijk_to_ras(parameters.outputVolume), _ijk_to_ras(fixed), atol=1e-6)


def test_the_widget_cancels_and_reports_failures(scene_pair, tiny_model, tmp_path):
    moving, fixed, _ = scene_pair
    widget = module.CARLRegistrationWidget()
    widget.setup()
    parameters = widget._parameterNode
    parameters.movingVolume, parameters.fixedVolume = moving, fixed
    parameters.model, parameters.customModelPath, parameters.device = module.CUSTOM_MODEL, str(tiny_model), "cpu"
    parameters.instanceOptimization, parameters.ioSteps = True, 500
    nodes = slicer.mrmlScene.GetNumberOfNodes()
    widget.onRegisterButton()
    deadline = time.monotonic() + 120
    while "instance optimization" not in widget.ui.statusLabel.text and time.monotonic() < deadline:
        widget.onPoll()
        time.sleep(0.05)
    widget.onRegisterButton()  # the button reads Cancel now
    assert widget.ui.statusLabel.text == "Cancelled." and widget.ui.registerButton.text == "Register"
    assert not widget._timer.active and slicer.mrmlScene.GetNumberOfNodes() == nodes

    parameters.instanceOptimization = False
    parameters.customModelPath = str(tmp_path / "absent.pt")
    widget.onRegisterButton()
    with pytest.raises(RuntimeError, match="model file not found"):
        _poll_until_done(widget)
    assert widget.ui.statusLabel.text.startswith("Failed: carl-register: load_model(): model file not found")
    assert widget.ui.progressBar.value == 0 and slicer.mrmlScene.GetNumberOfNodes() == nodes


def test_the_modules_own_self_test_passes_with_the_shipped_model():
    """CARLRegistrationTest (what Slicer's Reload and Test runs) with the first shipped 3-D model."""
    assert module.CARLRegistrationLogic().availableModels()[0] == "carl-brain-3d"
    with open(os.devnull, "w") as quiet:
        result = unittest.TextTestRunner(stream=quiet).run(module.CARLRegistrationTest("runTest"))
    assert result.wasSuccessful() and not result.skipped, result.errors + result.failures + result.skipped


def test_the_panel_describes_the_selected_model_and_its_download(scene_pair):
    widget = module.CARLRegistrationWidget()
    widget.setup()
    assert "unicarl" in widget.ui.modelComboBox.items  # offered, to be downloaded on first use
    assert widget.ui.modelComboBox.slots["currentTextChanged(QString)"] == widget.onModelChanged
    widget.onModelChanged("unicarl")
    text = widget.ui.modelInfoLabel.text
    assert text.startswith("uniCARL") and "downloaded once on first use, 543 MiB" in text and "160 × 160 × 160" in text
    widget.onModelChanged("carl-brain-3d")
    assert "64 × 72 × 64 at 3 mm" in widget.ui.modelInfoLabel.text and "shipped" in widget.ui.modelInfoLabel.text
    widget.onModelChanged(module.CUSTOM_MODEL)
    assert widget.ui.modelInfoLabel.text == "A weights file of your own, chosen below."
