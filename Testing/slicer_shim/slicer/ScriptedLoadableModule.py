"""Mirrors Base/Python/slicer/ScriptedLoadableModule.py (not in slicer-core): the four base classes,
as far as the module uses them. The logic's parameter node is a real vtkMRMLScriptedModuleNode,
a singleton of the scene tagged with the module's name, as in Slicer."""
import os
import sys
import unittest

import slicer


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent


class _Layout:
    """The panel's layout (a QVBoxLayout in Slicer): records the widgets added to it."""

    def __init__(self):
        self.widgets = []

    def addWidget(self, widget):
        self.widgets.append(widget)


class _ModulePanel:
    """The widget's parent (a qSlicerScriptedLoadableModuleWidget): whether the module is shown."""

    isEntered = True


class ScriptedLoadableModuleWidget:
    """The panel base: ``layout`` and ``resourcePath`` (relative to the module file's folder)."""

    def __init__(self, parent=None):
        self.parent = parent or _ModulePanel()
        self.layout = _Layout()

    def resourcePath(self, filename):
        module_file = sys.modules[type(self).__module__].__file__
        return os.path.join(os.path.dirname(module_file), "Resources", filename)

    def setup(self):
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.parent = parent
        self.moduleName = type(self).__name__
        if self.moduleName.endswith("Logic"):
            self.moduleName = self.moduleName[: -len("Logic")]

    def createParameterNode(self):
        node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)  # CreateNodeByClass returns a new reference
        node.SetSingletonTag(self.moduleName)
        node.SetModuleName(self.moduleName)
        return node

    def getParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        return node if node is not None else slicer.mrmlScene.AddNode(self.createParameterNode())


class ScriptedLoadableModuleTest(unittest.TestCase):
    pass
