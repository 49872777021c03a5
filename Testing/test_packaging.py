"""What users install: the wheel (models inside), the Slicer extension's file list, the repository's size.

The extension's list of engine modules is derived here from the imports: the modules the Slicer
module imports, and those its worker process (``python -m carlreg.cli register``) imports, all
the way down, at module level and inside functions alike.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Iterator, Set, Tuple

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, require_module, shared_data_path

SOURCE_ROOT = REPO / "CARLRegistration"
CMAKE_LIST = (SOURCE_ROOT / "CMakeLists.txt").read_text()


def _cmake_set(name: str) -> list:
    items = re.search(rf"set\({name}\s+([^)]*)\)", CMAKE_LIST).group(1).split()
    return [item.replace("${MODULE_NAME}", "CARLRegistration") for item in items]


def _module_file(module: str) -> Path:
    """The source file of a dotted carlreg module (a package's ``__init__.py``)."""
    path = SOURCE_ROOT.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _imported_modules(path: Path, module: str) -> Iterator[str]:
    """Every carlreg module ``path`` (module ``module``) can import: import statements anywhere in
    the file, and string constants naming a carlreg module (``importlib`` look-ups)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)  # `from . import x`: x may be a module
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"carlreg(\.\w+)+", node.value):
            yield node.value


def _closure(roots: Set[str]) -> Set[str]:
    """The carlreg modules reachable from ``roots``, with the packages that hold them."""
    found: Set[str] = set()
    pending = list(roots)
    while pending:
        module = pending.pop()
        if module in found or not module.startswith("carlreg") or not _module_file(module).is_file():
            continue
        found.add(module)
        parts = module.split(".")
        pending.extend(".".join(parts[:n]) for n in range(1, len(parts)))
        pending.extend(_imported_modules(_module_file(module), module))
    return found


def _registration_roots() -> Set[str]:
    """What registration in Slicer starts from: the engine modules the Slicer module loads by name
    (``self._engine("registry")``) and the module its worker runs (``[python, "-m", X, ...]``)."""
    roots = set()
    module_tree = ast.parse((SOURCE_ROOT / "CARLRegistration.py").read_text())
    for node in ast.walk(module_tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "_engine":
            roots.add(f"carlreg.{node.args[0].value}")
    for node in ast.walk(ast.parse(_module_file("carlreg.worker").read_text())):
        if isinstance(node, ast.List):
            values = [getattr(element, "value", None) for element in node.elts]
            if "-m" in values:
                roots.add(values[values.index("-m") + 1])
    assert {"carlreg.registry", "carlreg.worker", "carlreg.cli"} <= roots, roots
    return roots


def test_the_extension_installs_exactly_what_registration_imports():
    needed = {str(_module_file(m).relative_to(SOURCE_ROOT)) for m in _closure(_registration_roots())}
    listed = set(_cmake_set("MODULE_PYTHON_SCRIPTS")) - {"CARLRegistration.py"}
    assert listed == needed, (sorted(listed - needed), sorted(needed - listed))
    # what it leaves out is the training side, not registration
    left_out = {str(p.relative_to(SOURCE_ROOT)) for p in (SOURCE_ROOT / "carlreg").rglob("*.py")} - needed
    assert {"carlreg/train.py", "carlreg/data.py", "carlreg/retina.py", "carlreg/train_cli.py"} <= left_out


def test_the_extension_ships_the_models_the_module_offers():
    from carlreg.registry import WEIGHTS_DIR, available_models, model_card

    # the models it offers that ship their weights (uniCARL's are downloaded on first use)
    offered = [name for name in available_models(3, baselines=False) if (WEIGHTS_DIR / model_card(name)["file"]).is_file()]
    weights = {item for item in _cmake_set("MODULE_PYTHON_RESOURCES") if item.startswith("carlreg/weights/")}
    assert offered and weights == {f"carlreg/weights/{name}{suffix}" for name in offered for suffix in (".pt", ".json", ".md")}


def test_the_extension_layout_registers_with_only_its_listed_files(tmp_path):
    """The files the CMake list installs, laid out as the built extension lays them out
    (qt-scripted-modules/), run the worker's command: the registry finds the model there."""
    folder = shared_data_path("tiny_fixtures", "monai_anatomical_pair")
    modules = tmp_path / "lib" / "Slicer-5.8" / "qt-scripted-modules"
    for item in _cmake_set("MODULE_PYTHON_SCRIPTS")[1:] + _cmake_set("MODULE_PYTHON_RESOURCES"):
        (modules / item).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SOURCE_ROOT / item, modules / item)
    environment = {k: v for k, v in os.environ.items() if k != "CARLREG_WEIGHTS"}
    environment["PYTHONPATH"] = str(modules)
    from carlreg.worker import WorkerJob

    out = tmp_path / "out"
    out.mkdir()
    job = WorkerJob(["--moving", folder / "reoriented_anat_moved.nii", "--fixed", folder / "anatomical.nii",
                     "--model", "carl-brain-3d", "--device", "cpu", "--out-transform", out / "t.h5",
                     "--summary", out / "s.json"], env=environment)
    assert job.command[1:3] == ["-m", "carlreg.cli"]
    assert job.start().wait(timeout=300) == 0, job.error
    assert (out / "t.h5").is_file() and json.loads((out / "s.json").read_text())["lncc_after"] > 0
    located = subprocess.run([sys.executable, "-c", "import carlreg.registry as r; print(r.WEIGHTS_DIR)"],
                             capture_output=True, text=True, cwd=tmp_path, env=environment)
    assert Path(located.stdout.strip()) == modules / "carlreg" / "weights", located.stderr


