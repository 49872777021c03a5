"""CARL's equivariance (paper §4), checked where it is exact.

- eq. 7: the feature net commutes with integer translations away from the border;
- eq. 8: attention is permutation-equivariant in its keys and values;
- eq. 9: attention is affine-equivariant in its values;
- eq. 15: TwoStep{Φ, Ψ} with Φ [W,U]-equivariant and Ψ displacement-predicting is [W,U]-equivariant;
- a network whose first step is a displacement-predicting U-Net is not.

[W,U]-equivariance for translations: if the moving image is shifted by ``w`` and the fixed by
``u`` (``A' = A(· − w)``, ``B' = B(· − u)``), the map becomes ``φ'(x) = φ(x − u) + w``.
"""
from __future__ import annotations

import pytest
import torch

from carlreg.maps import DisplacementMap, identity_map
from carlreg.network import FeatureNet, FunctionFromVectorField, RegistrationModule, TwoStep, UNet
from carlreg.network.attention import coordinate_attention

SHAPE = (64, 64)
#: border band, in voxels, excluded where the shift wraps around or the receptive field sees the edge
MARGIN = 24


def smooth_blob_image(shape, centre, generator):
    """A smooth random image whose content sits away from the borders (zero background)."""
    grid = identity_map(shape)[0] * torch.tensor(shape, dtype=torch.float32).view(-1, 1, 1)
    image = torch.zeros(shape)
    for _ in range(6):
        position = torch.tensor(centre, dtype=torch.float32) + (torch.rand(2, generator=generator) - 0.5) * 12
        radius = 2 + 4 * torch.rand(1, generator=generator)
        distance2 = ((grid - position.view(2, 1, 1)) ** 2).sum(0)
        image += torch.exp(-distance2 / (2 * radius**2))
    return (image / image.max())[None, None]


def test_feature_net_commutes_with_integer_translation():
    torch.manual_seed(0)
    net = FeatureNet(dimension=2, channels=16).eval()
    image = torch.rand((1, 1) + SHAPE)
    shift = (5, -3)
    with torch.no_grad():
        shifted_then_featurised = net(torch.roll(image, shift, dims=(2, 3)))
        featurised_then_shifted = torch.roll(net(image), shift, dims=(2, 3))
    interior = (slice(None), slice(None), slice(MARGIN, -MARGIN), slice(MARGIN, -MARGIN))
    error = (shifted_then_featurised - featurised_then_shifted)[interior].abs().max()
    assert error < 1e-5
    # Near the border the zero padding breaks it: the check above is not vacuous.
    assert (shifted_then_featurised - featurised_then_shifted).abs().max() > 1e-2


def _random_unit_features(shape, generator):
    features = torch.randn(shape, generator=generator)
    return 4 * features / (features.norm(dim=-1, keepdim=True) + 1e-3)


def test_attention_permutation_equivariance():
    generator = torch.Generator().manual_seed(1)
    queries = _random_unit_features((1, 300, 32), generator)
    keys = _random_unit_features((1, 5000, 32), generator)
    values = torch.rand((1, 5000, 3), generator=generator)
    permutation = torch.randperm(5000, generator=generator)
    with torch.no_grad():
        original = coordinate_attention(queries, keys, values)
        permuted = coordinate_attention(queries, keys[:, permutation], values[:, permutation])
    assert (original - permuted).abs().max() < 1e-6


def test_attention_affine_equivariance_of_values():
    generator = torch.Generator().manual_seed(2)
    queries = _random_unit_features((1, 300, 32), generator)
    keys = _random_unit_features((1, 5000, 32), generator)
    values = torch.rand((1, 5000, 3), generator=generator)
    matrix = torch.tensor([[1.2, 0.1, 0.0], [-0.2, 0.9, 0.3], [0.0, 0.1, 1.1]])
    offset = torch.tensor([0.3, -0.2, 0.05])
    with torch.no_grad():
        transformed_after = coordinate_attention(queries, keys, values).transpose(1, 2) @ matrix.T + offset
        transformed_before = coordinate_attention(queries, keys, values @ matrix.T + offset).transpose(1, 2)
    assert (transformed_after - transformed_before).abs().max() < 1e-5


