"""The module's panel built from its .ui with real Qt (offscreen), Slicer's widgets as placeholders.

Slicer's own widget classes do not exist outside Slicer: each becomes the closest Qt class
(ctkCollapsibleButton → QGroupBox, qMRMLNodeComboBox → QComboBox, ctkPathLineEdit → QLineEdit,
qMRMLWidget → QWidget). Run as a script to write the extension screenshot:
``python Testing/panel_rendering.py Resources/Screenshots/CARLRegistration.png``.
"""
from __future__ import annotations

import os
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

UI_FILE = Path(__file__).resolve().parents[1] / "CARLRegistration" / "Resources" / "UI" / "CARLRegistration.ui"
PLACEHOLDERS = {
    "ctkCollapsibleButton": "QGroupBox",
    "qMRMLNodeComboBox": "QComboBox",
    "ctkPathLineEdit": "QLineEdit",
    "qMRMLWidget": "QWidget",
}
#: what a user sees in the selectors once volumes are loaded
SAMPLE_ITEMS = {
    "movingVolumeSelector": ["MRHead (moving)"],
    "fixedVolumeSelector": ["MRBrainTumor1 (fixed)"],
    "modelComboBox": ["carl-brain-3d", "Custom file..."],
    "outputTransformSelector": ["Create new transform"],
    "outputVolumeSelector": ["Create new volume"],
    "deviceComboBox": ["auto", "cpu"],
    "movingLabelsSelector": ["None"],
}


def placeholder_ui() -> bytes:
    tree = ElementTree.parse(UI_FILE)
    for widget in tree.iter("widget"):
        if widget.get("class") == "ctkCollapsibleButton":  # its "text" is a QGroupBox's "title"
            for prop in widget.findall("property"):
                if prop.get("name") == "text":
                    prop.set("name", "title")
        widget.set("class", PLACEHOLDERS.get(widget.get("class"), widget.get("class")))
        for prop in list(widget.findall("property")):
            if prop.get("name") in ("nodeTypes", "showChildNodeTypes", "noneEnabled", "addEnabled", "removeEnabled", "collapsed"):
                widget.remove(prop)
    root = tree.getroot()
    for section in ("customwidgets", "connections"):
        for element in root.findall(section):
            root.remove(element)
    return ElementTree.tostring(root)


def build_panel():
    """(QApplication, panel widget) with the sample entries filled in."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6 import QtCore, QtUiTools, QtWidgets

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    buffer = QtCore.QBuffer()
    buffer.setData(placeholder_ui())
    buffer.open(QtCore.QIODevice.ReadOnly)
    panel = QtUiTools.QUiLoader().load(buffer)
    if panel is None:
        raise RuntimeError(f"QUiLoader could not build {UI_FILE}")
    for name, items in SAMPLE_ITEMS.items():
        panel.findChild(QtWidgets.QComboBox, name).addItems(items)
    panel.findChild(QtWidgets.QProgressBar, "progressBar").setValue(40)
    panel.findChild(QtWidgets.QLabel, "statusLabel").setText("instance optimization: step 20 of 50, 35 s left")
    panel.findChild(QtWidgets.QLabel, "modelInfoLabel").setText(
        "CARL for 3-D brain MR, any contrast. brain MR (3-D), whole head; input 64 × 72 × 64 at 3 mm; weights shipped, 9 MiB.")
    panel.findChild(QtWidgets.QPushButton, "registerButton").setText("Cancel")
    panel.resize(460, 600)
    return app, panel


def render(path: str) -> None:
    app, panel = build_panel()
    panel.show()
    app.processEvents()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not panel.grab().save(path):
        raise RuntimeError(f"could not write {path}")


if __name__ == "__main__":
    render(sys.argv[1])
