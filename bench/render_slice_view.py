"""A registration result as Slicer shows it: one slice view rendered by Slicer's own view code.

Runs in an environment of its own with trame-slicer (Kitware: Slicer's slice views, displayable
managers and layer logic on the slicer-core wheel, rendered offscreen), which pins another
slicer-core than the tests:

    python -m venv .venv-view && .venv-view/bin/pip install "trame-slicer[standalone]==2.0.0"
    .venv-view/bin/python bench/render_slice_view.py --fixed F --warped W --transform T.h5 --out view.png

The view: the fixed volume, the warped moving volume over it at 50 % opacity, and the transform's
grid (Slicer's grid visualization of a transform, over the fixed volume, coloured by displacement),
the transform loaded with linear interpolation as the module loads it.

The README's picture (``Resources/Screenshots/slicer-view.png``), the tumour pair of ../shared/data
registered with ``carl-brain-3d``:

    F=../shared/data/tiny_fixtures/slicer_mrbraintumor
    .venv/bin/carl-register --moving $F/MRBrainTumor2.nii.gz --fixed $F/MRBrainTumor1.nii.gz --modality mr \
        --out-transform /tmp/view/t.h5 --out-warped /tmp/view/warped.nrrd
    .venv-view/bin/python bench/render_slice_view.py --fixed $F/MRBrainTumor1.nii.gz \
        --warped /tmp/view/warped.nrrd --transform /tmp/view/t.h5 --out Resources/Screenshots/slicer-view.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

from slicer import vtkMRMLTransformDisplayNode, vtkSlicerTransformLogic
from trame_slicer.core import SlicerApp
from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition
from vtkmodules.vtkIOImage import vtkPNGWriter
from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter


def show_result(app: SlicerApp, fixed_path: Path, warped_path: Path, transform_path: Path, orientation: str):
    """Load the three files and set the view up as the module does."""
    fixed, warped = (app.io_manager.load_volumes(str(p))[0] for p in (fixed_path, warped_path))
    transform_logic = vtkSlicerTransformLogic()
    transform_logic.SetMRMLScene(app.scene)
    transform = transform_logic.AddTransform(str(transform_path), app.scene)
    transform.GetTransformFromParent().SetInterpolationModeToLinear()
    transform.CreateDefaultDisplayNodes()
    display = transform.GetDisplayNode()
    display.SetVisibility(True)
    display.SetVisibility2D(True)
    display.SetVisualizationMode(vtkMRMLTransformDisplayNode.VIS_MODE_GRID)
    display.SetGridSpacingMm(max(5.0, 8 * max(fixed.GetSpacing())))
    display.SetAndObserveRegionNode(fixed)
    view = app.view_manager.create_view(ViewLayoutDefinition.slice_view(orientation))
    view.set_background_volume_id(fixed.GetID())
    view.set_foreground_volume_id(warped.GetID())
    view.set_foreground_opacity(0.5)
    view.fit_view_to_content()
    return view


def write_png(view, path: Path, size=(640, 640)) -> None:
    window = view.render_window()
    window.SetSize(*size)
    view.fit_view_to_content()
    view.render()
    grab = vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.ReadFrontBufferOff()
    grab.Update()
    writer = vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixed", type=Path, required=True)
    parser.add_argument("--warped", type=Path, required=True)
    parser.add_argument("--transform", type=Path, required=True, help="fixed → moving transform (.h5)")
    parser.add_argument("--orientation", default="Axial", choices=["Axial", "Coronal", "Sagittal"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    view = show_result(app, args.fixed, args.warped, args.transform, args.orientation)
    write_png(view, args.out)


if __name__ == "__main__":
    main()