@pytest.mark.parametrize("batch, threads", [(2, 2), (1, 3)])  # 1 on 3 threads: 3001 queries folded unevenly
def test_attention_matches_dense_softmax_with_gradients(batch, threads):
    generator = torch.Generator().manual_seed(3)
    queries = _random_unit_features((batch, 3001, 16), generator).double().requires_grad_()
    keys = _random_unit_features((batch, 4100, 16), generator).double().requires_grad_()
    values = torch.rand((batch, 4100, 3), generator=generator).double()
    dense = torch.softmax(queries @ keys.transpose(1, 2), dim=-1) @ values
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        blocked = coordinate_attention(queries, keys, values).transpose(1, 2)
    finally:
        torch.set_num_threads(before)
    assert (dense - blocked).abs().max() < 1e-12
    weights = torch.rand(dense.shape, generator=generator).double()
    grads_dense = torch.autograd.grad((dense * weights).sum(), (queries, keys))
    grads_blocked = torch.autograd.grad((blocked * weights).sum(), (queries, keys))
    for a, b in zip(grads_dense, grads_blocked):
        assert (a - b).abs().max() < 1e-10


class KnownTranslation(RegistrationModule):
    """A first step that is [W,U]-equivariant by construction: it aligns the images' centres of mass."""

    def transform(self, moving, fixed):
        def centre(image):
            grid = identity_map(image.shape[2:])
            return (grid * image).sum(dim=(2, 3)) / image.sum(dim=(2, 3))

        offset = (centre(moving) - centre(fixed)).view(-1, 2, 1, 1)
        return DisplacementMap(offset.expand(-1, -1, *moving.shape[2:]).contiguous())


class LocalConvNet(torch.nn.Module):
    """A displacement-predicting network that is exactly [U,U]-equivariant: stride-1 convolutions.

    (A U-Net's stride-2 convolutions make it equivariant only to shifts by multiples of 32.)
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.first = torch.nn.Conv2d(2, 8, 5, padding="same")
        self.second = torch.nn.Conv2d(8, 2, 5, padding="same")

    def forward(self, moving, fixed):
        return 0.05 * self.second(torch.tanh(self.first(torch.cat([moving, fixed], 1))))


def _refinement():
    return FunctionFromVectorField(LocalConvNet().eval())


def _unet_first_step():
    """CARL's variant 1: the first step is a displacement-predicting U-Net."""
    torch.manual_seed(6)
    unet = UNet(dimension=2, width=0.25)
    with torch.no_grad():
        unet.lastConv.weight.normal_(std=0.05)
    return FunctionFromVectorField(unet.eval())


def _equivariance_error(network: RegistrationModule, shift_moving, shift_fixed) -> float:
    """max over the interior of |φ'(x) − (φ(x − u) + w)| in voxels, for integer shifts w, u."""
    generator = torch.Generator().manual_seed(5)
    moving = smooth_blob_image(SHAPE, (30, 34), generator)
    fixed = smooth_blob_image(SHAPE, (34, 30), generator)
    moving_shifted = torch.roll(moving, shift_moving, dims=(2, 3))
    fixed_shifted = torch.roll(fixed, shift_fixed, dims=(2, 3))
    scale = torch.tensor([n - 1 for n in SHAPE], dtype=torch.float32).view(1, 2, 1, 1)
    w = torch.tensor(shift_moving, dtype=torch.float32).view(1, 2, 1, 1) / scale
    with torch.no_grad():
        phi = network(moving, fixed)
        phi_shifted = network(moving_shifted, fixed_shifted)
    expected = torch.roll(phi, shift_fixed, dims=(2, 3)) + w
    interior = (slice(None), slice(None), slice(MARGIN, -MARGIN), slice(MARGIN, -MARGIN))
    return float(((phi_shifted - expected)[interior] * scale).abs().max())


def test_two_step_of_equivariant_first_step_is_equivariant():
    network = TwoStep(KnownTranslation(), _refinement())
    network.set_input_shape(SHAPE)
    assert _equivariance_error(network, (6, -4), (-3, 5)) < 1e-3


def test_displacement_first_step_is_not_equivariant():
    network = TwoStep(_unet_first_step(), _refinement())
    network.set_input_shape(SHAPE)
    error = _equivariance_error(network, (6, -4), (-3, 5))
    # A displacement-predicting first step does not follow an offset of the moving image.
    assert error > 3.0
