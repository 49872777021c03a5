"""What Slicer's application adds around its core, for tests on the real ``slicer-core`` wheel.

``slicer-core`` is Slicer's real MRML scene and nodes, its module logics and its own
``slicer.util``; it lacks the application: ``slicer.app`` with its IO manager, ``slicer.mrmlScene``
and ``slicer.modules``. :func:`install` adds those on top of the real logics, each mirroring the
Slicer source named in its docstring (read there, not copied); nothing here re-implements MRML.
The other pieces the wheel lacks are beside this file: ``slicer/ScriptedLoadableModule.py``,
``slicer/parameterNodeWrapper.py`` (found through the ``slicer`` namespace package's path) and
``qt.py``.
"""
from __future__ import annotations

import os
import types
from typing import Dict, List

import vtk

import slicer

#: the file types the archetype volume storage node writes (``GetSupportedWriteFileTypes``
#: lists ITK's image IO factories, which the wheel does not register at start-up; Slicer lists these)
VOLUME_WRITE_TYPES = ["NRRD (.nrrd)", "NRRD (.nhdr)", "NIfTI (.nii)", "NIfTI (.nii.gz)", "MetaImage (.mha)", "MetaImage (.mhd)"]
VOLUME_EXTENSIONS = (".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd")
TRANSFORM_EXTENSIONS = (".h5", ".tfm", ".mat")


def _known_extension(filename: str, extensions) -> str:
    return next((e for e in extensions if filename.lower().endswith(e)), "")


class CoreIOManager:
    """Mirrors Base/QTCore/qSlicerCoreIOManager.cxx with the readers and writers the module uses:
    qSlicerVolumesReader (``vtkSlicerVolumesLogic::AddArchetypeVolume``), qSlicerTransformsReader
    (``vtkSlicerTransformLogic::AddTransform``), qSlicerSceneReader (``vtkMRMLScene::Import``),
    qSlicerNodeWriter (the node's own storage node: its file name is set, then ``WriteData``) and
    qSlicerSceneWriter for ``.mrml`` files (``vtkMRMLScene::Commit``, no data)."""

    def __init__(self, application: "CoreApplication") -> None:
        self.application = application

    @property
    def scene(self):
        return slicer.mrmlScene

    # ---- file types
    def fileType(self, filename: str) -> str:
        name = str(filename).lower()
        if name.endswith(".mrml"):
            return "SceneFile"
        if name.endswith(TRANSFORM_EXTENSIONS):
            return "TransformFile"
        if name.endswith(VOLUME_EXTENSIONS):
            return "VolumeFile"
        return "NoFile"

    def fileWriterFileType(self, node, fileFormat: str = "") -> str:
        if node.IsA("vtkMRMLTransformNode"):
            return "TransformFile"
        if node.IsA("vtkMRMLSegmentationNode"):
            return "SegmentationFile"
        if node.IsA("vtkMRMLVolumeNode"):
            return "VolumeFile"
        return "NoFile"

    def fileWriterExtensions(self, node) -> List[str]:
        """The storage node's supported write file types (qSlicerNodeWriter::extensions)."""
        storage = node.CreateDefaultStorageNode()
        if storage is None:
            return []
        types_ = storage.GetSupportedWriteFileTypes()
        found = [types_.GetValue(i) for i in range(types_.GetNumberOfValues())]
        return found or (VOLUME_WRITE_TYPES if storage.IsA("vtkMRMLVolumeArchetypeStorageNode") else [])

    def extractKnownExtension(self, filename: str, node) -> str:
        extensions = [slicer.vtkDataFileFormatHelper.GetFileExtensionFromFormatString(f) for f in self.fileWriterExtensions(node)]
        return _known_extension(str(filename), sorted(extensions, key=len, reverse=True))

    # ---- reading
    def loadNodes(self, fileType: str, properties: Dict, loadedNodes: vtk.vtkCollection, userMessages=None) -> bool:
        filename = str(properties["fileName"])
        if fileType == "VolumeFile":
            stem = os.path.basename(filename)[: -len(_known_extension(filename, VOLUME_EXTENSIONS)) or None]
            labelmap = 1 if properties.get("labelmap") else 0
            nodes = [self.application.modules.volumes.logic().AddArchetypeVolume(filename, properties.get("name") or stem, labelmap, None)]
        elif fileType == "TransformFile":
            nodes = [self.application.modules.transforms.logic().AddTransform(filename, self.scene)]
        elif fileType == "SceneFile":
            before = {self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())}
            self.scene.SetURL(filename)
            if not self.scene.Import(userMessages):
                return False
            nodes = [self.scene.GetNthNode(i) for i in range(self.scene.GetNumberOfNodes())
                     if self.scene.GetNthNode(i).GetID() not in before]
        else:
            return False
        nodes = [node for node in nodes if node is not None]
        for node in nodes:
            loadedNodes.AddItem(node)
        return bool(nodes)

    # ---- writing
    def saveNodes(self, fileType: str, properties: Dict, userMessages=None, scene=None) -> bool:
        scene = scene or self.scene
        filename = str(properties["fileName"])
        if fileType == "SceneFile":
            if not filename.endswith(".mrml"):
                return False
            scene.SetRootDirectory(os.path.dirname(filename))
            scene.SetURL(filename)
            return bool(scene.Commit())
        node = scene.GetNodeByID(properties["nodeID"])
        if node is None:
            return False
        storage = node.GetStorageNode()
        if storage is None:
            node.AddDefaultStorageNode()
            storage = node.GetStorageNode()
        storage.SetFileName(filename)
        if properties.get("fileFormat"):
            storage.SetWriteFileFormat(properties["fileFormat"])
        return bool(storage.WriteData(node))

    def exportNodes(self, nodeIDs: List[str], fileNames: List[str], properties: Dict, hardenTransforms: bool,
                    userMessages=None) -> bool:
        """A copy of each node in a temporary scene (parent transform hardened when asked), written
        by its own new storage node: the node and its storage node are left as they were."""
        temporary = slicer.vtkMRMLScene()
        success = True
        for node_id, filename in zip(nodeIDs, fileNames):
            node = self.scene.GetNodeByID(node_id)
            copy = temporary.AddNewNodeByClass(node.GetClassName())
            copy.CopyContent(node, hardenTransforms)
            parent = node.GetParentTransformNode() if hardenTransforms else None
            if parent is not None:
                transform = vtk.vtkGeneralTransform()
                parent.GetTransformFromWorld(transform)
                composite = temporary.AddNewNodeByClass("vtkMRMLTransformNode")
                composite.SetAndObserveTransformFromParent(transform)
                copy.SetAndObserveTransformNodeID(composite.GetID())
                copy.HardenTransform()
            if not copy.AddDefaultStorageNode():
                success = False
                continue
            parameters = dict(properties, nodeID=copy.GetID(), fileName=filename)
            success = self.saveNodes(self.fileWriterFileType(node), parameters, userMessages, temporary) and success
        return success


