"""Maps in the unit frame: identity, sampling, composing."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from carlreg.maps import ComposedMap, DisplacementMap, grid_sample, identity_map, sample


@pytest.mark.parametrize("shape", [(5, 7), (4, 6, 9)])
def test_identity_spans_unit_interval(shape):
    grid = identity_map(shape)
    assert grid.shape == (1, len(shape)) + shape
    for axis, n in enumerate(shape):
        line = grid[0, axis].movedim(axis, 0).reshape(n, -1)[:, 0]
        assert torch.allclose(line, torch.arange(n) / (n - 1))


@pytest.mark.parametrize("shape", [(9, 13), (6, 8, 11)])
def test_sampling_on_own_grid_returns_the_image(shape):
    image = torch.rand((2, 3) + shape)
    assert torch.allclose(sample(image, identity_map(shape)), image, atol=1e-6)


def test_sampling_is_linear_between_voxels_and_replicates_the_border():
    image = torch.tensor([[[0.0, 10.0, 20.0]]]).unsqueeze(2).repeat(1, 1, 3, 1)  # (1, 1, 3, 3), varies along axis 1
    coords = torch.tensor([0.5, 0.25]).view(1, 2, 1, 1)  # axis 0 middle, axis 1 a quarter
    assert float(sample(image, coords)) == pytest.approx(5.0)
    outside = torch.tensor([0.5, 1.5]).view(1, 2, 1, 1)
    assert float(sample(image, outside)) == pytest.approx(20.0)


def test_displacement_map_on_grid_equals_interpolated_evaluation():
    shape = (6, 8, 10)
    displacement = torch.rand((1, 3) + shape) * 0.1
    phi = DisplacementMap(displacement)
    grid = identity_map(shape)
    assert torch.allclose(phi.on_grid(grid), phi(grid), atol=1e-6)
    coarse = identity_map((3, 4, 5))
    assert torch.allclose(phi.on_grid(coarse), phi(coarse))


def test_composition_order_is_outer_of_inner():
    shape = (5, 6)
    shift_a = DisplacementMap(torch.full((1, 2) + shape, 0.1))
    stretch = DisplacementMap(identity_map(shape) * 0.5)  # x ↦ 1.5 x
    composed = ComposedMap(shift_a, stretch)  # x ↦ 1.5 x + 0.1 (inside the grid)
    x = torch.tensor([0.2, 0.4]).view(1, 2, 1, 1)
    assert torch.allclose(composed(x), 1.5 * x + 0.1, atol=1e-6)


def test_sample_rejects_mismatched_coordinates():
    with pytest.raises(ValueError, match="sample\\(\\): coordinates must be"):
        sample(torch.rand(1, 1, 4, 4, 4), torch.rand(1, 2, 4, 4))


@pytest.fixture
def three_threads():
    """Three CPU threads: grid_sample folds the points into three batch entries, which do not
    divide the test grids' point counts evenly."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("mode, padding", [("bilinear", "border"), ("bilinear", "zeros"), ("nearest", "border")])
@pytest.mark.parametrize("values_shape, grid_shape", [
    ((1, 2, 9, 13), (1, 7, 11, 2)),
    ((1, 3, 6, 8, 11), (1, 5, 7, 10, 3)),
    ((1, 3, 6, 8, 11), (1, 1, 1, 16, 3)),  # a list of points (carlreg.inverse's)
    ((2, 3, 6, 8, 11), (2, 5, 7, 10, 3)),  # a batch: torch's own threading
])
def test_grid_sample_folded_over_threads_gives_torchs_values_and_gradients(three_threads, mode, padding, values_shape,
                                                                             grid_shape):
    torch.manual_seed(0)
    values = torch.rand(values_shape, dtype=torch.float64, requires_grad=True)
    grid = (torch.rand(grid_shape, dtype=torch.float64) * 2.4 - 1.2).requires_grad_(True)  # some points outside
    weights = torch.rand(values_shape[:2] + grid_shape[1:-1], dtype=torch.float64)
    ours = grid_sample(values, grid, mode=mode, padding_mode=padding)
    torchs = F.grid_sample(values, grid, mode=mode, padding_mode=padding, align_corners=True)
    assert ours.shape == torchs.shape and torch.equal(ours, torchs)
    ours_grads = torch.autograd.grad((ours * weights).sum(), (values, grid))
    torchs_grads = torch.autograd.grad((torchs * weights).sum(), (values, grid))
    for a, b in zip(ours_grads, torchs_grads):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