def _build_wheel(tmp_path: Path) -> Path:
    """A wheel built from a copy of what the package needs (the checkout stays untouched)."""
    source = tmp_path / "source"
    for item in ("pyproject.toml", "README.md", "LICENSE"):
        (source / item).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / item, source / item)
    shutil.copytree(SOURCE_ROOT / "carlreg", source / "CARLRegistration" / "carlreg",
                    ignore=shutil.ignore_patterns("__pycache__"))
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", source],
        capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    (wheel,) = (tmp_path / "dist").glob("carlreg-*.whl")
    return wheel


def _check_demo_pair(out: Path) -> None:
    """The demo pair: brains 40 mm apart, the copy deformed, fields of view of their own."""
    from carlreg.demo import SHIFT_MM

    moving, fixed = sitk.ReadImage(str(out / "moving.nii.gz")), sitk.ReadImage(str(out / "fixed.nii.gz"))

    def centroid(image):
        array = sitk.GetArrayFromImage(image)
        index = np.argwhere(array > 0.25 * array.max()).mean(axis=0)[::-1]
        return np.array(image.TransformContinuousIndexToPhysicalPoint(index.tolist()))

    assert np.allclose(centroid(moving) - centroid(fixed), SHIFT_MM, atol=2.0)
    assert moving.GetSize() != fixed.GetSize()
    # deformed, not only moved (a whole-voxel shift alone would move back exactly)
    back = sitk.Resample(moving, fixed, sitk.TranslationTransform(3, list(SHIFT_MM)), sitk.sitkLinear, 0.0)
    brain = sitk.GetArrayFromImage(fixed) > 0.25 * float(sitk.GetArrayFromImage(fixed).max())
    difference = np.abs(sitk.GetArrayFromImage(back) - sitk.GetArrayFromImage(fixed))[brain]
    assert difference.mean() > 0.02 * float(sitk.GetArrayFromImage(fixed).max())


