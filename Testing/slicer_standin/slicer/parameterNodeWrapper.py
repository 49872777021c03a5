"""Mirrors Base/Python/slicer/parameterNodeWrapper: typed fields over a parameter node.

Here a wrapped class keeps its fields as attributes, starting from the declared defaults
(None for nodes); GUI binding is not simulated.
"""
import typing


class StandInParameterNode:
    """Stands in for a vtkMRMLScriptedModuleNode."""


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum


def parameterNodeWrapper(cls):
    hints = typing.get_type_hints(cls, include_extras=True)

    def __init__(self, parameterNode=None):
        self.parameterNode = parameterNode
        for name in hints:
            setattr(self, name, getattr(cls, name, None))

    def connectGui(self, ui):
        return object()

    def disconnectGui(self, tag):
        pass

    namespace = dict(cls.__dict__, __init__=__init__, connectGui=connectGui, disconnectGui=disconnectGui)
    namespace.pop("__dict__", None)
    namespace.pop("__weakref__", None)
    return type(cls.__name__, (), namespace)
