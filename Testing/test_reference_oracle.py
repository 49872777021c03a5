"""Our engine computes what the reference (icon_registration 1.1.9) computes, for the same weights.

Each configuration builds the reference on the CPU from a seeded random state, gives its
zero-initialised output convolutions and BatchNorm statistics random values (so that every
step of the network contributes), loads that state_dict into ours with ``strict=True`` and
compares maps in both directions on a batch of one random and one real pair.
"""
from __future__ import annotations

import os

import pytest
import torch

from carlreg import build_carl
from carlreg.losses import DiffusionObjective, GradICONObjective, lncc_loss
from carlreg.optimize import tune
from conftest import REPO
from images import MR_PAIR_2D, MR_PAIR_3D, load_pair
from reference_oracle import build_reference, float64_attention, randomise_zero_initialised, reference_maps

TOLERANCE = 1e-5
SHAPES = {2: (64, 80), 3: (36, 40, 48)}
REAL_PAIRS = {2: MR_PAIR_2D, 3: MR_PAIR_3D}


def make_pair_models(reference, variant, dimension, fourth_step, diffusion=False):
    torch.manual_seed(0)
    shape = SHAPES[dimension]
    ref_model = build_reference(reference, variant, dimension, shape, fourth_step, diffusion)
    randomise_zero_initialised(ref_model)
    ref_model.eval()
    ours = build_carl(dimension, shape, variant=variant, fourth_step=fourth_step)
    ours.load_state_dict(ref_model.regis_net.state_dict(), strict=True)
    ours.eval()
    return ref_model, ours


def input_batch(dimension):
    """Moving and fixed ``(2, 1, *shape)``: a random pair, then a real pair from ../shared/data."""
    shape = SHAPES[dimension]
    generator = torch.Generator().manual_seed(2)
    real_moving, real_fixed = load_pair(REAL_PAIRS[dimension], shape)
    moving = torch.cat([torch.rand((1, 1) + shape, generator=generator), real_moving])
    fixed = torch.cat([torch.rand((1, 1) + shape, generator=generator), real_fixed])
    return moving, fixed


@pytest.mark.parametrize("dimension", [2, 3])
@pytest.mark.parametrize("fourth_step", [False, True])
@pytest.mark.parametrize("variant", ["final_final", "final"])
def test_maps_equal_reference(reference, variant, fourth_step, dimension):
    ref_model, ours = make_pair_models(reference, variant, dimension, fourth_step)
    moving, fixed = input_batch(dimension)
    ref_ab, ref_ba = reference_maps(ref_model, moving, fixed)
    with torch.no_grad():
        ours_ab = ours(moving, fixed)
        ours_ba = ours(fixed, moving)
    displacement = (ref_ab - ref_model.identity_map).abs().max()
    assert displacement > 0.05, "the comparison must involve non-trivial maps"
    assert ours_ab.shape == ref_ab.shape == (2, dimension) + SHAPES[dimension]
    assert (ours_ab - ref_ab).abs().max() <= TOLERANCE
    assert (ours_ba - ref_ba).abs().max() <= TOLERANCE


def test_state_dict_matches_published_key_listing():
    """Key paths and shapes equal the listing printed from the reference (../shared/design)."""
    listing = REPO.parent / "shared" / "design" / "reference-keys-final_final+psi3.txt"
    if not listing.exists():
        message = f"{listing} not found (../shared/design beside the repository)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    expected = {}
    for line in listing.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _ = line.split("\t")
        expected[key] = tuple(int(n) for n in shape.strip("()").split(",") if n.strip())
    ours = build_carl(3, (40, 48, 56), variant="final_final", fourth_step=True)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
    assert sum(p.numel() for p in ours.parameters()) == 56_997_503


@pytest.mark.parametrize("dimension", [2, 3])
def test_gradicon_objective_equals_reference(reference, dimension):
    ref_model, ours = make_pair_models(reference, "final_final", dimension, fourth_step=False)
    moving, fixed = input_batch(dimension)
    moving, fixed = moving[1:], fixed[1:]
    torch.manual_seed(5)
    with torch.no_grad():
        expected = ref_model(moving, fixed)
    torch.manual_seed(5)
    with torch.no_grad():
        ours_terms = GradICONObjective(ours)(moving, fixed)
    assert abs(float(ours_terms.similarity) - float(expected.similarity_loss)) <= TOLERANCE
    assert abs(float(ours_terms.regularity) - float(expected.inverse_consistency_loss)) <= TOLERANCE * max(
        1.0, float(expected.inverse_consistency_loss)
    )
    assert abs(float(ours_terms.total) - float(expected.all_loss)) <= TOLERANCE * max(1.0, float(expected.all_loss))
    assert float(expected.inverse_consistency_loss) > 0


