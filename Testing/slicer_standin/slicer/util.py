"""Mirrors Base/Python/slicer/util.py: loading and saving nodes, arrays, slice-view layers.

Files hold LPS geometry (ITK's convention), the scene RAS: as in Slicer, loading and saving
negate the first two axes of origins, directions and displacement vectors.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Optional

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

import slicer

#: RAS ↔ LPS
FLIP = np.diag([-1.0, -1.0, 1.0])
#: what setSliceViewerLayers was last asked to show
sliceViewerLayers: Dict[str, object] = {}


def _ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def arrayFromVolume(node) -> np.ndarray:
    """The voxels as a (K, J, I) array (a copy here; a view in Slicer)."""
    image = node.GetImageData()
    dims = image.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    components = image.GetNumberOfScalarComponents()
    shape = dims[::-1] + ((components,) if components > 1 else ())
    return scalars.reshape(shape).copy()


def _set_image(node, array: np.ndarray) -> None:
    image = vtk.vtkImageData()
    components = array.shape[3] if array.ndim == 4 else 1
    image.SetDimensions(*array.shape[:3][::-1])
    flat = np.ascontiguousarray(array).reshape(-1, components) if components > 1 else np.ascontiguousarray(array).ravel()
    scalars = numpy_support.numpy_to_vtk(flat, deep=True)
    scalars.SetNumberOfComponents(components)
    image.GetPointData().SetScalars(scalars)
    node.SetAndObserveImageData(image)


def addVolumeFromArray(array: np.ndarray, ijkToRAS=None, name: str = "", nodeClassName: str = "vtkMRMLScalarVolumeNode"):
    node = getattr(slicer, nodeClassName)()
    _set_image(node, array)
    if ijkToRAS is not None:
        node.SetIJKToRASMatrix(ijkToRAS)
    node.SetName(slicer.mrmlScene.GenerateUniqueName(name or "Volume"))
    return slicer.mrmlScene.AddNode(node)


def _matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def saveNode(node, filename: str, properties: Optional[dict] = None) -> bool:
    """Volumes only (what the module saves): voxels and geometry, ignoring any parent transform."""
    matrix = _ijk_to_ras(node)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    direction_lps = FLIP @ (matrix[:3, :3] / spacing)
    image = sitk.GetImageFromArray(arrayFromVolume(node))
    image.SetSpacing(spacing.tolist())
    image.SetDirection(direction_lps.flatten().tolist())
    image.SetOrigin((FLIP @ matrix[:3, 3]).tolist())
    sitk.WriteImage(image, filename)
    return True


def _volume_from_image(image: sitk.Image, node, name: str):
    direction_ras = FLIP @ np.array(image.GetDirection()).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = direction_ras @ np.diag(image.GetSpacing())
    matrix[:3, 3] = FLIP @ np.array(image.GetOrigin())
    _set_image(node, sitk.GetArrayFromImage(image))
    node.SetIJKToRASMatrix(_matrix(matrix))
    node.SetName(slicer.mrmlScene.GenerateUniqueName(name))
    return slicer.mrmlScene.AddNode(node)


def _stem(filename: str) -> str:
    name = os.path.basename(filename)
    for suffix in (".nii.gz", ".nrrd", ".nii", ".mha", ".h5", ".tfm"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def loadVolume(filename: str, properties: Optional[dict] = None, returnNode: bool = False):
    name = (properties or {}).get("name") or _stem(filename)
    return _volume_from_image(sitk.ReadImage(filename), slicer.vtkMRMLScalarVolumeNode(), name)


def loadLabelVolume(filename: str, properties: Optional[dict] = None, returnNode: bool = False):
    name = (properties or {}).get("name") or _stem(filename)
    return _volume_from_image(sitk.ReadImage(filename), slicer.vtkMRMLLabelMapVolumeNode(), name)


def loadTransform(filename: str, returnNode: bool = False):
    """An ITK displacement-field transform file → a grid transform node (from parent, RAS)."""
    transform = sitk.DisplacementFieldTransform(sitk.ReadTransform(filename))
    field = transform.GetDisplacementField()
    node = slicer.vtkMRMLGridTransformNode()
    vectors_ras = sitk.GetArrayFromImage(field) @ FLIP.T
    image = vtk.vtkImageData()
    image.SetDimensions(*field.GetSize())
    image.SetSpacing(*field.GetSpacing())
    image.SetOrigin(*(FLIP @ np.array(field.GetOrigin())).tolist())
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(vectors_ras.reshape(-1, 3)), deep=True)
    image.GetPointData().SetScalars(scalars)
    grid = slicer.vtkOrientedGridTransform()
    grid.SetDisplacementGridData(image)
    direction = np.eye(4)
    direction[:3, :3] = FLIP @ np.array(field.GetDirection()).reshape(3, 3)
    grid.SetGridDirectionMatrix(_matrix(direction))
    node.SetAndObserveTransformFromParent(grid)
    node.SetName(slicer.mrmlScene.GenerateUniqueName(_stem(filename)))
    return slicer.mrmlScene.AddNode(node)


def arrayFromGridTransform(node) -> np.ndarray:
    """(K, J, I, 3) displacement vectors, RAS millimetres."""
    image = node.GetTransformFromParent().GetDisplacementGrid()
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return scalars.reshape(image.GetDimensions()[::-1] + (3,)).copy()


def _geometry(volume) -> tuple:
    return _ijk_to_ras(volume).round(6).tobytes(), volume.GetImageData().GetDimensions()[::-1]


def updateSegmentBinaryLabelmapFromArray(narray, segmentationNode, segmentId, referenceVolumeNode=None):
    """A segment's mask, a (K, J, I) array on ``referenceVolumeNode``'s grid."""
    if segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
        raise ValueError(f"no segment {segmentId}")
    geometry = _geometry(referenceVolumeNode)
    if tuple(narray.shape) != geometry[1]:
        raise ValueError(f"array shape {narray.shape} differs from the reference volume's {geometry[1]}")
    segmentationNode.masks[segmentId] = (np.array(narray, dtype=np.uint8), geometry)


def arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceVolumeNode=None) -> np.ndarray:
    """A segment's mask on ``referenceVolumeNode``'s grid. Slicer resamples to any reference; this
    stand-in serves only the grid the mask was set on (what the tests use) and refuses others."""
    mask, geometry = segmentationNode.masks[segmentId]
    if referenceVolumeNode is not None and _geometry(referenceVolumeNode) != geometry:
        raise NotImplementedError("stand-in: a segment is only read back on the grid it was set on")
    return mask.copy()


def setSliceViewerLayers(background=None, foreground=None, label=None, foregroundOpacity=None, **kwargs) -> None:
    sliceViewerLayers.update(background=background, foreground=foreground, foregroundOpacity=foregroundOpacity)


class _UiWidget:
    """A widget of a .ui file: its class and name, the attributes the module sets (``text``,
    ``enabled``, ``toolTip``, ``value``...), the items added, the slots connected. Qt itself is
    exercised by Testing/panel_rendering.py; this serves the Widget class's own logic."""

    def __init__(self, class_name: str, name: str):
        self.className, self.objectName = class_name, name
        self.items, self.slots, self.scene = [], {}, None
        self.text, self.toolTip, self.enabled, self.value = "", "", True, 0

    def connect(self, signal, slot):
        self.slots[signal] = slot

    def addItems(self, items):
        self.items.extend(items)

    def setMRMLScene(self, scene):
        self.scene = scene


def loadUI(path: str) -> _UiWidget:
    """The .ui file's top widget; its children (every named widget) under ``children``."""
    import xml.etree.ElementTree as ElementTree

    root = ElementTree.parse(path).getroot().find("widget")
    top = _UiWidget(root.get("class"), root.get("name"))
    top.children = {w.get("name"): _UiWidget(w.get("class"), w.get("name")) for w in root.iter("widget") if w is not root}
    return top


def childWidgetVariables(widget: _UiWidget):
    """An object whose attributes are the named child widgets."""
    import types

    return types.SimpleNamespace(**widget.children)


@contextlib.contextmanager
def tryWithErrorDisplay(message: str = "", waitCursor: bool = False):
    """Slicer shows the error in a dialog; here it propagates so tests see it."""
    yield


class VTKObservationMixin:
    """Mirrors slicer.util.VTKObservationMixin (observers recorded, never fired here)."""

    def __init__(self) -> None:
        self.Observations = []

    def addObserver(self, obj, event, method, priority=0.0):
        self.Observations.append((obj, event, method))

    def removeObserver(self, obj, event, method):
        self.Observations = [o for o in self.Observations if o != (obj, event, method)]

    def removeObservers(self, method=None):
        self.Observations = []
