"""uniCARL (carlreg.network.unicarl) computes what the authors' reference computes, for the same weights.

The reference is ``icon_registration`` 1.1.9's ``icon_registration.unicarl``, built on the CPU the
way its ``register.get_model()`` builds it: ``unigradicon_train_parallel.make_net(3, [1, 1, *shape],
equivariantize=False)``, from a seeded random state with random BatchNorm statistics and random
(otherwise zero-initialised) U-Net output convolutions, so that every step contributes. Its
training-time ``regis_net`` state_dict, which is the layout of the authors' file (every key
prefixed ``netPsi.netPsi.`` by the augmentation wrapper), is saved to a temporary file, read back
with ``torch.load(weights_only=True)`` and loaded strictly into ours; then ``regis_net`` is
replaced by ``regis_net.netPsi.netPsi`` as ``get_model()`` does, and both directions' maps are
compared on a real image pair, at the smallest input (65³).

The released input (160³) runs the same code at a larger size: its comparison with the reference
(the same weights in the authors' file layout, the same pair, within the same 1e-5) is
``bench/unicarl.py``, which fails when ours differs by more (the four passes at 160³ take over a
minute of CI's CPU). Here, ``load_model`` builds uniCARL at 160³ from the authors' file placed by
hand, with its weights.

Importing the reference needs ``torchvision`` and ``footsteps``, which it imports for training
utilities only; where they are not installed, empty stand-in modules are put in ``sys.modules``
for the import and removed afterwards. The rest of the patching (its attention's padded grid in
the features' dtype) is the project's oracle, ``reference_oracle.load_reference``.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from carlreg.models import load_model
from carlreg.network import build_unicarl, load_unicarl_checkpoint
from carlreg.network.unet import UNet
from carlreg.network.unicarl import CHECKPOINT_PREFIX, MIN_INPUT_SIZE
from conftest import shared_data_path
from reference_oracle import randomise_zero_initialised

#: maps in the unit frame: 1e-5 is 1.6e-3 voxel at 160³
TOLERANCE = 1e-5
SMALLEST_SHAPE = (MIN_INPUT_SIZE,) * 3
RELEASED_SHAPE = (160, 160, 160)
PAIR = ("tiny_fixtures/monai_anatomical_pair/reoriented_anat_moved.nii", "tiny_fixtures/monai_anatomical_pair/anatomical.nii")
TRAINING_ONLY_MODULES = ("torchvision", "footsteps")
#: the reference's 2³ 'same' convolutions warn about their padding copy
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")


@pytest.fixture(scope="module")
def unicarl_reference(reference):
    """``icon_registration.unicarl.unigradicon_train_parallel``, imported with stand-ins for its training-only imports.

    The import also sets ``OMP_NUM_THREADS=8`` in the environment (for its training jobs): restored.
    """
    stubs = {
        name: types.ModuleType(name)
        for name in TRAINING_ONLY_MODULES
        if name not in sys.modules and importlib.util.find_spec(name) is None
    }
    if "torchvision" in stubs:
        stubs["torchvision.utils"] = stubs["torchvision"].utils = types.ModuleType("torchvision.utils")
    threads = os.environ.get("OMP_NUM_THREADS")
    sys.modules.update(stubs)
    try:
        return importlib.import_module("icon_registration.unicarl.unigradicon_train_parallel")
    finally:
        for name, stub in stubs.items():
            if sys.modules.get(name) is stub:
                del sys.modules[name]
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = threads


def build_reference_unicarl(unicarl_reference, shape):
    """(the reference loss model after ``get_model()``'s steps, the authors'-layout state_dict)."""
    torch.manual_seed(0)
    loss_model = unicarl_reference.make_net(3, [1, 1, *shape], equivariantize=False)
    randomise_zero_initialised(loss_model.regis_net)
    file_state = {key: value.clone() for key, value in loss_model.regis_net.state_dict().items()}
    loss_model.regis_net = loss_model.regis_net.netPsi.netPsi
    loss_model.assign_identity_map([1, 1, *shape])
    loss_model.eval()
    return loss_model, file_state


def reference_map(loss_model, moving, fixed):
    """The reference's fixed → moving map on its grid: ``phi_AB_vectorfield`` of its loss model's forward."""
    with torch.no_grad():
        loss_model.identity_map.isIdentity = True
        return loss_model.regis_net(moving, fixed)(loss_model.identity_map)


def load_input(relative_path: str, shape) -> torch.Tensor:
    """``(1, 1, *shape)`` float32: the image resized (trilinear) to ``shape``, then scaled to [0, 1]."""
    image = sitk.ReadImage(str(shared_data_path(*relative_path.split("/"))), sitk.sitkFloat32)
    array = torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32))[None, None]
    array = F.interpolate(array, size=list(shape), mode="trilinear", align_corners=False)
    return (array - array.min()) / (array.max() - array.min())


@pytest.fixture(scope="module")
def smallest_reference(unicarl_reference):
    """The reference at the smallest input and its file's state_dict, built once for the module."""
    return build_reference_unicarl(unicarl_reference, SMALLEST_SHAPE)


@pytest.fixture(scope="module")
def authors_file(smallest_reference, tmp_path_factory):
    """The reference's weights saved in the authors' layout (every key prefixed), as their file is."""
    _, file_state = smallest_reference
    assert all(key.startswith(CHECKPOINT_PREFIX) for key in file_state)
    path = tmp_path_factory.mktemp("unicarl") / "unicarl_random.pt"
    torch.save(file_state, path)
    return path


