"""The demo pair: the MNI152 template (shipped by the nilearn package) and a copy of it moved
40 mm and smoothly deformed, in a field of view of its own.

- fixed: nilearn's MNI152 T1 template (ICBM 2009a symmetric, 1 mm), as it is.
- moving: the template's content moved 40 mm up (superior) and deformed by a smooth random
  B-spline displacement (about 3 mm), on a grid 40 voxels taller than the template's, so that
  nothing is cut: the brains sit 40 mm apart and the two images have different fields of view.

``python -m carlreg demo`` writes the pair and registers it with ``carl-brain-3d``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from .cli import register_main, run_command

__all__ = ["SHIFT_MM", "template_path", "make_demo_pair", "demo_main"]

#: the moving copy's translation (LPS millimetres: +z is superior)
SHIFT_MM = (0.0, 0.0, 40.0)
#: standard deviation of the B-spline control-point displacements, millimetres
DEFORMATION_MM = 3.0
SEED = 0


def template_path() -> Path:
    """The MNI152 template file inside the installed nilearn package (no download)."""
    try:
        from nilearn.datasets import MNI152_FILE_PATH
    except ImportError as error:
        raise ImportError("the demo needs nilearn, which ships the MNI152 template: pip install nilearn") from error
    return Path(MNI152_FILE_PATH)


def make_demo_pair(folder: Path) -> Tuple[Path, Path]:
    """Write ``moving.nii.gz`` and ``fixed.nii.gz`` into ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fixed = sitk.Cast(sitk.ReadImage(str(template_path())), sitk.sitkFloat32)
    grid = sitk.Image([fixed.GetWidth(), fixed.GetHeight(), fixed.GetDepth() + int(round(SHIFT_MM[2]))], sitk.sitkFloat32)
    grid.SetSpacing(fixed.GetSpacing())
    grid.SetDirection(fixed.GetDirection())
    grid.SetOrigin(fixed.GetOrigin())
    deformation = sitk.BSplineTransformInitializer(fixed, [4, 4, 4])
    generator = np.random.default_rng(SEED)
    deformation.SetParameters((generator.normal(0.0, DEFORMATION_MM, len(deformation.GetParameters()))).tolist())
    # moving(x) = template(deformation(x − shift)): the content is moved by +shift (a composite
    # transform applies its last transform first)
    transform = sitk.CompositeTransform([deformation, sitk.TranslationTransform(3, [-s for s in SHIFT_MM])])
    moving = sitk.Resample(fixed, grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    paths = folder / "moving.nii.gz", folder / "fixed.nii.gz"
    sitk.WriteImage(moving, str(paths[0]))
    sitk.WriteImage(fixed, str(paths[1]))
    return paths


def demo_main(argv: Optional[List[str]] = None) -> int:
    """``python -m carlreg demo [--model M] [--out FOLDER]``: make the demo pair (:mod:`carlreg.demo`),
    register it, and say where the results are."""
    parser = argparse.ArgumentParser(prog="carlreg demo", description="Register the demo pair (MNI152 and a moved, deformed copy).")
    parser.add_argument("--model", default="carl-brain-3d", help="shipped model name or weights file")
    parser.add_argument("--out", default="demo-output", help="folder for the pair and the results")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps")
    parser.add_argument("--progress", choices=["bar", "json", "none"], default="bar" if sys.stderr.isatty() else "none")
    args = parser.parse_args(argv)
    out = Path(args.out)
    pair: List[Path] = []

    def body() -> None:
        from .registry import model_card

        if not Path(args.model).exists():
            model_card(args.model)  # an unknown model fails here, before any file is written
        marker = out / ".carlreg-demo"
        if out.exists() and any(out.iterdir()) and not marker.exists():
            raise ValueError(f"{out} holds other files: give the demo a new or empty folder (--out)")
        pair.extend(make_demo_pair(out))
        marker.touch()

    code = run_command("carlreg demo", body)
    if code:
        return code
    results = {"transform": out / "fixed_to_moving.h5", "warped": out / "warped.nii.gz",
               "report": out / "report.png", "summary": out / "summary.json"}
    code = register_main([
        "--moving", str(pair[0]), "--fixed", str(pair[1]), "--model", args.model, "--modality", "mr",
        "--device", args.device, "--progress", args.progress, "--out-transform", str(results["transform"]),
        "--out-warped", str(results["warped"]), "--report", str(results["report"]), "--summary", str(results["summary"]),
    ])
    if code == 0:
        metrics = json.loads(results["summary"].read_text())
        print(f"Registered {pair[0]} (moved 40 mm, deformed) to {pair[1]} in {metrics['seconds']:.1f} s on "
              f"{metrics['device']}: LNCC {metrics['lncc_before']:.3f} -> {metrics['lncc_after']:.3f}, "
              f"{metrics['folding_percent']:.2f} % folding.")
        for what, path in results.items():
            print(f"  {what:<9} {path}")
    return code
