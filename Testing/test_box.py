"""The network's box grown at inference to hold both images (carlreg.network.set_box, the pipeline).

A U-Net step predicts displacements in the unit frame of the box it was trained on; on a larger box
they are rescaled so that each step moves the same number of voxels. Ξ's attention works on any box.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from carlreg.geometry import covering_box
from carlreg.network import FunctionFromVectorField, build_carl, set_box
from carlreg.pipeline import register
from test_equivariance import LocalConvNet  # a step equivariant to integer shifts: stride-1 convolutions

SHAPE = (64, 64)
GROWN = (96, 96)
#: border band, in voxels of the small box, where the convolutions see its zero padding
MARGIN = 8


def _voxel_displacements(in_unit_shape_frame: bool):
    """The step's displacement in voxels on the trained box and, for the same images zero-padded
    into the grown box, on the grown box cropped back to the trained box's voxels."""
    step = FunctionFromVectorField(LocalConvNet().eval(), in_unit_shape_frame=in_unit_shape_frame)
    generator = torch.Generator().manual_seed(0)
    moving, fixed = (torch.rand((1, 1) + SHAPE, generator=generator) for _ in range(2))
    pad = [(g - n) // 2 for g, n in zip(GROWN, SHAPE)]
    scale = lambda shape: torch.tensor([n - 1 for n in shape], dtype=torch.float32).view(1, 2, 1, 1)  # noqa: E731
    with torch.no_grad():
        step.set_input_shape(SHAPE)
        small = (step(moving, fixed) - step.identity_map) * scale(SHAPE)
        step.set_input_shape(GROWN, SHAPE)
        padding = [pad[1], pad[1], pad[0], pad[0]]
        grown = (step(torch.nn.functional.pad(moving, padding), torch.nn.functional.pad(fixed, padding))
                 - step.identity_map) * scale(GROWN)
    grown = grown[:, :, pad[0] : pad[0] + SHAPE[0], pad[1] : pad[1] + SHAPE[1]]
    interior = (slice(None), slice(None), slice(MARGIN, -MARGIN), slice(MARGIN, -MARGIN))
    return small[interior], grown[interior]


def test_unet_step_moves_the_same_voxels_on_a_grown_box():
    small, grown = _voxel_displacements(in_unit_shape_frame=True)
    assert float(small.abs().mean()) > 0.05  # the step does move voxels
    assert float((small - grown).abs().max()) < 1e-4
    # Without the rescaling the same output would move 95/63 times as many voxels.
    small, grown = _voxel_displacements(in_unit_shape_frame=False)
    assert float((grown / small).median()) == pytest.approx(95 / 63, rel=1e-3)


def test_set_box_and_back_restores_the_trained_network():
    torch.manual_seed(1)
    net = build_carl(2, SHAPE, width=0.125).eval()
    generator = torch.Generator().manual_seed(2)
    moving, fixed = (torch.rand((1, 1) + SHAPE, generator=generator) for _ in range(2))
    with torch.no_grad():
        before = net(moving, fixed)
        set_box(net, GROWN)
        assert net.input_shape == GROWN and net(torch.zeros((1, 1) + GROWN), torch.zeros((1, 1) + GROWN)).shape[2:] == GROWN
        set_box(net, SHAPE)
        after = net(moving, fixed)
    assert torch.equal(before, after)


def test_set_box_rejects_what_it_cannot_run():
    net = build_carl(2, SHAPE, width=0.125)
    with pytest.raises(ValueError, match=r"set_box\(\): shape must be 2 sizes of at least 33"):
        set_box(net, (20, 64))
    with pytest.raises(ValueError, match=r"set_box\(\): expected a network from build_carl"):
        set_box(LocalConvNet(), GROWN)


def _image(size, spacing):
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetSpacing(list(spacing))
    return image


def test_covering_box_holds_each_image_whole():
    # 256 mm at 3 mm needs 87 voxels (86 steps), rounded up to 88; z is the tensor's first axis.
    head = _image((256, 256, 200), (1.0, 1.0, 1.0))
    small = _image((60, 60, 60), (1.0, 1.0, 1.0))
    assert covering_box([head, small], 3.0, (64, 72, 64), (128, 144, 128)) == (72, 88, 88)
    # never below the trained box, never above the maximum
    assert covering_box([small], 3.0, (64, 72, 64), (128, 144, 128)) == (64, 72, 64)
    assert covering_box([_image((600, 100, 100), (1.0, 1.0, 1.0))], 3.0, (64, 72, 64), (128, 144, 128)) == (64, 72, 128)


#: the content offset (LPS mm, along x) between the two images of the real-image test
OFFSET_MM = 60.0


def _template_pair():
    """The MNI template at 2 mm on a grid widened along x, and the same head moved 60 mm along x
    within that grid: the fixed → moving map is the translation by +60 mm in LPS x."""
    from conftest import shared_data_path

    template = sitk.ReadImage(str(shared_data_path("brain_templates", "antspy", "mni.nii.gz")), sitk.sitkFloat32)
    size = [int(round((n - 1) * s / 2.0)) + 1 for n, s in zip(template.GetSize(), template.GetSpacing())]
    size[0] += int(2 * OFFSET_MM / 2.0)
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing([2.0] * 3)
    grid.SetDirection(template.GetDirection())
    grid.SetOrigin((np.array(template.GetOrigin()) - np.array(template.GetDirection()).reshape(3, 3) @ [OFFSET_MM, 0, 0]).tolist())
    fixed = sitk.Resample(template, grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    moving = sitk.Resample(template, grid, sitk.TranslationTransform(3, [-OFFSET_MM, 0.0, 0.0]), sitk.sitkLinear, 0.0)
    return moving, fixed


def _equivariance_error_mm(moving, moved, fixed) -> float:
    """Mean over the fixed head of |u_moved(x) − (u(x) + 60 mm x)|: how far the map of the moved
    head is from the map of the head where it was, moved (CARL's promise, exact up to the U-Nets'
    stride-2 grids)."""
    head = sitk.GetArrayFromImage(sitk.OtsuThreshold(fixed, 0, 1)) > 0
    fields = [
        sitk.GetArrayFromImage(register(m, fixed, "carl-brain-3d", modality="mr", device="cpu")
                               .transform.GetDisplacementField())[head]
        for m in (moving, moved)
    ]
    return float(np.linalg.norm(fields[1] - fields[0] - [OFFSET_MM, 0.0, 0.0], axis=-1).mean())


def test_a_head_moved_60_mm_maps_as_the_head_in_place_moved_on_the_trained_box():
    """carl-brain-3d runs on the box it was trained on (96 × 104 × 88 voxels at 3 mm), which holds
    a real head moved 60 mm: its map is the map of the head in place, moved (CARL's promise, exact
    up to the U-Nets' stride-2 grids). The model shipped before, trained on its 192 mm input
    shape, cut the moved head at the box edge and erred by 6.0 mm."""
    moved, fixed = _template_pair()
    error = _equivariance_error_mm(fixed, moved, fixed)
    # measured 1.45 mm (half a network voxel) on 2026-11-28
    assert error < 2.5


def test_the_network_runs_on_its_trained_box_or_one_grown_to_hold_the_images():
    """``"trained"``: the box the weights were trained on, or for smaller images the box that
    holds them plus the margin the trained box has beyond the input shape; ``"cover"``: from the
    trained box up to twice the input shape, to hold both images whole."""
    from carlreg.pipeline import _network_box

    network = build_carl(3, (64, 72, 64), width=0.125, trained_box=(96, 104, 88), input_spacing_mm=3.0)
    small, wide = _image((100, 100, 100), (1.0, 1.0, 1.0)), _image((400, 300, 200), (1.0, 1.0, 1.0))
    # 100 mm needs 35 voxels → 40, plus the margins (32, 32, 24), at least the input shape
    assert _network_box(network, [small], 3.0, "trained") == (72, 72, 64)
    assert _network_box(network, [small, wide], 3.0, "trained") == (96, 104, 88)
    # x: 400 mm needs 135 voxels → 136, at most 2 × 64; y: 300 mm → 104; z: 200 mm → 72, at least 96
    assert _network_box(network, [small, wide], 3.0, "cover") == (96, 104, 128)
    # a model on whole resized arrays keeps its input shape
    assert _network_box(network, [wide], None, "cover") == (64, 72, 64)


def test_a_run_on_a_grown_box_keeps_the_unit_frame_of_its_input_shape(tmp_path):
    """Training on a box larger than ``input_shape`` (room for large shifts): the checkpoint loads
    as a network of ``input_shape`` that, set to the same box, computes what the trained one does."""
    from conftest import shared_data_path

    from carlreg.models import load_model
    from carlreg.train import TrainConfig, train

    config = TrainConfig(
        data_folder=str(shared_data_path("synthseg_label_maps")), input_shape=(40, 40, 40), box_shape=(48, 48, 40),
        spacing_mm=5.0, max_shift=4, width=0.125, batch_size=1, diffusion_steps=0, steps=1, checkpoint_every=1,
        validate_every=0, output=str(tmp_path / "run"),
    )
    trained = train(config).eval()
    assert trained.input_shape == (48, 48, 40) and trained.unit_shape == (40, 40, 40)
    loaded = load_model(tmp_path / "run" / "checkpoint.pt", "cpu")
    assert loaded.input_shape == (40, 40, 40) and loaded.config.trained_box == (48, 48, 40)
    assert loaded.input_spacing_mm == loaded.config.input_spacing_mm == 5.0  # the spacing it was trained at
    # the pipeline runs it on the box it was trained on, though a real head (182 × 218 × 182 mm; at
    # 5 mm, 40 × 48 × 40) fits a smaller one: the images sit in it as the training images did
    template = shared_data_path("brain_templates", "antspy", "mni.nii.gz")
    result = register(template, template, loaded, modality="mr", device="cpu", field_spacing_mm=8.0)
    assert tuple(result.fixed_to_moving_unit.shape[2:]) == (48, 48, 40)
    assert loaded.input_shape == (40, 40, 40)  # and gives the model back as it was
    set_box(loaded, (48, 48, 40))
    generator = torch.Generator().manual_seed(3)
    moving, fixed = (torch.rand((1, 1, 48, 48, 40), generator=generator) for _ in range(2))
    with torch.no_grad():
        assert torch.allclose(trained(moving, fixed), loaded(moving, fixed), atol=1e-6)
    with pytest.raises(ValueError, match="box_shape is for synthseg3d boxes"):
        train(TrainConfig(data="pairs", input_shape=(40, 40, 40), box_shape=(48, 48, 48), output=str(tmp_path / "pairs")))
