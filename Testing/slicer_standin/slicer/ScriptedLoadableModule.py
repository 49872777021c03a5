"""Mirrors Base/Python/slicer/ScriptedLoadableModule.py: the four base classes."""
import unittest

import slicer


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent

    def setup(self):
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.parent = parent

    def getParameterNode(self):
        return slicer.parameterNodeWrapper.StandInParameterNode()


class ScriptedLoadableModuleTest(unittest.TestCase):
    pass
