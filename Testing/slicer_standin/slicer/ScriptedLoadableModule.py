"""Mirrors Base/Python/slicer/ScriptedLoadableModule.py: the four base classes."""
import unittest

import slicer


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent


class _Layout:
    """The panel's layout: records the widgets added to it."""

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
        import os
        import sys

        module_file = sys.modules[type(self).__module__].__file__
        return os.path.join(os.path.dirname(module_file), "Resources", filename)

    def setup(self):
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.parent = parent

    def getParameterNode(self):
        return slicer.parameterNodeWrapper.StandInParameterNode()


class ScriptedLoadableModuleTest(unittest.TestCase):
    pass
