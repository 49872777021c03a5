"""CARL Registration: deformable registration of two volumes with CARL, in 3D Slicer.

A thin layer over the engine (``carlreg``): the Widget binds the panel to a parameter node,
the Logic writes the inputs to temporary files, runs ``carl-register`` in a worker process
(Slicer's PythonSlicer) so that the GUI never freezes, reads its progress, and loads the
results into the scene. Importing this file imports neither torch nor the engine.
"""
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional, Union

import qt
import slicer
import vtk
from slicer import vtkMRMLGridTransformNode, vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:  # Python 3.9+ (Slicer 5.8 bundles 3.9)
    from typing import Annotated
except ImportError:  # pragma: no cover
    from typing_extensions import Annotated

#: the entry of the model list that selects the custom file of the Advanced section
CUSTOM_MODEL = "Custom file..."
#: the worker's progress arrives this often (ms) while it runs
POLL_INTERVAL_MS = 200


def ioMode(refine: bool, tuneNetwork: bool) -> str:
    """The engine's ``--io-mode`` for the panel's choices: tuning the network (the paper's
    instance optimization) replaces the refinement; the refinement is the default."""
    if tuneNetwork:
        return "network"
    return "svf" if refine else "none"


class CARLRegistration(ScriptedLoadableModule):
    """Module metadata."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CARL Registration"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["CARLRegistration developers"]
        self.parent.helpText = (
            "Deformable registration with CARL (Coordinate Attention with Refinement Layers). "
            "Pick the moving and fixed volumes and click Register: the result is a displacement-field "
            "transform (fixed to moving, on the fixed grid) and the warped moving volume. CARL is "
            "equivariant to translations: scans with large offsets and different fields of view "
            "register without pre-alignment."
        )
        self.parent.acknowledgementText = (
            "CARL: Greer, Tian, Vialard, Kwitt, San José Estépar, Niethammer, "
            "'CARL: A Framework for Equivariant Image Registration', CVPR 2025."
        )


@parameterNodeWrapper
class CARLRegistrationParameterNode:
    """The panel's state; each field is bound to the .ui widget whose SlicerParameterName it is."""

    movingVolume: vtkMRMLScalarVolumeNode
    fixedVolume: vtkMRMLScalarVolumeNode
    model: str
    modality: str = "auto"
    outputTransform: vtkMRMLGridTransformNode
    outputVolume: vtkMRMLScalarVolumeNode
    customModelPath: str = ""
    refine: bool = True
    refineSpacing: Annotated[float, WithinRange(0.5, 8.0)] = 2.0
    instanceOptimization: bool = False
    ioSteps: Annotated[int, WithinRange(1, 500)] = 50
    device: str = "auto"
    computeInverse: bool = False
    computeJacobian: bool = False
    movingLabels: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode]
    movingUnderTransform: bool = False


class CARLRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: binds the parameter node, starts and cancels the Logic's run, shows progress."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPoll)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CARLRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CARLRegistrationLogic()
        self.ui.modelComboBox.addItems(self.logic.availableModels() + [CUSTOM_MODEL])
        self.ui.deviceComboBox.addItems(self.logic.availableDevices())
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.registerButton.connect("clicked(bool)", self.onRegisterButton)
        self.ui.modelComboBox.connect("currentTextChanged(QString)", self.onModelChanged)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._timer.stop()
        if self.logic is not None:
            self.logic.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtonState)

    def onSceneStartClose(self, caller, event) -> None:
        if self.logic is not None:
            self.logic.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.fixedVolume = first

    def setParameterNode(self, inputParameterNode: Optional[CARLRegistrationParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtonState)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtonState)
            self._updateButtonState()

    def _updateButtonState(self, caller=None, event=None) -> None:
        if self.logic.isRunning():
            self.ui.registerButton.text = "Cancel"
            self.ui.registerButton.toolTip = "Stop the registration; the scene is left as it was."
            self.ui.registerButton.enabled = True
            return
        self.ui.registerButton.text = "Register"
        missing = self.logic.missingInputs(self._parameterNode)
        self.ui.registerButton.enabled = not missing
        self.ui.registerButton.toolTip = (
            "Register the moving volume to the fixed volume." if not missing else "Select " + " and ".join(missing) + "."
        )

    def onModelChanged(self, name: str) -> None:
        self.ui.modelInfoLabel.text = self.logic.modelDescription(name)

    def onRegisterButton(self) -> None:
        if self.logic.isRunning():
            self.logic.cancel()
            self._timer.stop()
            self.ui.statusLabel.text = "Cancelled."
            self.ui.progressBar.value = 0
            self._updateButtonState()
            return
        with slicer.util.tryWithErrorDisplay("Registration failed to start.", waitCursor=True):
            self.logic.startFromParameterNode(self._parameterNode)
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Starting..."
            self._timer.start()
        self._updateButtonState()

    def onPoll(self) -> None:
        for event in self.logic.poll():
            if "fraction" in event:
                self.ui.progressBar.value = int(100 * event["fraction"])
                eta = f", {event['eta_s']:.0f} s left" if event.get("eta_s") is not None else ""
                self.ui.statusLabel.text = f"{event['stage']}: step {event['step']} of {event['total']}{eta}"
        if self.logic.isRunning():
            return
        self._timer.stop()
        with slicer.util.tryWithErrorDisplay("Registration failed.", waitCursor=True):
            try:
                self.logic.finish(self._parameterNode)
                self.ui.statusLabel.text = self.logic.summary()
                self.ui.progressBar.value = 100
            except Exception:
                self.ui.statusLabel.text = "Failed: " + self.logic.lastError
                self.ui.progressBar.value = 0
                raise
        self._updateButtonState()


