"""Reading images and writing results: clear errors in, atomic writes out.

Images are SimpleITK images (physical geometry: origin, spacing, direction; LPS millimetres).
Only this module converts between SimpleITK arrays and tensors: ``sitk.GetArrayFromImage``
reverses the axes, so tensors are in (z, y, x) order while SimpleITK indices are (x, y, z).

Outputs are written to temporary names in their destination folders and renamed together at
the end (:func:`atomic_outputs`), so a failed or cancelled run leaves no partial file and no
incomplete set of files; no output may be one of the inputs.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch

__all__ = [
    "ImageError",
    "read_image",
    "image_to_tensor",
    "check_outputs",
    "atomic_output",
    "atomic_outputs",
    "write_image",
    "write_transform",
    "read_transform",
    "TRANSFORM_FILE_SUFFIXES",
    "FIELD_IMAGE_SUFFIXES",
]

PathLike = Union[str, os.PathLike]
#: transform outputs written as ITK transform files
TRANSFORM_FILE_SUFFIXES = (".h5", ".hdf5", ".tfm", ".txt")
#: transform outputs written as displacement-field images (LPS vectors)
FIELD_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class ImageError(ValueError):
    """An input image that cannot be registered, with what was expected and what was found."""


def read_image(path: PathLike, what: str = "image") -> sitk.Image:
    """A 2-D or 3-D scalar image from a file SimpleITK reads, or from a DICOM series folder.

    Raises:
        ImageError: missing path, unreadable file, no DICOM series, vector or 4-D image.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"read_image(): {what} not found: {path}")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise ImageError(f"read_image(): {what} folder holds no DICOM series: {path}")
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown error"
        raise ImageError(f"read_image(): cannot read {what} {path}: {first_line}") from err
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageError(
            f"read_image(): {what} must be a scalar image, got {image.GetNumberOfComponentsPerPixel()} "
            f"components per voxel in {path}"
        )
    if image.GetDimension() not in (2, 3):
        raise ImageError(f"read_image(): {what} must be 2-D or 3-D, got {image.GetDimension()}-D in {path}")
    return image


def image_to_tensor(image: sitk.Image) -> torch.Tensor:
    """``(1, 1, *shape)`` float32 tensor of the image's voxels, tensor order (z, y, x) — a copy."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    return torch.from_numpy(array)[None, None]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(outputs: Iterable[Optional[PathLike]], inputs: Iterable[Optional[PathLike]]) -> List[Path]:
    """Validate output paths before any work: folders writable, none equal to an input or to another output.

    Returns the outputs given (as Paths). Raises ``ValueError`` naming the offending path.
    """
    inputs = [Path(p).resolve() for p in inputs if p is not None]
    checked: List[Path] = []
    for output in outputs:
        if output is None:
            continue
        path = Path(output)
        resolved = path.resolve()
        if any(resolved == i or _same_file(resolved, i) for i in inputs):
            raise ValueError(f"output {path} is also an input: refusing to overwrite it")
        if resolved in [c.resolve() for c in checked]:
            raise ValueError(f"output {path} is given twice")
        folder = resolved.parent
        if not folder.is_dir():
            raise ValueError(f"output folder does not exist: {folder}")
        if not os.access(folder, os.W_OK):
            raise ValueError(f"output folder is not writable: {folder}")
        checked.append(path)
    return checked


def _full_suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _temporary_beside(path: Path) -> Path:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial" + _full_suffix(path), dir=path.parent)
    os.close(handle)
    # mkstemp makes the file private (0600); outputs get the permissions a plain write would give
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    return Path(temporary)


@contextlib.contextmanager
def atomic_outputs() -> Iterator[Callable[[PathLike], Path]]:
    """Yields ``reserve(path) -> temporary path`` (beside ``path``, same suffix).

    When the block succeeds every temporary file is renamed onto its target; when it fails,
    or is cancelled, all of them are removed and no target is touched.
    """
    pending: List[Tuple[Path, Path]] = []

    def reserve(path: PathLike) -> Path:
        target = Path(path)
        temporary = _temporary_beside(target)
        pending.append((temporary, target))
        return temporary

    try:
        yield reserve
        for temporary, target in pending:
            os.replace(temporary, target)
    finally:
        for temporary, _ in pending:
            if temporary.exists():
                temporary.unlink()


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """One output: yields a temporary path beside ``path``, renamed onto it if the block succeeds."""
    with atomic_outputs() as reserve:
        yield reserve(path)


def write_image(image: sitk.Image, path: PathLike) -> None:
    """Write an image (format from the suffix, compressed where the format allows)."""
    sitk.WriteImage(image, str(path), True)


def write_transform(transform: sitk.DisplacementFieldTransform, path: PathLike) -> None:
    """Write a displacement-field transform.

    ``.h5``/``.tfm``/``.txt``: an ITK transform file. ``.nii.gz``/``.nrrd``/``.mha`` (and
    uncompressed variants): the displacement field as a vector image, LPS millimetres, on
    its grid — the convention of ITK, ANTs and Slicer.
    """
    path = Path(path)
    suffix = _full_suffix(path)
    if suffix in TRANSFORM_FILE_SUFFIXES:
        sitk.WriteTransform(transform, str(path))
    elif suffix in FIELD_IMAGE_SUFFIXES:
        write_image(transform.GetDisplacementField(), path)
    else:
        raise ValueError(
            f"write_transform(): {path} has an unknown suffix; expected one of "
            f"{', '.join(TRANSFORM_FILE_SUFFIXES + FIELD_IMAGE_SUFFIXES)}"
        )


def read_transform(path: PathLike) -> sitk.Transform:
    """A transform written by :func:`write_transform` (or any ITK transform file / LPS displacement field image)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"read_transform(): transform not found: {path}")
    suffix = _full_suffix(path)
    try:
        if suffix in FIELD_IMAGE_SUFFIXES:
            field = sitk.ReadImage(str(path))
            if field.GetNumberOfComponentsPerPixel() != field.GetDimension():
                raise ValueError(
                    f"read_transform(): {path} must hold {field.GetDimension()}-component displacement vectors, "
                    f"got {field.GetNumberOfComponentsPerPixel()} components"
                )
            return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
        return sitk.ReadTransform(str(path))
    except RuntimeError as err:
        raise ValueError(f"read_transform(): cannot read {path}: {str(err).strip().splitlines()[-1]}") from err
