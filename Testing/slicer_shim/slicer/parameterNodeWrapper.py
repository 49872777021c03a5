"""Mirrors Base/Python/slicer/parameterNodeWrapper (not in slicer-core): typed fields over a
vtkMRMLScriptedModuleNode. As in Slicer, the values live in the MRML node (node fields as node
references, the others as parameters), so every wrapper of a node sees the same state, and the
wrapper forwards observers to the node. Binding to the GUI (``connectGui``) is not simulated."""
import json
import typing


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum


def _is_node_type(annotation) -> bool:
    options = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Union else (annotation,)
    return all(getattr(option, "__name__", "").startswith("vtkMRML") for option in options)


def _field(name, annotation, default):
    if _is_node_type(annotation):
        def get(self):
            return self.parameterNode.GetNodeReference(name)

        def set(self, node):
            self.parameterNode.SetNodeReferenceID(name, node.GetID() if node is not None else None)
    else:
        def get(self):
            text = self.parameterNode.GetParameter(name)
            return json.loads(text) if text else default

        def set(self, value):
            self.parameterNode.SetParameter(name, json.dumps(value))
    return property(get, set)


def parameterNodeWrapper(cls):
    hints = typing.get_type_hints(cls, include_extras=True)

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode

    def connectGui(self, ui):
        return object()

    def disconnectGui(self, tag):
        pass

    def AddObserver(self, event, callback, priority=0.0):
        return self.parameterNode.AddObserver(event, callback, priority)

    def RemoveObserver(self, tag):
        self.parameterNode.RemoveObserver(tag)

    namespace = {name: value for name, value in cls.__dict__.items() if name not in ("__dict__", "__weakref__")}
    for name, annotation in hints.items():
        base = typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated else annotation
        namespace[name] = _field(name, base, cls.__dict__.get(name))
    namespace.update(__init__=__init__, connectGui=connectGui, disconnectGui=disconnectGui,
                     AddObserver=AddObserver, RemoveObserver=RemoveObserver)
    return type(cls.__name__, (), namespace)
