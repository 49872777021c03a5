"""Real images from ../shared/data as network inputs: [0, 1] intensities at a given shape."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from conftest import shared_data_path

MR_PAIR_3D = ("tiny_fixtures/slicer_mrbraintumor/MRBrainTumor1.nii.gz", "tiny_fixtures/slicer_mrbraintumor/MRBrainTumor2.nii.gz")
MR_PAIR_2D = ("tiny_fixtures/itk_examples_2d/BrainProtonDensitySlice.png", "tiny_fixtures/itk_examples_2d/BrainT1Slice.png")


def load_as_input(relative_path: str, shape: Sequence[int]) -> torch.Tensor:
    """``(1, 1, *shape)`` float32: the image divided by its maximum, resized (linear) to ``shape``."""
    image = sitk.ReadImage(str(shared_data_path(*relative_path.split("/"))), sitk.sitkFloat32)
    array = torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32))[None, None]
    array = array / array.max()
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(array, size=list(shape), mode=mode, align_corners=False)


def load_pair(paths, shape):
    return load_as_input(paths[0], shape), load_as_input(paths[1], shape)
