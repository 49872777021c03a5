"""The classical registrations the benchmarks compare with, each as its tool's users run it.

- ANTs SyN: antspyx ``registration(type_of_transform="SyN")`` (its default: affine then SyN),
  with a fixed random seed.
- Elastix: itk-elastix with its default ``affine`` then ``bspline`` parameter maps.

Each returns what the benchmarks need of it: a function that warps another image of the moving
space onto the fixed grid with the tool's own resampling (labels with nearest neighbour), and
the fixed → moving displacement field (LPS mm, on the fixed grid), so that every method's
accuracy and folding are measured with one formula.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator, Tuple

import SimpleITK as sitk

__all__ = ["ants_syn", "elastix_affine_bspline", "versions"]

SEED = 2026
#: warp(moving-space image path, is_label) -> the image resampled onto the fixed grid
Warp = Callable[[Path, bool], sitk.Image]


#: the package of each peer method, named in a result header only where that method ran
PEER_PACKAGES = {"ants": "antspyx", "elastix": "itk-elastix"}


def versions(methods=()) -> str:
    """The versions of the packages the figures of ``methods`` (the methods run) depend on, for
    the result headers: torch and SimpleITK, and each peer's package where it ran."""
    from importlib import metadata

    found = []
    peers = [package for method, package in PEER_PACKAGES.items() if method in methods]
    for package in ("torch", "SimpleITK", *peers):
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            found.append(f"{package} absent")
    return ", ".join(found)


@contextlib.contextmanager
def _inside(folder: Path) -> Iterator[None]:
    """Run in ``folder``: transformix writes some of its files into the working folder."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def ants_syn(moving: Path, fixed: Path, work: Path) -> Tuple[Warp, sitk.Image]:
    """ANTs SyN with antspyx's defaults; intermediate files go to ``work``."""
    import ants

    # its affine stage samples the metric at random points: seeded (antsRegistration's
    # --random-seed) so that a rerun prints the same figures; set_ants_deterministic would also
    # force a single thread, which would misstate its speed
    ants.config._random_seed = SEED
    fixed_ants, moving_ants = ants.image_read(str(fixed)), ants.image_read(str(moving))
    registration = ants.registration(fixed=fixed_ants, moving=moving_ants, type_of_transform="SyN",
                                     outprefix=str(work / "ants_"))

    def warp(path: Path, is_label: bool) -> sitk.Image:
        warped = ants.apply_transforms(fixed=fixed_ants, moving=ants.image_read(str(path)),
                                       transformlist=registration["fwdtransforms"],
                                       interpolator="genericLabel" if is_label else "linear")
        out = work / "ants_warped.nii.gz"
        warped.to_file(str(out))
        return sitk.Cast(sitk.ReadImage(str(out)), sitk.sitkInt32) if is_label else sitk.ReadImage(str(out))

    composite = ants.apply_transforms(fixed=fixed_ants, moving=moving_ants, transformlist=registration["fwdtransforms"],
                                      compose=str(work / "ants_composite_"))
    return warp, sitk.ReadImage(composite, sitk.sitkVectorFloat64)


def elastix_affine_bspline(moving: Path, fixed: Path, work: Path) -> Tuple[Warp, sitk.Image]:
    """Elastix with its default affine and B-spline parameter maps; it writes into ``work``."""
    import itk

    fixed_itk, moving_itk = itk.imread(str(fixed), itk.F), itk.imread(str(moving), itk.F)
    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("affine"))
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("bspline"))
    with _inside(work):
        _, transform_parameters = itk.elastix_registration_method(
            fixed_itk, moving_itk, parameter_object=parameters, log_to_console=False, output_directory=str(work))

    def warp(path: Path, is_label: bool) -> sitk.Image:
        for index in range(transform_parameters.GetNumberOfParameterMaps()):
            transform_parameters.SetParameter(index, "FinalBSplineInterpolationOrder", "0" if is_label else "3")
        with _inside(work):
            warped = itk.transformix_filter(itk.imread(str(path), itk.F), transform_parameters)
        out = work / "elastix_warped.nii.gz"
        itk.imwrite(warped, str(out))
        return sitk.Cast(sitk.ReadImage(str(out)), sitk.sitkInt32) if is_label else sitk.ReadImage(str(out))

    with _inside(work):
        deformation = itk.transformix_deformation_field(moving_itk, transform_parameters)
    itk.imwrite(deformation, str(work / "elastix_field.nii.gz"))
    return warp, sitk.ReadImage(str(work / "elastix_field.nii.gz"), sitk.sitkVectorFloat64)
