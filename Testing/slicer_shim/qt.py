"""Mirrors the PythonQt ``qt`` module (not in slicer-core), as far as the module and the real
``slicer.util.loadUI`` / ``childWidgetVariables`` reach: QTimer, QFile, QUiLoader, Qt.WaitCursor.

QUiLoader builds the .ui's widget tree as plain widgets: each has its class name, ``name``
(objectName), ``children()``, and the attributes the module sets (``text``, ``enabled``,
``toolTip``, ``value``), the items added and the slots connected. Real Qt is exercised by
Testing/panel_rendering.py; this serves the Widget class's own logic.
"""
import os
import xml.etree.ElementTree as ElementTree


class Qt:
    WaitCursor = 3


class QTimer:
    def __init__(self):
        self.interval, self.active, self.slots = 0, False, {}

    def setInterval(self, milliseconds):
        self.interval = milliseconds

    def connect(self, signal, slot):
        self.slots[signal] = slot

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


class QFile:
    ReadOnly = 1

    def __init__(self, path):
        self.path = str(path)

    def exists(self):
        return os.path.isfile(self.path)

    def open(self, mode):
        return self.exists()


class QWidget:
    """A widget of a .ui file."""

    def __init__(self, class_name, name):
        self._className, self.name = class_name, name
        self._children, self.items, self.slots, self.scene = [], [], {}, None
        self.text, self.toolTip, self.enabled, self.value = "", "", True, 0

    def className(self):
        return self._className

    def children(self):
        return list(self._children)

    def connect(self, signal, slot):
        self.slots[signal] = slot

    def addItems(self, items):
        self.items.extend(items)

    def setMRMLScene(self, scene):
        self.scene = scene


class QUiLoader:
    def load(self, qfile):
        def build(element):
            widget = QWidget(element.get("class"), element.get("name"))
            for child in element.iter("widget"):
                if child is not element and _parent_widget(element, child):
                    widget._children.append(build(child))
            return widget

        return build(ElementTree.parse(qfile.path).getroot().find("widget"))


def _parent_widget(ancestor, element) -> bool:
    """Whether ``ancestor`` is the nearest widget above ``element`` (layouts and items in between)."""
    def search(node, inside_widget):
        for child in node:
            if child is element:
                return not inside_widget
            if search(child, inside_widget or child.tag == "widget"):
                return True
        return False

    return search(ancestor, False)
