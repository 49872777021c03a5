"""A stand-in for the parts of 3D Slicer's Python API that the CARLRegistration module uses.

Only what the module calls, each mirroring the named Slicer source, with the real ``vtk``
package for images and matrices. It proves that our code calls what we think it calls and
that its data survive the round trips (RAS in the scene, LPS in files); it is not Slicer.
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Optional

import vtk


class vtkMRMLNode:
    """Mirrors Libs/MRML/Core/vtkMRMLNode.{h,cxx}: name, ID, node references."""

    def __init__(self) -> None:
        self._id: Optional[str] = None
        self._name = ""
        self._references: Dict[str, List[str]] = {}
        self._display: Optional["vtkMRMLDisplayNode"] = None

    def GetID(self) -> Optional[str]:
        return self._id

    def GetName(self) -> str:
        return self._name

    def SetName(self, name: str) -> None:
        self._name = name

    def AddNodeReferenceID(self, role: str, node_id: str) -> None:
        self._references.setdefault(role, []).append(node_id)

    def GetNodeReferenceID(self, role: str) -> Optional[str]:
        ids = self._references.get(role)
        return ids[0] if ids else None

    def CreateDefaultDisplayNodes(self) -> None:
        if self._display is None:
            self._display = self.display_class()

    def GetDisplayNode(self):
        return self._display

    display_class = None


class vtkMRMLDisplayNode:
    """Mirrors Libs/MRML/Core/vtkMRMLDisplayNode: the calls the module makes, recorded."""

    def __init__(self) -> None:
        self.calls: Dict[str, tuple] = {}

    def __getattr__(self, name):
        if name.startswith(("Set", "SetAndObserve")):
            return lambda *args: self.calls.__setitem__(name, args)
        raise AttributeError(name)


class vtkMRMLTransformDisplayNode(vtkMRMLDisplayNode):
    """Mirrors Libs/MRML/Core/vtkMRMLTransformDisplayNode.h (VisualizationMode enum)."""

    VIS_MODE_GLYPH, VIS_MODE_GRID, VIS_MODE_CONTOUR = 0, 1, 2


class vtkMRMLScalarVolumeNode(vtkMRMLNode):
    """Mirrors vtkMRMLVolumeNode / vtkMRMLScalarVolumeNode: vtkImageData + IJK→RAS matrix."""

    display_class = vtkMRMLDisplayNode

    def __init__(self) -> None:
        super().__init__()
        self._image = vtk.vtkImageData()
        self._ijk_to_ras = vtk.vtkMatrix4x4()
        self._transform_id: Optional[str] = None
        self.CreateDefaultDisplayNodes()

    def GetImageData(self) -> vtk.vtkImageData:
        return self._image

    def SetAndObserveImageData(self, image: vtk.vtkImageData) -> None:
        self._image = image

    def GetIJKToRASMatrix(self, matrix: vtk.vtkMatrix4x4) -> None:
        matrix.DeepCopy(self._ijk_to_ras)

    def SetIJKToRASMatrix(self, matrix: vtk.vtkMatrix4x4) -> None:
        self._ijk_to_ras.DeepCopy(matrix)

    def GetSpacing(self):
        return tuple(
            sum(self._ijk_to_ras.GetElement(r, c) ** 2 for r in range(3)) ** 0.5 for c in range(3)
        )

    def GetOrigin(self):
        return tuple(self._ijk_to_ras.GetElement(r, 3) for r in range(3))

    def SetAndObserveTransformNodeID(self, node_id: Optional[str]) -> None:
        self._transform_id = node_id

    def GetTransformNodeID(self) -> Optional[str]:
        return self._transform_id


class vtkMRMLLabelMapVolumeNode(vtkMRMLScalarVolumeNode):
    """Mirrors vtkMRMLLabelMapVolumeNode."""


class vtkOrientedGridTransform:
    """Mirrors Libs/vtkAddon/vtkOrientedGridTransform: a displacement grid (vtkImageData, 3
    components, RAS millimetres) and the grid's direction matrix (RAS)."""

    def __init__(self) -> None:
        self._grid = vtk.vtkImageData()
        self._direction = vtk.vtkMatrix4x4()

    def SetDisplacementGridData(self, image: vtk.vtkImageData) -> None:
        self._grid = image

    def GetDisplacementGrid(self) -> vtk.vtkImageData:
        return self._grid

    def SetGridDirectionMatrix(self, matrix: vtk.vtkMatrix4x4) -> None:
        self._direction = matrix

    def GetGridDirectionMatrix(self) -> vtk.vtkMatrix4x4:
        return self._direction


