"""uniCARL's preprocessing in our code (carlreg.preprocess.unicarl_preprocess) against its authors'
(icon_registration.unicarl.register.preprocess, on ITK images) on real CT and MR."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from carlreg.io import ImageError
from carlreg.preprocess import unicarl_preprocess
from conftest import require_module, shared_data_path


@pytest.fixture(scope="module")
def reference_preprocess():
    """The authors' function. Its module imports packages it does not use here (torchvision for a
    utility, footsteps for experiment logging): empty stand-ins take their place for the import."""
    itk = require_module("itk")
    saved = {name: sys.modules.get(name) for name in ("torchvision", "torchvision.utils", "footsteps")}
    for name in saved:
        sys.modules.setdefault(name, types.ModuleType(name))
    try:
        from icon_registration.unicarl.register import preprocess
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
    return itk, preprocess


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("parts", [
    ("totalsegmentator_examples", "example_ct.nii.gz"),
    ("tiny_fixtures", "slicer_mrbraintumor", "MRBrainTumor1.nii.gz"),
    ("tiny_fixtures", "monai_anatomical_pair", "anatomical.nii"),
], ids=["CT", "MR tumour", "MR MONAI"])
def test_preprocessing_equals_the_authors(reference_preprocess, parts):
    itk, preprocess = reference_preprocess
    path = shared_data_path(*parts)
    theirs = preprocess(itk.imread(str(path)))
    ours = unicarl_preprocess(sitk.ReadImage(str(path)))
    expected = itk.GetArrayFromImage(theirs)
    assert sitk.GetArrayViewFromImage(ours).shape == expected.shape
    assert np.abs(sitk.GetArrayViewFromImage(ours) - expected).max() <= 1e-6
    assert expected.min() == 0.0 and expected.max() == 1.0
    # ITK's crop keeps the origin and starts the region's index past the cropped slices: the same
    # physical placement as our moved origin
    start = np.array(theirs.GetLargestPossibleRegion().GetIndex(), dtype=float)
    direction = np.array(theirs.GetDirection())
    placed = np.array(theirs.GetOrigin()) + direction @ (start * np.array(theirs.GetSpacing()))
    assert np.allclose(ours.GetOrigin(), placed, atol=1e-6) and start.min() >= 1
    assert np.allclose(np.array(ours.GetDirection()).reshape(3, 3), direction, atol=1e-9)
    assert np.allclose(ours.GetSpacing(), theirs.GetSpacing())


def test_a_constant_image_is_refused():
    with pytest.raises(ImageError, match="the image is constant"):
        unicarl_preprocess(sitk.Image([8, 8, 8], sitk.sitkFloat32))


class _IdentityUniCARL(torch.nn.Module):
    """A stand-in network with uniCARL's interface whose map is the identity in the unit frame."""

    input_spacing_mm = None
    preprocessing = "unicarl"

    def __init__(self, shape):
        super().__init__()
        self.input_shape = tuple(shape)

    def forward(self, moving, fixed):
        from carlreg.maps import identity_map

        return identity_map(self.input_shape).expand(moving.shape[0], -1, *self.input_shape)


def test_the_pipeline_places_the_cropped_images_in_physical_space():
    """Each image cropped by uniCARL's preprocessing and resized whole: a copy of the fixed image
    moved 20 mm, in a field of view 10 slices larger (a constant border that the crop removes), is
    found 20 mm away by an identity map in the unit frame, everywhere on the fixed image's full
    grid: the crop's physical placement is kept."""
    from carlreg.pipeline import register

    fixed = sitk.ReadImage(str(shared_data_path("tiny_fixtures", "slicer_mrbraintumor", "MRBrainTumor1.nii.gz")))
    moving = sitk.ConstantPad(fixed, [0, 0, 10], [0, 0, 0], 0.0)
    moving.SetOrigin((np.array(moving.GetOrigin()) + [0.0, 0.0, 20.0]).tolist())
    assert moving.GetSize()[2] == fixed.GetSize()[2] + 10
    result = register(moving, fixed, _IdentityUniCARL((48, 48, 48)), device="cpu")
    displacement = sitk.GetArrayViewFromImage(result.transform.GetDisplacementField())
    assert displacement.shape[:3] == sitk.GetArrayViewFromImage(fixed).shape
    assert np.allclose(displacement, [0.0, 0.0, 20.0], atol=1e-4)  # the unit-frame map is float32