def test_gradicon_sparse_equals_reference(reference):
    import icon_registration as icon

    ref_model, ours = make_pair_models(reference, "final_final", 2, fourth_step=False)
    sparse = icon.losses.GradientICONSparse(ref_model.regis_net, icon.LNCC(4), 1.5)
    sparse.assign_identity_map([1, 1, *SHAPES[2]])
    moving, fixed = input_batch(2)
    torch.manual_seed(6)
    with torch.no_grad():
        expected = sparse(moving, fixed)
    torch.manual_seed(6)
    with torch.no_grad():
        ours_terms = GradICONObjective(ours, sparse=True)(moving, fixed)
    assert abs(float(ours_terms.regularity) - float(expected.inverse_consistency_loss)) <= TOLERANCE
    assert abs(float(ours_terms.total) - float(expected.all_loss)) <= TOLERANCE


@pytest.mark.parametrize("dimension", [2, 3])
def test_diffusion_objective_equals_reference(reference, dimension):
    ref_model, ours = make_pair_models(reference, "final_final", dimension, fourth_step=False, diffusion=True)
    moving, fixed = input_batch(dimension)
    moving, fixed = moving[1:], fixed[1:]
    with torch.no_grad():
        expected = ref_model(moving, fixed)
    with torch.no_grad():
        ours_terms = DiffusionObjective(ours)(moving, fixed)
    assert float(expected.bending_energy_loss) > 0
    assert abs(float(ours_terms.regularity) - float(expected.bending_energy_loss)) <= TOLERANCE
    assert abs(float(ours_terms.similarity) - float(expected.similarity_loss)) <= TOLERANCE
    assert abs(float(ours_terms.total) - float(expected.all_loss)) <= TOLERANCE


@pytest.mark.parametrize("dimension", [2, 3])
def test_lncc_equals_reference(reference, dimension):
    import icon_registration as icon

    moving, fixed = input_batch(dimension)
    expected = icon.LNCC(4)(moving, fixed)
    assert abs(float(lncc_loss(moving, fixed, 4)) - float(expected)) <= 1e-6
    assert float(lncc_loss(fixed, fixed, 4)) < 0.5 * float(expected)


def test_weights_after_one_instance_optimization_step_equal_reference(reference):
    """One step of the reference's instance optimization (Adam, lr 2e-5, GradICON) on a real pair.

    Adam's first step moves each weight by ``lr · g / (|g| + eps)``, i.e. by ±lr whatever the
    size of ``g``: where a gradient is float32 noise (GradICON's finite differences divide
    rounding by δ = 1e-3) its sign, and so the step, may differ. The gradients are compared
    relative to their size; the weights to 1e-5 wherever the gradient is above that noise.
    """
    ref_model, ours = make_pair_models(reference, "final_final", 2, fourth_step=False)
    moving, fixed = input_batch(2)
    moving, fixed = moving[1:], fixed[1:]
    initial = {name: value.clone() for name, value in ours.state_dict().items()}
    learning_rate = 2e-5
    optimizer = torch.optim.Adam(ref_model.parameters(), lr=learning_rate)
    torch.manual_seed(7)
    with float64_attention():
        ref_model(moving, fixed).all_loss.backward()
    ref_gradients = {name: p.grad.clone() for name, p in ref_model.regis_net.named_parameters()}
    optimizer.step()
    torch.manual_seed(7)
    tune(ours, moving, fixed, steps=1, learning_rate=learning_rate)
    expected = ref_model.regis_net.state_dict()
    parameters = dict(ours.named_parameters())
    beyond_tolerance = 0
    for name, value in ours.state_dict().items():
        difference = (value - expected[name]).abs()
        if name not in parameters:  # BatchNorm statistics: eval mode leaves them as they were
            assert torch.equal(value, initial[name]), name
            continue
        gradient = ref_gradients[name].abs()
        above_noise = gradient > 1e-3 * gradient.max()
        assert difference[above_noise].max() <= TOLERANCE, name
        assert difference.max() <= 2 * learning_rate + TOLERANCE, name
        beyond_tolerance += int((difference > TOLERANCE).sum())
    assert beyond_tolerance < 1e-4 * sum(p.numel() for p in parameters.values())
    moved = sum(int((value != initial[name]).sum()) for name, value in ours.state_dict().items())
    assert moved > 1_000_000, "one Adam step must change the weights"