class CARLRegistrationLogic(ScriptedLoadableModuleLogic):
    """Runs the engine in a worker process and brings its results into the scene.

    Keyword entry point for scripts and tests: :meth:`registerVolumes` (blocking). The GUI uses
    :meth:`startFromParameterNode`, :meth:`poll` from a timer, then :meth:`finish`.
    Input nodes are never modified, except that, when asked, the moving volume is placed under
    the result transform; temporary files are removed in every case.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.job = None
        self.folder: Optional[str] = None
        self.metrics: Dict = {}
        self.lastError = ""
        self._request: Dict = {}

    def getParameterNode(self) -> CARLRegistrationParameterNode:
        return CARLRegistrationParameterNode(super().getParameterNode())

    # ---- engine facts (imported lazily: the engine needs torch, which may not be installed yet)

    @staticmethod
    def _engine(name: str):
        """A torch-free engine module (``worker``, ``registry``), imported from beside this file."""
        import importlib

        moduleDir = os.path.dirname(os.path.abspath(__file__))
        if moduleDir not in sys.path:
            sys.path.insert(0, moduleDir)
        return importlib.import_module(f"carlreg.{name}")

    def availableModels(self) -> List[str]:
        """Shipped models for volumes (3-D); the 2-D ones and the baselines serve the command line and benchmarks."""
        return self._engine("registry").available_models(dimension=3, baselines=False)

    def modelDescription(self, name: str) -> str:
        """One line on a listed model for the panel: what it is, its input, and its weights (a
        model downloaded on first use says how large the download is)."""
        rows = {row["name"]: row for row in self._engine("registry").describe_models()}
        row = rows.get(name)
        if row is None:
            return "A weights file of your own, chosen below." if name == CUSTOM_MODEL else ""
        return f"{row['title']}. {row['modality']}; input {row['input']}; weights {row['weights']}."

    def availableDevices(self) -> List[str]:
        """auto, then a GPU when one is present, then cpu.

        Judged without importing torch in the GUI process (slow, and it is the worker that
        needs it): an NVIDIA driver's ``nvidia-smi``, or Apple silicon for MPS.
        """
        import platform

        devices = ["auto"]
        if shutil.which("nvidia-smi"):
            devices.append("cuda")
        if platform.system() == "Darwin" and platform.machine() == "arm64":
            devices.append("mps")
        return devices + ["cpu"]

    def pythonExecutable(self) -> str:
        """Slicer's PythonSlicer (same Python and packages as Slicer, without the GUI)."""
        launcher = shutil.which("PythonSlicer")
        return launcher or sys.executable

    # ---- running

    def missingInputs(self, parameters: CARLRegistrationParameterNode) -> List[str]:
        missing = []
        if not parameters.movingVolume:
            missing.append("a moving volume")
        if not parameters.fixedVolume:
            missing.append("a fixed volume")
        if parameters.model == CUSTOM_MODEL and not parameters.customModelPath:
            missing.append("a custom model file")
        if not parameters.model:
            missing.append("a model")
        return missing

    def isRunning(self) -> bool:
        return self.job is not None and self.job.returncode is None

    #: what the engine needs of PyTorch (SlicerPyTorch installs the build that fits the GPU driver)
    TORCH_REQUIREMENT = ">=2.4"

    def ensureTorch(self, askConfirmation: bool = True) -> None:
        """Make sure the worker can import torch: installed through SlicerPyTorch, after asking.

        Only looks for torch here (the GUI process never imports it).
        """
        import importlib.util

        if importlib.util.find_spec("torch") is not None:
            return
        try:
            import PyTorchUtils
        except ImportError as err:
            raise ValueError("CARL Registration needs the PyTorch extension: install it from the Extensions Manager.") from err
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=askConfirmation, torchVersionRequirement=self.TORCH_REQUIREMENT
        ) is None:
            raise ValueError("CARL Registration needs PyTorch, which was not installed.")

    def startFromParameterNode(self, parameters: CARLRegistrationParameterNode) -> None:
        missing = self.missingInputs(parameters)
        if missing:
            raise ValueError("Select " + " and ".join(missing) + ".")
        self.ensureTorch()
        model = parameters.customModelPath if parameters.model == CUSTOM_MODEL else parameters.model
        self.start(
            movingVolume=parameters.movingVolume,
            fixedVolume=parameters.fixedVolume,
            model=model,
            modality=parameters.modality,
            ioMode=ioMode(parameters.refine, parameters.instanceOptimization),
            ioSteps=parameters.ioSteps,
            refineSpacing=parameters.refineSpacing,
            device=parameters.device,
            computeInverse=parameters.computeInverse,
            computeJacobian=parameters.computeJacobian,
            movingLabels=parameters.movingLabels,
            outputTransform=parameters.outputTransform,
            outputVolume=parameters.outputVolume,
            movingUnderTransform=parameters.movingUnderTransform,
        )

    def start(
        self,
        movingVolume,
        fixedVolume,
        model: str,
        modality: str = "auto",
        ioMode: str = "none",
        ioSteps: int = 50,
        refineSpacing: float = 2.0,
        device: str = "auto",
        computeInverse: bool = False,
        computeJacobian: bool = False,
        movingLabels=None,
        outputTransform=None,
        outputVolume=None,
        movingUnderTransform: bool = False,
    ) -> None:
        """Write the inputs to a temporary folder and start the worker.

        ``outputTransform`` / ``outputVolume``: existing nodes to receive the results (their
        content is replaced, their name kept); None creates new nodes. ``movingUnderTransform``:
        once the results are in, set the moving volume's parent transform to the result (the only
        change ever made to an input node, and only when asked).
        """
        if self.isRunning():
            raise RuntimeError("A registration is already running.")
        self._checkNodes(movingVolume, fixedVolume, movingLabels, outputVolume, movingUnderTransform)
        self.folder = tempfile.mkdtemp(prefix="CARLRegistration-")
        self.metrics, self.lastError = {}, ""
        paths = {name: os.path.join(self.folder, name) for name in (
            "moving.nrrd", "fixed.nrrd", "labels.nrrd", "transform.h5", "inverse.h5",
            "warped.nrrd", "jacobian.nrrd", "warped_labels.nrrd", "summary.json")}
        try:
            self._exportVolume(movingVolume, paths["moving.nrrd"])
            self._exportVolume(fixedVolume, paths["fixed.nrrd"])
            arguments = [
                "--moving", paths["moving.nrrd"], "--fixed", paths["fixed.nrrd"], "--model", model,
                "--modality", modality, "--io-mode", ioMode, "--io-steps", str(ioSteps),
                "--refine-spacing", str(refineSpacing), "--device", device,
                "--out-transform", paths["transform.h5"], "--out-warped", paths["warped.nrrd"],
                "--summary", paths["summary.json"],
                # Slicer continues a grid transform with its border displacement where ITK applies
                # none: a grid over both images makes the two agree wherever either has content
                "--field-extent", "both",
            ]
            if computeInverse:
                arguments += ["--out-inverse", paths["inverse.h5"]]
            if computeJacobian:
                arguments += ["--out-jacobian", paths["jacobian.nrrd"]]
            segments = None
            if isinstance(movingLabels, slicer.vtkMRMLSegmentationNode):
                segments = self._saveSegmentsAsLabels(movingLabels, movingVolume, paths["labels.nrrd"])
            elif movingLabels is not None:
                self._exportVolume(movingLabels, paths["labels.nrrd"])
            if movingLabels is not None:
                arguments += ["--moving-labels", paths["labels.nrrd"], "--out-warped-labels", paths["warped_labels.nrrd"]]
            self._request = {
                "paths": paths, "moving": movingVolume, "fixed": fixedVolume, "labels": movingLabels, "segments": segments,
                "outputTransform": outputTransform, "outputVolume": outputVolume,
                "movingUnderTransform": movingUnderTransform,
            }
            self.job = self._engine("worker").WorkerJob(arguments, python=self.pythonExecutable()).start()
        except Exception:
            self._removeFolder()
            raise

    @staticmethod
    def _checkNodes(movingVolume, fixedVolume, movingLabels, outputVolume, movingUnderTransform: bool) -> None:
        """Refuse, before anything starts, the nodes that a registration would misuse: a missing
        input, an input as the output volume, a moving volume already under a transform."""
        if movingVolume is None or fixedVolume is None:
            raise ValueError("Both a moving and a fixed volume are needed.")
        if outputVolume is not None and outputVolume in (movingVolume, fixedVolume, movingLabels):
            raise ValueError(
                f"The output volume '{outputVolume.GetName()}' is an input of the registration: "
                "choose another node or create a new one."
            )
        if movingUnderTransform and movingVolume.GetParentTransformNode() is not None:
            raise ValueError(
                f"The moving volume '{movingVolume.GetName()}' is already under the transform "
                f"'{movingVolume.GetParentTransformNode().GetName()}': turn off 'moving through transform' or harden it first."
            )

    @staticmethod
    def _exportVolume(node, path: str) -> None:
        """Write ``node`` as the user sees it (its parent transform hardened into the copy) without
        touching it: ``exportNode`` leaves its storage node, file name and modified state alone,
        where ``saveNode`` would point the user's storage node at our temporary file."""
        if not slicer.util.exportNode(node, path, properties={}, world=True):
            raise ValueError(f"Could not write the volume '{node.GetName()}' for the registration worker.")

    @classmethod
    def _saveSegmentsAsLabels(cls, segmentation, referenceVolume, path: str) -> List[tuple]:
        """Write the segments as one label map on ``referenceVolume``'s grid with Slicer's own
        segmentation logic (segment k → label k + 1); returns ``[(segment ID, name, color)]``."""
        ids = vtk.vtkStringArray()
        segmentation.GetSegmentation().GetSegmentIDs(ids)
        if ids.GetNumberOfValues() == 0:
            raise ValueError(f"The segmentation '{segmentation.GetName()}' has no segments to warp.")
        segments = []
        for segmentId in (ids.GetValue(i) for i in range(ids.GetNumberOfValues())):
            segment = segmentation.GetSegmentation().GetSegment(segmentId)
            segments.append((segmentId, segment.GetName(), tuple(segment.GetColor())))
        labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "CARLRegistration labels")
        try:
            if not slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(segmentation, ids, labelmap, referenceVolume):
                raise ValueError(f"Could not export the segments of '{segmentation.GetName()}' to a label map.")
            cls._exportVolume(labelmap, path)
        finally:
            colors = labelmap.GetDisplayNode().GetColorNode() if labelmap.GetDisplayNode() else None
            cls._removeWithDisplay(labelmap)
            if colors is not None:  # the export made a colour table for this label map alone
                slicer.mrmlScene.RemoveNode(colors)
        return segments

    @staticmethod
    def _removeWithDisplay(node) -> None:
        """Remove a temporary node and the display and storage nodes made for it."""
        for helper in (node.GetDisplayNode(), node.GetStorageNode()):
            if helper is not None:
                slicer.mrmlScene.RemoveNode(helper)
        slicer.mrmlScene.RemoveNode(node)

    def poll(self) -> List[dict]:
        return self.job.poll() if self.job is not None else []

    def cancel(self) -> None:
        """Stop the worker at once; nothing is added to the scene."""
        if self.job is not None:
            self.job.cancel()
        self.job = None
        self._removeFolder()

    def finish(self, parameters: Optional[CARLRegistrationParameterNode] = None) -> Dict:
        """After the worker ended: load its results into the scene (or raise its error)."""
        try:
            code = self.job.wait()
            if code != 0:
                self.lastError = self.job.error
                raise RuntimeError(self.lastError)
            return self._loadResults(parameters)
        finally:
            self.job = None
            self._removeFolder()

    def registerVolumes(self, movingVolume, fixedVolume, model: str, **options) -> Dict:
        """Blocking registration for scripts and tests; returns the created nodes and the metrics."""
        self.start(movingVolume, fixedVolume, model, **options)
        while self.isRunning():
            slicer.app.processEvents()
            time.sleep(0.05)
        return self.finish()

    def summary(self) -> str:
        m = self.metrics
        if not m:
            return ""
        text = f"{m.get('seconds', 0):.1f} s on {m.get('device', '?')}"
        if "refine_seconds" in m:
            text += f" (refinement {m['refine_seconds']:.1f} s)"
        text += f"; LNCC {m.get('lncc_before', 0):.3f} → {m.get('lncc_after', 0):.3f}"
        text += f"; folding {m.get('folding_percent', 0):.2f} %"
        if "inverse_round_trip_p95_mm" in m:
            text += (f"; inverse round trip {m['inverse_round_trip_mean_mm']:.2f} mm "
                     f"(95 %: {m['inverse_round_trip_p95_mm']:.2f} mm)")
        return text

    # ---- results into the scene

    def _loadResults(self, parameters: Optional[CARLRegistrationParameterNode]) -> Dict:
        """Load every result; only when all loaded, move them into the chosen output nodes.

        A failure part-way removes what this call added, so the scene keeps no half-made result.
        """
        import json

        paths, moving, fixed = self._request["paths"], self._request["moving"], self._request["fixed"]
        with open(paths["summary.json"]) as handle:
            metrics = json.load(handle)
        created = self._loadResultFiles(paths, fixed)
        names = {
            "transform": f"{moving.GetName()}_to_{fixed.GetName()}",
            "warped": f"{moving.GetName()}_warped",
            "inverse": f"{fixed.GetName()}_to_{moving.GetName()}",
            "jacobian": f"{moving.GetName()}_jacobian",
            "warpedLabels": f"{moving.GetName()}_labels_warped",
            "warpedSegmentation": f"{self._request['labels'].GetName()}_warped" if self._request["labels"] else "",
        }
        for key, node in created.items():
            node.SetName(slicer.mrmlScene.GenerateUniqueName(names[key]))
        created["transform"] = self._intoExisting(created["transform"], self._request["outputTransform"])
        created["warped"] = self._intoExisting(created["warped"], self._request["outputVolume"])
        transform = created["transform"]
        transform.AddNodeReferenceID(slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole(), moving.GetID())
        transform.AddNodeReferenceID(slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole(), fixed.GetID())
        if "jacobian" in created:
            created["jacobian"].CreateDefaultDisplayNodes()
            created["jacobian"].GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeFileColdToHotRainbow.txt")
        self.metrics = metrics
        if self._request["movingUnderTransform"]:
            moving.SetAndObserveTransformNodeID(transform.GetID())
        self._showResults(created, fixed)
        if parameters is not None:
            parameters.outputTransform = transform
            parameters.outputVolume = created["warped"]
        return dict(created, metrics=self.metrics)

    def _loadResultFiles(self, paths: Dict[str, str], fixed) -> Dict:
        """The worker's result files as new nodes (none left behind when one fails to load)."""
        created = {}
        try:
            created["transform"] = self._loadTransform(paths["transform.h5"])
            created["warped"] = self._detachFromFile(slicer.util.loadVolume(paths["warped.nrrd"]))
            if os.path.exists(paths["inverse.h5"]):
                created["inverse"] = self._loadTransform(paths["inverse.h5"])
            if os.path.exists(paths["jacobian.nrrd"]):
                created["jacobian"] = self._detachFromFile(slicer.util.loadVolume(paths["jacobian.nrrd"]))
            if os.path.exists(paths["warped_labels.nrrd"]):
                created["warpedLabels"] = self._detachFromFile(slicer.util.loadLabelVolume(paths["warped_labels.nrrd"]))
                if self._request["segments"] is not None:
                    labelmap = created.pop("warpedLabels")
                    try:
                        created["warpedSegmentation"] = self._segmentationFromLabels(labelmap, self._request["segments"], fixed)
                    finally:
                        self._removeWithDisplay(labelmap)
        except Exception:
            for node in created.values():
                self._removeWithDisplay(node)
            raise
        return created

    @staticmethod
    def _detachFromFile(node):
        """The loaded ``node`` without its storage node: its file is in the temporary folder, which
        is removed, so the scene must not refer to it; saving the scene writes the node like any
        new one."""
        storage = node.GetStorageNode()
        if storage is not None:
            node.SetAndObserveStorageNodeID(None)
            slicer.mrmlScene.RemoveNode(storage)
        return node

    @classmethod
    def _loadTransform(cls, path: str):
        """The worker's transform file as a grid transform node that interpolates as ITK does:
        Slicer interpolates a loaded grid transform cubically by default, ITK (the engine, its
        warped volume, other tools reading the file) linearly: up to about 0.8 mm apart."""
        node = slicer.util.loadTransform(path)
        node.GetTransformFromParent().SetInterpolationModeToLinear()
        return cls._detachFromFile(node)

    @staticmethod
    def _segmentationFromLabels(labelmap, segments: List[tuple], fixed):
        """A new segmentation on the fixed grid with the source's segments (IDs, names, colours),
        filled from the warped label map by Slicer's segmentation logic (label k + 1 → segment k)."""
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        try:
            segmentation.CreateDefaultDisplayNodes()
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(fixed)
            ids = vtk.vtkStringArray()
            for segmentId, name, color in segments:
                segmentation.GetSegmentation().AddEmptySegment(segmentId, name, color)
                ids.InsertNextValue(segmentId)
            if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation, ids):
                raise ValueError("Could not import the warped label map into the new segmentation.")
        except Exception:
            slicer.mrmlScene.RemoveNode(segmentation)
            raise
        return segmentation

    @classmethod
    def _intoExisting(cls, loaded, existing):
        """``loaded``'s content moved into ``existing`` (which keeps its name), or ``loaded`` itself."""
        if existing is None:
            return loaded
        if isinstance(existing, slicer.vtkMRMLTransformNode):
            existing.SetAndObserveTransformFromParent(loaded.GetTransformFromParent())
        else:
            existing.SetAndObserveImageData(loaded.GetImageData())
            ijkToRAS = vtk.vtkMatrix4x4()
            loaded.GetIJKToRASMatrix(ijkToRAS)
            existing.SetIJKToRASMatrix(ijkToRAS)
        cls._removeWithDisplay(loaded)
        return existing

    @staticmethod
    def _showResults(created: Dict, fixed) -> None:
        slicer.util.setSliceViewerLayers(background=fixed, foreground=created["warped"], foregroundOpacity=0.5)
        transform = created["transform"]
        transform.CreateDefaultDisplayNodes()
        display = transform.GetDisplayNode()
        display.SetVisibility(True)
        display.SetVisibility2D(True)
        display.SetVisualizationMode(slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID)
        spacing = fixed.GetSpacing()
        display.SetGridSpacingMm(max(5.0, 8 * max(spacing)))
        display.SetAndObserveRegionNode(fixed)

    def _removeFolder(self) -> None:
        if self.folder and os.path.isdir(self.folder):
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None


class CARLRegistrationTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: each test_* method is self-contained."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_register_synthetic_pair()

    def test_register_synthetic_pair(self):
        import numpy as np

        logic = CARLRegistrationLogic()
        models = logic.availableModels()
        if not models:
            self.skipTest("no shipped model in this build")
        grid = np.indices((64, 64, 64)).astype(np.float32)
        fixedArray = np.exp(-(((grid - 32.0) ** 2).sum(0)) / (2 * 10.0**2))
        movingArray = np.roll(fixedArray, 6, axis=2)
        ijkToRAS = vtk.vtkMatrix4x4()
        for axis in range(3):
            ijkToRAS.SetElement(axis, axis, 2.0)
        fixed = slicer.util.addVolumeFromArray(fixedArray, ijkToRAS, "fixed")
        moving = slicer.util.addVolumeFromArray(movingArray, ijkToRAS, "moving")
        result = logic.registerVolumes(moving, fixed, models[0], device="cpu")
        self.assertIsInstance(result["transform"], slicer.vtkMRMLTransformNode)
        self.assertEqual(result["transform"].GetNodeReferenceID(slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole()), fixed.GetID())
        self.assertEqual(result["warped"].GetImageData().GetDimensions(), fixed.GetImageData().GetDimensions())
        self.assertGreater(result["metrics"]["lncc_after"], result["metrics"]["lncc_before"])
        logging.info("CARLRegistration self-test passed")