def _check_demo_registration(out: Path, stdout: str) -> None:
    """The shipped carl-brain-3d found the 40 mm offset without pre-alignment: fixed brain points
    map about 40 mm up into the moving image, and the images agree better afterwards."""
    from carlreg.demo import SHIFT_MM

    for name in ("fixed_to_moving.h5", "warped.nii.gz", "report.png", "summary.json"):
        assert (out / name).is_file() and str(out / name) in stdout
    fixed = sitk.ReadImage(str(out / "fixed.nii.gz"))
    brain = sitk.GetArrayFromImage(fixed) > 0.25 * float(sitk.GetArrayFromImage(fixed).max())
    transform = sitk.ReadTransform(str(out / "fixed_to_moving.h5"))
    points = [fixed.TransformIndexToPhysicalPoint(p.tolist())
              for p in np.argwhere(brain)[:: max(1, int(brain.sum()) // 500), ::-1]]
    displacement = np.array([np.subtract(transform.TransformPoint(p), p) for p in points])
    assert np.allclose(np.median(displacement, axis=0), SHIFT_MM, atol=5.0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lncc_after"] > summary["lncc_before"] + 0.3 and summary["folding_percent"] < 1.0


def _fresh_environment_with_the_wheel(tmp_path: Path) -> Tuple[Path, Path]:
    """A new virtual environment with the wheel installed (no index); its dependencies (torch,
    SimpleITK, nilearn) come from the test environment by a path entry, so nothing large is
    installed again, while carlreg itself can only come from the wheel. Returns its python and
    its site-packages."""
    wheel = _build_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    # the test environment's pip installs into it (a pip of its own would take seconds to set up)
    completed = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
                                "--no-index", wheel], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python, site


def test_the_wheel_carries_the_models_and_runs_the_demo_in_a_fresh_environment(tmp_path):
    """The wheel in a fresh environment: its models, its console script, and the README's first
    command, ``python -m carlreg demo``: the pair it writes and its registration (the demo's
    folder rules: Testing/test_physical_space.py)."""
    require_module("nilearn")
    python, site = _fresh_environment_with_the_wheel(tmp_path)
    environment = {k: v for k, v in os.environ.items() if k not in ("CARLREG_WEIGHTS", "PYTHONPATH")}
    work = tmp_path / "work"
    work.mkdir()

    def run(*command):
        return subprocess.run([str(c) for c in command], capture_output=True, text=True, cwd=work, env=environment)

    located = run(python, "-c", "import carlreg.registry as r; print(r.WEIGHTS_DIR); print(r.available_models())")
    weights_dir, names = located.stdout.splitlines()
    assert Path(weights_dir) == site / "carlreg" / "weights", located.stderr
    assert "carl-brain-3d" in names and "carl-retina-2d" in names
    listing = run(python.parent / "carl-register", "--list-models")
    assert listing.returncode == 0 and "carl-brain-3d" in listing.stdout and "3 mm" in listing.stdout, listing.stderr
    out = work / "demo"
    completed = run(python, "-m", "carlreg", "demo", "--out", out, "--device", "cpu", "--progress", "none")
    assert completed.returncode == 0, completed.stderr
    _check_demo_pair(out)
    _check_demo_registration(out, completed.stdout)


def _tracked_sizes() -> dict:
    if not (REPO / ".git").exists():
        message = "not a git checkout: the repository size check needs `git ls-files`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    paths = [p for p in listed.decode().split("\0") if p]
    return {p: (REPO / p).stat().st_size for p in paths if (REPO / p).is_file()}


#: the one folder whose files may be large: the shipped models, one weights file each
SHIPPED_WEIGHTS = "CARLRegistration/carlreg/weights/"


def test_the_repository_stays_small():
    """Tracked files under 50 MiB in all; none over 20 MB outside the shipped weights; no
    training checkpoint or copy of a model tracked (one .pt file per shipped model)."""
    sizes = _tracked_sizes()
    assert sum(sizes.values()) < 50 * 2**20, sum(sizes.values()) / 2**20
    large = [p for p, size in sizes.items() if size > 20e6 and not p.startswith(SHIPPED_WEIGHTS)]
    assert not large, large
    weights = [p for p in sizes if p.endswith((".pt", ".pth", ".safetensors"))]
    cards = [json.loads((REPO / p).read_text()) for p in sizes if p.startswith(SHIPPED_WEIGHTS) and p.endswith(".json")]
    assert sorted(weights) == sorted(SHIPPED_WEIGHTS + card["file"] for card in cards if not card.get("url")), weights