class vtkMRMLTransformNode(vtkMRMLNode):
    """Mirrors Libs/MRML/Core/vtkMRMLTransformNode.cxx (the registration reference roles, the
    from-parent transform)."""

    display_class = vtkMRMLTransformDisplayNode

    def __init__(self) -> None:
        super().__init__()
        self._from_parent = None

    def GetTransformFromParent(self):
        return self._from_parent

    def SetAndObserveTransformFromParent(self, transform) -> None:
        self._from_parent = transform

    @staticmethod
    def GetMovingNodeReferenceRole() -> str:
        return "spatialRegistrationMoving"

    @staticmethod
    def GetFixedNodeReferenceRole() -> str:
        return "spatialRegistrationFixed"


class vtkMRMLGridTransformNode(vtkMRMLTransformNode):
    """Mirrors vtkMRMLGridTransformNode: a vtkOrientedGridTransform as its from-parent transform."""

    def __init__(self) -> None:
        super().__init__()
        self._from_parent = vtkOrientedGridTransform()


class vtkSegment:
    """Mirrors Libs/vtkSegmentationCore/vtkSegment: name and colour (the mask is kept by the node here)."""

    def __init__(self, name: str, color) -> None:
        self._name, self._color = name, tuple(color)

    def GetName(self) -> str:
        return self._name

    def GetColor(self):
        return self._color


class vtkSegmentation:
    """Mirrors Libs/vtkSegmentationCore/vtkSegmentation: ordered segments by ID."""

    def __init__(self) -> None:
        self._segments: Dict[str, vtkSegment] = {}

    def AddEmptySegment(self, segment_id: str = "", name: str = "", color=(0.5, 0.5, 0.5)) -> str:
        segment_id = segment_id or f"Segment_{len(self._segments) + 1}"
        self._segments[segment_id] = vtkSegment(name or segment_id, color)
        return segment_id

    def GetSegmentIDs(self, ids: vtk.vtkStringArray) -> None:
        ids.Reset()
        for segment_id in self._segments:
            ids.InsertNextValue(segment_id)

    def GetSegment(self, segment_id: str) -> Optional[vtkSegment]:
        return self._segments.get(segment_id)

    def GetNumberOfSegments(self) -> int:
        return len(self._segments)


class vtkMRMLSegmentationNode(vtkMRMLNode):
    """Mirrors Libs/MRML/Core/vtkMRMLSegmentationNode: a vtkSegmentation, and here each segment's
    binary labelmap with the geometry (IJK-to-RAS matrix and shape) it was set on."""

    display_class = vtkMRMLDisplayNode

    def __init__(self) -> None:
        super().__init__()
        self._segmentation = vtkSegmentation()
        self.masks: Dict[str, tuple] = {}
        self.reference_geometry = None

    def GetSegmentation(self) -> vtkSegmentation:
        return self._segmentation

    def SetReferenceImageGeometryParameterFromVolumeNode(self, volume) -> None:
        self.reference_geometry = volume


class _Scene:
    """Mirrors Libs/MRML/Core/vtkMRMLScene: nodes, IDs, unique names, close events."""

    StartCloseEvent, EndCloseEvent = 66001, 66003

    def __init__(self) -> None:
        self.Clear()

    def Clear(self, remove_singletons: bool = False) -> None:
        self._nodes: Dict[str, vtkMRMLNode] = {}
        self._counter = itertools.count(1)

    def AddNewNodeByClass(self, class_name: str, name: str = "") -> vtkMRMLNode:
        node = self.AddNode(globals()[class_name]())
        node.SetName(self.GenerateUniqueName(name or class_name.replace("vtkMRML", "").replace("Node", "")))
        return node

    def AddNode(self, node: vtkMRMLNode) -> vtkMRMLNode:
        node._id = f"{type(node).__name__}{next(self._counter)}"
        self._nodes[node._id] = node
        return node

    def RemoveNode(self, node: vtkMRMLNode) -> None:
        self._nodes.pop(node.GetID(), None)

    def GetNodeByID(self, node_id: str) -> Optional[vtkMRMLNode]:
        return self._nodes.get(node_id)

    def GetNodes(self) -> List[vtkMRMLNode]:
        return list(self._nodes.values())

    def GetNumberOfNodes(self) -> int:
        return len(self._nodes)

    def GetFirstNodeByClass(self, class_name: str) -> Optional[vtkMRMLNode]:
        return next((n for n in self._nodes.values() if type(n).__name__ == class_name), None)

    def GenerateUniqueName(self, base: str) -> str:
        names = {n.GetName() for n in self._nodes.values()}
        if base not in names:
            return base
        return next(f"{base}_{i}" for i in itertools.count(1) if f"{base}_{i}" not in names)


class _App:
    """Mirrors qSlicerApplication: event processing (nothing to process here)."""

    def processEvents(self) -> None:
        pass


mrmlScene = _Scene()
app = _App()

from . import util  # noqa: E402, F401  (util refers to the classes above)