class CoreApplication:
    """Mirrors qSlicerCoreApplication / qSlicerApplication as far as slicer.util and the module
    reach: the IO manager, the application logic, events, the testing flag, no layout."""

    def __init__(self) -> None:
        self.modules = types.SimpleNamespace()
        self._io = CoreIOManager(self)
        self._application_logic = slicer.vtkSlicerApplicationLogic()

    def coreIOManager(self) -> CoreIOManager:
        return self._io

    def applicationLogic(self):
        return self._application_logic

    def mrmlScene(self):
        return slicer.mrmlScene

    def processEvents(self) -> None:
        pass

    def testingEnabled(self) -> bool:
        return True  # errors propagate to the test instead of opening a dialog

    def setOverrideCursor(self, cursor) -> None:
        pass

    def restoreOverrideCursor(self) -> None:
        pass

    def layoutManager(self):
        return None


class _Module:
    """A loaded module as ``slicer.modules.<name>``: its logic."""

    def __init__(self, logic) -> None:
        self._logic = logic

    def logic(self):
        return self._logic


def _module_logics(application: CoreApplication, scene) -> Dict[str, object]:
    """The module logics the module and slicer.util use, wired as qSlicerCoreApplication wires
    them (application logic, the Colors logic registered for the others to find)."""
    application_logic = application.applicationLogic()
    application_logic.SetMRMLScene(scene)
    logics = {
        "colors": slicer.vtkSlicerColorLogic(),
        "volumes": slicer.vtkSlicerVolumesLogic(),
        "transforms": slicer.vtkSlicerTransformLogic(),
        "segmentations": slicer.vtkSlicerSegmentationsModuleLogic(),
        "subjecthierarchy": slicer.vtkSlicerSubjectHierarchyModuleLogic(),
    }
    for name, logic in logics.items():
        logic.SetMRMLApplicationLogic(application_logic)
        logic.SetMRMLScene(scene)
    application_logic.SetModuleLogic("Colors", logics["colors"])
    _keep_subject_hierarchy(scene)
    return logics


def _keep_subject_hierarchy(scene) -> None:
    """Slicer's subject hierarchy plugin logic (qSlicerSubjectHierarchyPluginLogic::onNodeAdded)
    makes sure the scene has its subject hierarchy node whenever a node is added."""
    def resolve(caller, event):
        if scene.GetNumberOfNodesByClass("vtkMRMLSubjectHierarchyNode") == 0:
            slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(scene)

    scene.AddObserver(slicer.vtkMRMLScene.NodeAddedEvent, resolve)
    resolve(scene, None)


def _add_slice_views(scene) -> None:
    """The three slice views of the conventional layout (their slice and composite nodes), which
    ``slicer.util.setSliceViewerLayers`` sets the layers of (vtkMRMLLayoutLogic adds them in Slicer)."""
    for name in ("Red", "Yellow", "Green"):
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLScene(scene)
        logic.AddSliceNode(name)
        logic.SetMRMLScene(None)


def install() -> types.ModuleType:
    """Set ``slicer.mrmlScene``, ``slicer.app`` and ``slicer.modules`` (once); returns ``slicer``."""
    if isinstance(getattr(slicer, "app", None), CoreApplication):
        return slicer
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    application = CoreApplication()
    for name, logic in _module_logics(application, scene).items():
        setattr(application.modules, name, _Module(logic))
    _add_slice_views(scene)
    slicer.app, slicer.modules = application, application.modules
    return slicer


def slice_composite_nodes(scene=None) -> List:
    scene = scene or slicer.mrmlScene
    return [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]