def forward_with_unet_displacements(model: torch.nn.Module, moving, fixed):
    """(the model's map, the largest |displacement| (unit frame) each of its U-Nets predicts in that pass)."""
    largest = []
    hooks = [
        module.register_forward_hook(lambda _m, _i, out: largest.append(float(out.abs().max())))
        for module in model.modules()
        if isinstance(module, UNet)
    ]
    try:
        with torch.no_grad():
            return model(moving, fixed), largest
    finally:
        for hook in hooks:
            hook.remove()


def test_maps_equal_reference_at_the_smallest_input(smallest_reference, authors_file):
    loss_model, _ = smallest_reference
    ours = build_unicarl(SMALLEST_SHAPE)
    load_unicarl_checkpoint(ours, torch.load(authors_file, weights_only=True))
    ours.eval()
    moving, fixed = load_input(PAIR[0], SMALLEST_SHAPE), load_input(PAIR[1], SMALLEST_SHAPE)
    for a, b in ((moving, fixed), (fixed, moving)):
        expected = reference_map(loss_model, a, b)
        got, displacements = forward_with_unet_displacements(ours, a, b)
        assert got.shape == expected.shape == (1, 3) + SMALLEST_SHAPE
        assert (expected - loss_model.identity_map).abs().max() > 0.05, "the comparison needs non-trivial maps"
        difference = float((got - expected).abs().max())
        assert difference <= TOLERANCE, f"max |map difference| {difference:.2e} (unit frame)"
        # every refinement step moves the map by at least a tenth of a voxel somewhere
        assert len(displacements) == 6
        assert min(displacements) * (MIN_INPUT_SIZE - 1) > 0.1, displacements


def test_the_authors_file_placed_by_hand_loads_at_the_released_input(authors_file):
    """``load_model`` recognises the authors' file by its keys and builds uniCARL at 160³ with its weights."""
    ours = load_model(authors_file, device="cpu")
    assert ours.preprocessing == "unicarl" and ours.input_spacing_mm is None
    assert tuple(ours.input_shape) == RELEASED_SHAPE
    state = ours.state_dict()
    file_state = torch.load(authors_file, weights_only=True)
    assert len(state) == len(file_state)
    for key, value in file_state.items():
        assert torch.equal(state[key[len(CHECKPOINT_PREFIX):]], value), key


def test_smallest_input_is_the_smallest_the_reference_accepts(unicarl_reference):
    """At 64³ the U-Nets run at 16³ and halve to 1 voxel: the reference fails, ours refuses to build."""
    small = (MIN_INPUT_SIZE - 1,) * 3
    with pytest.raises(ValueError, match=r"build_unicarl\(\): input_shape must be 3 sizes of at least 65 voxels"):
        build_unicarl(small)
    loss_model, _ = build_reference_unicarl(unicarl_reference, small)
    image = torch.rand((1, 1) + small)
    with pytest.raises(RuntimeError, match="smaller than kernel size"):
        reference_map(loss_model, image, image)


def test_parameters_and_entries_equal_reference(smallest_reference):
    loss_model, file_state = smallest_reference
    ours = build_unicarl(SMALLEST_SHAPE)
    expected = sum(p.numel() for p in loss_model.regis_net.parameters())
    assert sum(p.numel() for p in ours.parameters()) == expected
    assert round(expected / 1e6, 1) == 142.3
    assert len(ours.state_dict()) == len(file_state) == 343
    assert {CHECKPOINT_PREFIX + key: tuple(v.shape) for key, v in ours.state_dict().items()} == {
        key: tuple(v.shape) for key, v in file_state.items()
    }


@pytest.fixture(scope="module")
def prefixed_state():
    model = build_unicarl(SMALLEST_SHAPE)
    return model, {CHECKPOINT_PREFIX + key: value for key, value in model.state_dict().items()}


def _error(model, state) -> str:
    with pytest.raises(ValueError) as info:
        load_unicarl_checkpoint(model, state)
    message = str(info.value)
    assert message.startswith("load_unicarl_checkpoint(): expected the 343 entries") and "\n" not in message
    return message


def test_checkpoint_mismatches_raise_one_line_value_errors(prefixed_state):
    model, state = prefixed_state
    key = CHECKPOINT_PREFIX + "netPsi.net.lastConv.bias"
    missing = {k: v for k, v in state.items() if k != key}
    assert "missing 1: netPsi.net.lastConv.bias" in _error(model, missing)
    extra = dict(state, **{CHECKPOINT_PREFIX + "netPsi.net.extra": torch.zeros(1)})
    assert "unexpected 1: netPsi.net.extra" in _error(model, extra)
    reshaped = dict(state, **{key: torch.zeros(4)})
    assert "shape mismatch 1: netPsi.net.lastConv.bias expected (3,) got (4,)" in _error(model, reshaped)
    mixed = dict(missing, **{"netPsi.net.lastConv.bias": state[key]})
    assert "1 keys lack the prefix 'netPsi.netPsi.'" in _error(model, mixed)
    bare = {key[len(CHECKPOINT_PREFIX):]: value for key, value in state.items()}
    load_unicarl_checkpoint(model, bare)  # our own state_dict's layout loads too
