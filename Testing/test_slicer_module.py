"""The Slicer module file checked without Slicer: imports, .ui names and classes, parameters.

(The Logic runs end to end against the stand-in Slicer layer in test_slicer_logic.py.)
"""
from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ElementTree

from conftest import REPO, require_module

MODULE_FILE = REPO / "CARLRegistration" / "CARLRegistration.py"
UI_FILE = REPO / "CARLRegistration" / "Resources" / "UI" / "CARLRegistration.ui"
SOURCE = MODULE_FILE.read_text()
TREE = ast.parse(SOURCE, feature_version=(3, 9))


def ui_widgets():
    """name → (class, SlicerParameterName or None, nodeTypes) of every widget in the .ui."""
    widgets = {}
    for widget in ElementTree.parse(UI_FILE).iter("widget"):
        parameter, node_types = None, []
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                parameter = prop.findtext("string")
            if prop.get("name") == "nodeTypes":
                node_types = [s.text for s in prop.iter("string")]
        widgets[widget.get("name")] = (widget.get("class"), parameter, node_types)
    return widgets


def parameter_fields():
    """name → annotation source of the @parameterNodeWrapper class."""
    for node in TREE.body:
        if isinstance(node, ast.ClassDef) and node.name == "CARLRegistrationParameterNode":
            return {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("no parameter node class")


def test_module_file_imports_neither_torch_nor_the_engine():
    top_level = set()
    for node in TREE.body:
        if isinstance(node, ast.Import):
            top_level |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
    assert not top_level & {"torch", "carlreg", "SimpleITK", "numpy"}, top_level
    assert {"slicer", "qt", "vtk"} <= top_level


def test_every_widget_the_code_uses_exists_with_the_expected_class():
    widgets = ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", SOURCE))
    assert used and used <= set(widgets), used - set(widgets)
    expected = {"registerButton": "QPushButton", "progressBar": "QProgressBar", "statusLabel": "QLabel",
                "modelComboBox": "QComboBox", "deviceComboBox": "QComboBox"}
    for name, widget_class in expected.items():
        assert name in used and widgets[name][0] == widget_class, name


def test_parameter_names_match_the_ui_and_widget_kinds():
    fields = parameter_fields()
    bound = {parameter: (name, cls, node_types) for name, (cls, parameter, node_types) in ui_widgets().items() if parameter}
    assert set(bound) == set(fields)
    for parameter, annotation in fields.items():
        _, widget_class, node_types = bound[parameter]
        if annotation.startswith("vtkMRML"):
            assert widget_class == "qMRMLNodeComboBox" and node_types == [annotation], parameter
        elif annotation.startswith("Union[vtkMRML"):
            members = [t.strip() for t in annotation[len("Union["):-1].split(",")]
            assert widget_class == "qMRMLNodeComboBox" and node_types == members, parameter
        elif annotation == "bool":
            assert widget_class == "QCheckBox", parameter
        elif "int" in annotation:
            assert widget_class == "QSpinBox", parameter
        elif "float" in annotation:
            assert widget_class == "QDoubleSpinBox", parameter
        else:
            assert annotation == "str" and widget_class in ("QComboBox", "ctkPathLineEdit"), parameter


def test_module_cmakelists_lists_the_module_and_its_resources():
    text = (REPO / "CARLRegistration" / "CMakeLists.txt").read_text()
    assert "${MODULE_NAME}.py" in text and "Resources/UI/${MODULE_NAME}.ui" in text
    assert (REPO / "CARLRegistration" / "Resources" / "Icons" / "CARLRegistration.png").is_file()
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_the_panel_builds_from_the_ui_with_real_qt(tmp_path):
    require_module("PySide6")
    from PySide6 import QtWidgets

    from panel_rendering import PLACEHOLDERS, build_panel, render

    app, panel = build_panel()
    widgets = ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", SOURCE))
    assert used
    for name in used:
        qt_class = PLACEHOLDERS.get(widgets[name][0], widgets[name][0])
        assert panel.findChild(getattr(QtWidgets, qt_class), name) is not None, name
    render(str(tmp_path / "panel.png"))
    assert (tmp_path / "panel.png").stat().st_size > 10_000
